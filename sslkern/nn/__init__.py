"""Thin modules over the sslkern ops (losses, EMA teacher, attention for timm)."""
from .ema import EMATeacher  # noqa: F401
from .attention import AlibiAttention, AlibiContext, use_alibi  # noqa: F401
