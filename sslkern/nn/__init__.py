"""Thin modules over the sslkern ops (losses, EMA teacher, attention for timm)."""
from .ema import EMATeacher  # noqa: F401
from .dino import DINOLoss, IBOTPatchLoss  # noqa: F401
