"""nn modules built on sslkern ops."""
from .attention import AlibiAttention, AlibiContext, use_alibi  # noqa: F401
