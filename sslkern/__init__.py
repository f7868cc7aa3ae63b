"""sslkern — fused kernels for self-supervised ViT training.

Public ops (each a ``torch.library`` custom op ``torch.ops.sslkern.<name>``; CPU tensors
run C++ kernels, CUDA tensors run Triton / CUDA C++; ``sslkern.reference`` holds the eager
oracles):

  ema_update_             multi-tensor EMA of teacher parameters
  dino_loss               DINO multi-crop loss (centering or Sinkhorn teacher), fused
  ibot_patch_loss         iBOT / DINOv2 masked patch loss; koleo_loss, sinkhorn_knopp_teacher
  gather_tokens           masked-token gather (+ position add, multi-mask clone batch)
  restore_tokens          MAE-style restore with mask token / fill (+ position add)
  alibi_attention         attention with an in-kernel 1D/2D ALiBi bias (alibi_slopes: the slopes)
  layer_average_targets   data2vec targets: top-K layer average with per-layer norms
  masked_regression_loss  masked smooth-L1 / L2 regression onto per-image targets (clone batch)
  data2vec_cls_loss       data2vec 2.0 CLS term (student CLS vs token-mean target)
  data2vec_loss           the two above from the teacher layers in one call (composition)
  info_nce_loss           InfoNCE / NT-Xent contrastive loss (MoCo v3, SimCLR), tiled: no (N, M) logits
  prototype_loss          DINO / iBOT prototype layer + loss fused: features and weights in, no (rows, K) logits
  relation_loss           RelViT pairwise spatial-relation CE (+ distance / angle MSE): no (B, 9, N, N) logits
  hog_targets             MaskFeat per-patch HOG targets (SlowFast HOGLayerC), masked patches only
  render_views            training views of a RaggedImages batch (crop, flip, jitter, blur, ...; sslkern.views)
  cross_correlation_loss  Barlow Twins loss, exact, no (D, D) matrix (Gram form for N << D, tiled strips otherwise)
  vicreg_loss             VICReg loss, exact, no (D, D) covariances (same two forms)
  swav_loss               SwAV swapped prediction: per-crop Sinkhorn codes + the fused multi-crop cross-entropy

Modules: ``sslkern.masks`` (mask generators: MAE random, block, data2vec 2.0 inverse block,
I-JEPA multiblock), ``sslkern.nn`` (EMA teacher, DINO/iBOT losses with their centers,
InfoNCE, Barlow Twins / VICReg / SwAV losses, ALiBi attention for timm, masked-token embedding
and decoder input), ``sslkern.schedules``, ``sslkern.reference`` (eager oracles). ``__all__``
lists the public API.

Integration: ``sslkern.patch_timm_vit(model)`` (timm ViT: sslkern attention, ALiBi,
``forward_masked``), ``sslkern.compat.{lightly,dinov2,timm}`` (drop-in losses, EMA, mask
helpers with the peers' call forms); see docs/integration.md.

Large outputs of the C++ CPU kernels come from a small reuse cache (no page faults on every
step; see ``sslkern.cpu_cache``): ``sslkern.empty_cpu_cache()``, ``sslkern.cpu_cache_info()``,
``SSLKERN_CPU_CACHE_MB`` (0 turns it off).

Force a backend with ``backend=`` on a call, ``with sslkern.use_backend(name):`` or the
``SSLKERN_BACKEND`` environment variable. ``python -m sslkern.info`` says what is available.
"""
from .version import __version__
from ._backend import BACKENDS, backend_status, use_backend
from ._checks import ArgumentError
from .ops import (
    alibi_attention,
    alibi_slopes,
    cross_correlation_loss,
    data2vec_cls_loss,
    data2vec_loss,
    dino_loss,
    ema_update_,
    gather_tokens,
    hog_targets,
    ibot_patch_loss,
    info_nce_loss,
    koleo_loss,
    layer_average_targets,
    masked_regression_loss,
    prototype_loss,
    relation_loss,
    restore_tokens,
    sinkhorn_knopp_teacher,
    swav_codes,
    swav_loss,
    vicreg_loss,
)
from .ops import RaggedImages, render_views
from .cpu_cache import cpu_cache_disabled, cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from . import masks, nn, reference, schedules, views
from . import compat, patch
from .patch import patch_timm_vit

__all__ = [
    "__version__",
    # ops
    "alibi_attention", "alibi_slopes", "cross_correlation_loss", "data2vec_cls_loss", "data2vec_loss", "dino_loss",
    "ema_update_", "gather_tokens", "hog_targets", "ibot_patch_loss", "info_nce_loss", "koleo_loss",
    "layer_average_targets", "masked_regression_loss", "prototype_loss", "relation_loss", "render_views",
    "restore_tokens", "sinkhorn_knopp_teacher", "swav_codes", "swav_loss", "vicreg_loss", "RaggedImages",
    # backends, errors, the CPU output cache
    "BACKENDS", "backend_status", "use_backend", "ArgumentError",
    "cpu_cache_disabled", "cpu_cache_info", "empty_cpu_cache", "set_cpu_cache_limit",
    # modules
    "masks", "nn", "reference", "schedules", "views", "compat", "patch", "patch_timm_vit",
]
