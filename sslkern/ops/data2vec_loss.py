"""``data2vec_loss`` — data2vec 2.0 loss from teacher layers in one call (fairseq ``data2vec2.py``).

A composition of the fused ops (no extra kernel): targets are built once per image by
``layer_average_targets`` (memory B·T·D, the K layers are not stacked) and read in place
by ``masked_regression_loss`` for every clone, plus the optional CLS term.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._checks import check_int
from .layer_average_targets import layer_average_targets
from .masked_regression_loss import data2vec_cls_loss, masked_regression_loss


def data2vec_loss(
    pred: torch.Tensor,
    layers: Sequence[torch.Tensor] | torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    ids: Optional[torch.Tensor] = None,
    top_k: Optional[int] = None,
    layer_norm: str = "instance",
    final_norm: str = "layer",
    eps: float = 1e-5,
    beta: float = 0.0,
    scale: Optional[float] = None,
    reduction: str = "sum",
    cls_pred: Optional[torch.Tensor] = None,
    cls_weight: float = 0.01,
    check_indices: bool = True,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""``(regression, cls)`` for data2vec 2.0 from the teacher's layer outputs.

    ``targets = layer_average_targets(layers[-top_k:], ...)``; ``regression =
    masked_regression_loss(pred, targets, mask, ids=ids, ...)``; ``cls =
    data2vec_cls_loss(cls_pred, targets, weight=cls_weight, beta, scale)`` (``None`` without
    ``cls_pred``). fairseq's loss divided by its ``sample_size`` is ``regression / n_masked
    + cls`` with ``reduction="sum"`` (``regression + cls`` with ``reduction="mean"`` on one
    process).

    Args:
        top_k: average the last ``top_k`` of ``layers`` (default: all); must not exceed
            the number of layers given.
        check_indices: as ``masked_regression_loss`` (``False``: no host sync, for CUDA graphs).
        Others: as ``layer_average_targets``, ``masked_regression_loss``, ``data2vec_cls_loss``.
    """
    n = int(layers.shape[0]) if isinstance(layers, torch.Tensor) else len(layers)
    if top_k is not None:
        top_k = check_int("data2vec_loss", "top_k", top_k, 1, n)
        layers = layers[n - top_k:] if isinstance(layers, torch.Tensor) else list(layers)[n - top_k:]
    targets = layer_average_targets(layers, layer_norm=layer_norm, final_norm=final_norm, eps=eps, backend=backend)
    reg = masked_regression_loss(pred, targets, mask, ids=ids, beta=beta, scale=scale, reduction=reduction,
                                 check_indices=check_indices, backend=backend)
    cls = None
    if cls_pred is not None:
        cls = data2vec_cls_loss(cls_pred, targets, weight=cls_weight, beta=beta, scale=scale, backend=backend)
    return reg, cls
