"""``masked_regression_loss`` — data2vec / I-JEPA masked regression (fairseq ``data2vec2.py``
``d2v_loss``), and ``data2vec_cls_loss``, the data2vec 2.0 CLS term built on it."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import Dispatch, standard_impls
from .._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_float, check_same_device, check_tensor,
                       fail)
from ._common import acc_dtype, check_index_values

OP = "masked_regression_loss"


def masked_regression_loss_eager(pred, target, mask, ids, beta, scale, mean, weight, l1):
    """The forward custom op's contract on the oracle ``sslkern.reference.masked_regression_loss``."""
    from ..reference.masked_regression_loss import masked_regression_loss

    return masked_regression_loss(pred, target, mask, ids=ids, beta=beta, scale=scale,
                                  reduction="mean" if mean else "sum", weight=weight, l1=l1)


def masked_regression_loss_backward_eager(grad_out, pred, target, mask, ids, beta, scale, mean, weight, l1):
    """The backward custom op's contract: d loss / d pred written out (custom-op bodies run
    below autograd), ``g · scale · w · ℓ'(pred − y)`` at counted tokens (÷ count for "mean"),
    0 elsewhere (ℓ' = 2e, smooth-L1's, or sign(e) for ``l1``)."""
    B, T, D = target.shape
    M = pred.shape[0] // B
    acc = acc_dtype(pred)
    y = target.to(acc).repeat_interleave(M, 0)
    if ids is not None:
        y = torch.gather(y, 1, ids.long().unsqueeze(-1).expand(-1, -1, D))
    e = pred.to(acc) - y
    if l1:
        d = torch.sign(e)
    else:
        d = 2 * e if beta == 0 else torch.where(e.abs() < beta, e / beta, torch.sign(e))
    if weight is not None:
        d = d * weight.to(acc)
    keep = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device) if mask is None else mask
    coef = grad_out.to(acc) * scale
    if mean:
        count = keep.sum() if ids is None else pred.shape[0] * pred.shape[1]
        coef = coef / torch.as_tensor(count, device=pred.device).clamp(min=1)
    return (d * coef * keep.unsqueeze(-1)).to(pred.dtype)


dispatch = Dispatch(OP, standard_impls(OP, masked_regression_loss_eager))
dispatch_backward = Dispatch(OP + "_backward", standard_impls(OP + "_backward", masked_regression_loss_backward_eager,
                                                              triton_module=OP))


@torch.library.custom_op("sslkern::masked_regression_loss", mutates_args=())
def _loss_op(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], ids: Optional[torch.Tensor],
             beta: float, scale: float, mean: bool, weight: Optional[torch.Tensor], l1: bool,
             backend: str) -> torch.Tensor:
    return dispatch(pred.device, backend)(pred, target, mask, ids, beta, scale, mean, weight, l1)


@_loss_op.register_fake
def _(pred, target, mask, ids, beta, scale, mean, weight, l1, backend):
    return pred.new_empty((), dtype=acc_dtype(pred))


@torch.library.custom_op("sslkern::masked_regression_loss_backward", mutates_args=())
def _loss_backward_op(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                      ids: Optional[torch.Tensor], beta: float, scale: float, mean: bool,
                      weight: Optional[torch.Tensor], l1: bool, backend: str) -> torch.Tensor:
    return dispatch_backward(pred.device, backend)(grad_out, pred, target, mask, ids, beta, scale, mean, weight, l1)


@_loss_backward_op.register_fake
def _(grad_out, pred, target, mask, ids, beta, scale, mean, weight, l1, backend):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, target, mask, ids, beta, scale, mean, weight, l1, backend = inputs
    ctx.save_for_backward(pred, target, mask, ids, weight)
    ctx.args = (beta, scale, mean, l1, backend)


def _backward(ctx, grad_out):
    pred, target, mask, ids, weight = ctx.saved_tensors
    beta, scale, mean, l1, backend = ctx.args
    grad = torch.ops.sslkern.masked_regression_loss_backward(grad_out, pred, target, mask, ids, beta, scale, mean,
                                                             weight, l1, backend)
    return (grad,) + (None,) * 9


_loss_op.register_autograd(_backward, setup_context=_setup_context)


def masked_regression_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    ids: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    scale: Optional[float] = None,
    reduction: str = "sum",
    check_indices: bool = True,
    weight: Optional[torch.Tensor] = None,
    l1: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Regression of predictions onto per-image targets at masked tokens, clone batch aware.

    ``loss = scale · Σ_{r, masked j} Σ_d w[r, j, d] · ℓ(pred[r, j, d] − target[r // M, pos(r, j), d])``

    Args:
        pred: student predictions, rows for B·M clones, image-major (row r belongs to image
            r // M, M = pred.shape[0] // B): (B·M, T, D) full sequences with ``mask``, or
            (B·M, Nm, D) predicted tokens only with ``ids``. fp32, bf16, fp16 or fp64.
        target: (B, T, D) per image, computed once (fp32 usually; any float dtype). No
            gradient flows to it; the repeat over clones is never materialized.
        mask: (B·M, T) bool, True = masked (this position counts). ``None`` with ``ids=None``
            means every position counts.
        ids: (B·M, Nm) integer token positions in [0, T); pred row j is compared with target
            position ``ids[r, j]``.
        check_indices: check ``ids`` values once here (an out-of-range index raises an
            ``IndexError`` naming ``ids``; one device reduction and a host sync). ``False``:
            no check and no sync (CUDA-graph capture); out-of-range tokens then count as
            unmasked on the GPU. Backward never checks, nor does a ``torch.compile``\ d call.
        beta: 0 → ``(pred − y)²``; > 0 → smooth-L1 with that beta
            (``F.smooth_l1_loss(..., beta=beta)``, as fairseq ``d2v_loss`` with ``loss_beta``).
        l1: ``|pred − y|`` (SimMIM's L1 on masked pixels); ``beta`` must be 0.
        weight: optional per-element weights ``w``, pred's shape, fp32 (fp64 for fp64 pred), no
            gradient (e.g. the context encoder's ×10 overlap band, zeros outside the region).
            The ``"mean"`` count is still the number of counted tokens.
        scale: per-token factor, default ``1/sqrt(D)`` (fairseq ``loss_scale=None``).
        reduction: ``"sum"`` over masked tokens (fairseq: the caller divides by the global
            masked count, ``sample_size``) or ``"mean"`` over masked tokens.
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Returns a 0-dim fp32 tensor (fp64 for fp64 pred); gradient to ``pred`` only, in pred's
    dtype. No masked token → 0 (no NaN) for both reductions.

    Matches fairseq ``data2vec2.py`` (``y.repeat_interleave(clone_batch, 0)[mask]`` then
    ``d2v_loss(x[mask], y).sum()``). I-JEPA (``src/train.py``): ``masked_regression_loss(
    pred, layer_average_targets([h], layer_norm="layer", final_norm="none"), ids=...,
    beta=1.0, scale=1/D, reduction="mean")`` equals ``F.smooth_l1_loss(pred, h_masked)``
    (which averages over tokens and D).
    """
    check_tensor(OP, "pred", pred, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor(OP, "target", target, dtypes=FLOAT_DTYPES, ndim=3)
    device = check_same_device(OP, {"pred": pred, "target": target, "mask": mask, "ids": ids})
    B, T, D = (int(s) for s in target.shape)
    R, N = int(pred.shape[0]), int(pred.shape[1])
    if int(pred.shape[2]) != D:
        fail(OP, f"pred expected last dim {D} like target, got shape {tuple(pred.shape)}")
    if B == 0 or R % B != 0:
        fail(OP, f"pred expected a multiple of target's batch {B} rows (B·M clones), got {R}")
    if mask is not None and ids is not None:
        fail(OP, "pass mask or ids, not both")
    if ids is not None:
        check_tensor(OP, "ids", ids, dtypes=INDEX_DTYPES, shape=(R, N))
        ids = ids.to(torch.int64).contiguous()
        check_choice(OP, "check_indices", check_indices, (True, False))
        if check_indices:
            check_index_values(OP, "ids", ids, T, meaning=" (target token positions)")
    else:
        if N != T:
            fail(OP, f"pred expected {T} tokens like target (full sequences; use ids= for gathered predictions), "
                     f"got shape {tuple(pred.shape)}")
        if mask is not None:
            check_tensor(OP, "mask", mask, dtypes=(torch.bool,), shape=(R, T))
            mask = mask.contiguous()
    check_choice(OP, "reduction", reduction, ("sum", "mean"))
    beta = check_float(OP, "beta", beta, 0.0, None)
    if not isinstance(l1, bool):
        fail(OP, f"l1 expected a bool, got {type(l1).__name__}", TypeError)
    if l1 and beta != 0.0:
        fail(OP, f"l1 expected beta 0 (L1 or smooth-L1, not both), got beta {beta}")
    if weight is not None:
        check_tensor(OP, "weight", weight, dtypes=(acc_dtype(pred),), shape=tuple(pred.shape), device=device)
        weight = weight.detach().contiguous()
    scale = 1.0 / math.sqrt(D) if scale is None else check_float(OP, "scale", scale)
    if pred.shape[-1] > 1 and pred.stride(-1) != 1:
        pred = pred.contiguous()
    target = target.detach()
    if target.shape[-1] > 1 and target.stride(-1) != 1:
        target = target.contiguous()
    return torch.ops.sslkern.masked_regression_loss(pred, target, mask, ids, beta, scale, reduction == "mean",
                                                    weight, bool(l1), backend or "")


def data2vec_cls_loss(
    cls_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: float = 0.01,
    beta: float = 0.0,
    scale: Optional[float] = None,
    reduction: str = "sum",
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""data2vec 2.0 CLS term: ``weight · masked_regression_loss(cls_pred, mean_t target)``.

    Args:
        cls_pred: (B·M, D) student CLS outputs, image-major like ``pred``.
        target: (B, T, D) the per-image targets (``layer_average_targets``); the CLS target
            is their token mean (B, D), shared by an image's M clones (no repeat).
        weight: fairseq ``cls_loss`` (0.01 in the image configs).
        beta, scale, reduction, backend: as ``masked_regression_loss`` (scale default 1/sqrt(D)).

    fairseq adds ``d2v_loss(cls_pred, cls_target).sum() · cls_loss · sample_size`` to the sum
    it later divides by ``sample_size``, so with ``reduction="sum"``
    ``masked_regression_loss(...) / n_masked + data2vec_cls_loss(...)`` is fairseq's loss.
    """
    check_tensor("data2vec_cls_loss", "cls_pred", cls_pred, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("data2vec_cls_loss", "target", target, dtypes=FLOAT_DTYPES, ndim=3)
    weight = check_float("data2vec_cls_loss", "weight", weight)
    with torch.no_grad():
        cls_target = target.float().mean(dim=1, keepdim=True)  # (B, 1, D): B·D work, no clone repeat
    if cls_pred.dtype == torch.float64:
        cls_target = cls_target.double()
    loss = masked_regression_loss(cls_pred.unsqueeze(1), cls_target, None, beta=beta, scale=scale,
                                  reduction=reduction, backend=backend)
    return loss * weight
