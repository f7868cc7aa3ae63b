"""Eager reference for ``masked_regression_loss`` and ``data2vec_cls_loss``.

Follows fairseq ``examples/data2vec/models/data2vec2.py``: the per-image targets are
repeated for the clone batch (``repeat_interleave(M, 0)``), the masked positions are
selected (``y[mask]``) and ``d2v_loss`` gives ``mse`` (beta 0) or ``smooth_l1`` (beta > 0)
per element, times ``1/sqrt(D)``; the sum over all masked elements is the loss (fairseq
divides by ``sample_size`` = the masked count afterwards). Optional per-element weights
multiply each element's term and ``l1`` gives ``|x − y|`` (the context encoder's weighted L2,
SimMIM's L1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def elementwise_loss(x: torch.Tensor, y: torch.Tensor, beta: float, l1: bool = False) -> torch.Tensor:
    if l1:
        return F.l1_loss(x, y, reduction="none")
    if beta == 0:
        return F.mse_loss(x, y, reduction="none")
    return F.smooth_l1_loss(x, y, reduction="none", beta=beta)


def masked_regression_loss(pred, target, mask=None, *, ids=None, beta: float = 0.0, scale=None,
                           reduction: str = "sum", weight=None, l1: bool = False) -> torch.Tensor:
    """``weight``: per-element weights of pred's shape (selected like pred); ``l1``: ``|x − y|``."""
    B, T, D = target.shape
    M = pred.shape[0] // B
    cdtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    y = target.detach().to(cdtype).repeat_interleave(M, 0)           # (B*M, T, D)
    x = pred.to(cdtype)
    wt = torch.ones_like(x) if weight is None else weight.to(cdtype)
    if ids is not None:
        y = torch.gather(y, 1, ids.long().unsqueeze(-1).expand(-1, -1, D))  # (B*M, Nm, D)
        x, y, wt = x.reshape(-1, D), y.reshape(-1, D), wt.reshape(-1, D)
    elif mask is not None:
        x, y, wt = x[mask], y[mask], wt[mask]                        # (n_masked, D)
    else:
        x, y, wt = x.reshape(-1, D), y.reshape(-1, D), wt.reshape(-1, D)
    s = (1.0 / math.sqrt(D)) if scale is None else scale
    loss = (elementwise_loss(x, y, beta, l1) * wt * s).sum()
    if reduction == "mean":
        loss = loss / max(x.shape[0], 1)
    return loss.to(torch.float32) if cdtype == torch.float32 else loss


def data2vec_cls_loss(cls_pred, target, *, weight: float = 0.01, beta: float = 0.0, scale=None,
                      reduction: str = "sum") -> torch.Tensor:
    """fairseq: ``d2v_loss(x[:, extra-1], y.mean(1).repeat_interleave(M)) * cls_loss * sample_size``
    summed; divided by sample_size this is ``weight * sum`` (reduction "sum")."""
    B, T, D = target.shape
    M = cls_pred.shape[0] // B
    cdtype = torch.float64 if cls_pred.dtype == torch.float64 else torch.float32
    y = target.detach().to(cdtype).mean(dim=1).repeat_interleave(M, 0)
    s = (1.0 / math.sqrt(D)) if scale is None else scale
    loss = (elementwise_loss(cls_pred.to(cdtype), y, beta) * s).sum()
    if reduction == "mean":
        loss = loss / max(cls_pred.shape[0], 1)
    loss = loss * weight
    return loss.to(torch.float32) if cdtype == torch.float32 else loss
