"""The public ops: one module per op, each registering ``torch.ops.sslkern.<op>``."""
from .ema_update import ema_update_  # noqa: F401
from .alibi_attention import alibi_attention, alibi_slopes  # noqa: F401
