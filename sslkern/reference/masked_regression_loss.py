"""Eager reference for ``masked_regression_loss`` and ``data2vec_cls_loss`` (SPEC section 5).

Follows fairseq ``examples/data2vec/models/data2vec2.py``: the per-image targets are
repeated for the clone batch (``repeat_interleave(M, 0)``), the masked positions are
selected (``y[mask]``) and ``d2v_loss`` gives ``mse`` (beta 0) or ``smooth_l1`` (beta > 0)
per element, times ``1/sqrt(D)``; the sum over all masked elements is the loss (fairseq
divides by ``sample_size`` = the masked count afterwards).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _elementwise(x: torch.Tensor, y: torch.Tensor, beta: float, l1: bool = False) -> torch.Tensor:
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
    loss = (_elementwise(x, y, beta, l1) * wt * s).sum()
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
    loss = (_elementwise(cls_pred.to(cdtype), y, beta) * s).sum()
    if reduction == "mean":
        loss = loss / max(cls_pred.shape[0], 1)
    loss = loss * weight
    return loss.to(torch.float32) if cdtype == torch.float32 else loss


def masked_regression_loss_backward(grad_out, pred, target, mask=None, ids=None, beta: float = 0.0, scale=None,
                                    mean: bool = False, weight=None, l1: bool = False) -> torch.Tensor:
    """d loss / d pred in closed form (autograd is not available below a custom op):
    ``g · scale · w · ℓ'(pred − y)`` at counted tokens (÷ count for "mean"), 0 elsewhere."""
    B, T, D = target.shape
    M = pred.shape[0] // B
    cdtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    y = target.to(cdtype).repeat_interleave(M, 0)
    if ids is not None:
        y = torch.gather(y, 1, ids.long().unsqueeze(-1).expand(-1, -1, D))
    e = pred.to(cdtype) - y
    if l1:
        d = torch.sign(e)
    elif beta == 0:
        d = 2 * e
    else:
        d = torch.where(e.abs() < beta, e / beta, torch.sign(e))
    s = (1.0 / math.sqrt(D)) if scale is None else scale
    keep = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device) if mask is None else mask
    count = int(keep.sum()) if ids is None else pred.shape[0] * pred.shape[1]
    coef = grad_out.to(cdtype) * s
    if mean:
        coef = coef / max(count, 1)
    if weight is not None:
        d = d * weight.to(cdtype)
    return (d * coef * keep.unsqueeze(-1)).to(pred.dtype)
