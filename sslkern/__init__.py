"""sslkern — fused kernels for self-supervised ViT training.

Public ops (each a ``torch.library`` custom op ``torch.ops.sslkern.<name>``; CPU tensors
run C++ kernels, CUDA tensors run Triton / CUDA C++; ``sslkern.reference`` holds the eager
oracles):

  ema_update_          multi-tensor EMA of teacher parameters
  alibi_attention      attention with an in-kernel 1D/2D ALiBi bias (alibi_slopes: the slopes)

Force a backend with ``backend=`` on a call, ``with sslkern.use_backend(name):`` or the
``SSLKERN_BACKEND`` environment variable. ``python -m sslkern.info`` says what is available.
"""
from .version import __version__  # noqa: F401
from ._backend import BACKENDS, backend_status, use_backend  # noqa: F401
from ._checks import ArgumentError  # noqa: F401
from .ops import ema_update_  # noqa: F401
from .ops import alibi_attention, alibi_slopes  # noqa: F401
from . import reference  # noqa: F401
from . import nn  # noqa: F401
