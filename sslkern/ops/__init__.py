"""The public ops: one module per op, each registering ``torch.ops.sslkern.<op>``."""
from .ema_update import ema_update_  # noqa: F401
from .tokens import gather_tokens, restore_tokens  # noqa: F401
