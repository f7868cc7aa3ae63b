r"""``swav_loss`` — SwAV's swapped prediction on the fused multi-crop cross-entropy.

For prototype scores ``s`` (V·B, K), crop-major (``normalize(z)·Wᵀ`` with unit prototypes), and
the codes ``q_i`` of the first ``n_assign`` crops (Sinkhorn-Knopp equipartition of
``exp(s_i/ε)`` over the crop's batch, per crop, with the queue's rows when given):

    L = 1/n_assign Σ_{i<n_assign} 1/(V − 1) Σ_{v≠i} mean_b ( −Σ_k q_i[b,k] · log softmax(s_v[b]/τ)[k] )

(swav ``main_swav.py: train``). A composition of two existing ops, no new kernel:
:func:`sslkern.sinkhorn_knopp_teacher` per assigned crop (``keep_last=B``: the queue rows enter
the equipartition, only the batch's codes are written), then the DINO loss's custom op
``torch.ops.sslkern.dino_loss`` with the codes as teacher probabilities (T = n_assign teacher
views, V student views, same-view pairs skipped, ``scale = 1/(P·B)`` with P = n_assign·(V − 1)
pairs — exactly the weights above). That op never materialises a probability or
log-probability: the only (rows, K) tensors are the scores and the (n_assign·B, K) codes; the
gradient w.r.t. the scores is computed in the same pass and rescaled by backward.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .._checks import check_range, check_tensor, fail
from .dino_loss import sinkhorn_knopp_teacher

OP = "swav_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        fail(OP, f"{name} expected an int >= {lo}, got {value!r}", TypeError if not isinstance(value, int) else
             ValueError)
    return value


@torch.no_grad()
def swav_codes(scores: torch.Tensor, n_crops: int, *, queue_scores: Optional[Sequence[torch.Tensor]] = None,
               n_assign: int = 2, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
               backend: Optional[str] = None) -> torch.Tensor:
    """The (n_assign·B, K) codes of the first ``n_assign`` crops: per crop, the Sinkhorn-Knopp
    equipartition of its B rows of ``scores`` (after the queue's ``queue_scores[i]`` rows, when
    given) at temperature ε, the batch's rows kept. Across ranks (torch.distributed
    initialized) the equipartition runs over every rank's rows, as swav's ``distributed_sinkhorn``."""
    b = scores.shape[0] // n_crops
    codes = []
    for i in range(n_assign):
        s = scores[b * i:b * (i + 1)].detach()
        if queue_scores is not None:
            s = torch.cat((queue_scores[i].detach().to(s.dtype), s))
        codes.append(sinkhorn_knopp_teacher(s, epsilon, sinkhorn_iterations, keep_last=b, backend=backend))
    return torch.cat(codes)


def code_entropy(codes: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the codes' entropy as a fraction of ln K (0-dim tensor; 1 = uniform codes)."""
    q = codes.float()
    return -(q * q.clamp_min(1e-30).log()).sum(-1).mean() / math.log(q.shape[-1])


def swav_loss(
    scores: torch.Tensor,
    n_crops: int,
    *,
    queue_scores: Optional[Sequence[torch.Tensor]] = None,
    codes: Optional[torch.Tensor] = None,
    n_assign: int = 2,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    return_stats: bool = False,
    backend: Optional[str] = None,
):
    r"""SwAV loss (swav ``main_swav.py``: ``distributed_sinkhorn`` + the swapped-prediction loop).

    Args:
        scores: (V·B, K) prototype scores of V = ``n_crops`` crops, crop-major (crop 0's B rows
            first); the crops assigned codes come first (swav ``crops_for_assign = [0, 1]``).
        n_crops: V (swav ``sum(nmb_crops)``).
        queue_scores: optional, one (Q, K) tensor per assigned crop: the queue's stored
            embeddings scored against the current prototypes (they join each crop's Sinkhorn).
        codes: optional (n_assign·B, K) codes computed by the caller (e.g. from one product of
            the queue and the batch, :class:`sslkern.nn.SwAVLoss`); replaces the Sinkhorn step.
        n_assign: number of assigned crops (2; lightly: every high-resolution crop).
        temperature: τ of the predictions (0.1).
        epsilon: ε of the Sinkhorn codes (0.05).
        sinkhorn_iterations: 3.
        return_stats: also return ``{"loss_frac": loss/ln K, "code_entropy": mean H(q)/ln K}``
            (0-dim tensors; ln K is the loss of uniform predictions — a collapsed model's).
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` for the cross-entropy (default auto).

    Returns:
        the loss (0-dim fp32; fp64 for fp64 scores), or ``(loss, stats)``. Differentiable w.r.t.
        ``scores`` (the codes carry no gradient); lightly ``SwaVLoss`` returns the same value.
    """
    check_tensor(OP, "scores", scores, dtypes=_FLOATS, ndim=2)
    n_crops = _check_int("n_crops", n_crops, 2)
    n_assign = _check_int("n_assign", n_assign, 1)
    if n_assign > n_crops:
        fail(OP, f"n_assign expected <= n_crops = {n_crops}, got {n_assign}")
    rows, k = scores.shape
    if rows == 0 or rows % n_crops:
        fail(OP, f"scores expected n_crops·B rows with n_crops = {n_crops}, got shape {tuple(scores.shape)}")
    b = rows // n_crops
    check_range(OP, "temperature", float(temperature), 0.0, None, lo_open=True)
    check_range(OP, "epsilon", float(epsilon), 0.0, None, lo_open=True)
    if codes is not None:
        if queue_scores is not None:
            fail(OP, "queue_scores expected None when codes are given (the codes already include the queue)")
        check_tensor(OP, "codes", codes, dtypes=_FLOATS, shape=(n_assign * b, k), device=scores.device)
        codes = codes.detach()
    else:
        if queue_scores is not None:
            if len(queue_scores) != n_assign:
                fail(OP, f"queue_scores expected {n_assign} tensors (one per assigned crop), got {len(queue_scores)}")
            for i, q in enumerate(queue_scores):
                check_tensor(OP, f"queue_scores[{i}]", q, dtypes=_FLOATS, ndim=2, device=scores.device)
                if q.shape[1] != k:
                    fail(OP, f"queue_scores[{i}] expected {k} columns (the scores' K), got shape {tuple(q.shape)}")
        codes = swav_codes(scores, n_crops, queue_scores=queue_scores, n_assign=n_assign, epsilon=epsilon,
                           sinkhorn_iterations=sinkhorn_iterations, backend=backend)
    n_pairs = n_assign * (n_crops - 1)
    compute_grad = scores.requires_grad and torch.is_grad_enabled()
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    loss, _, _ = torch.ops.sslkern.dino_loss(
        scores.contiguous(), codes.to(acc).contiguous(), None, None, 1.0 / (n_pairs * b), float(temperature),
        float(epsilon), n_crops, n_assign, True, True, compute_grad, False, backend or "")
    if return_stats:
        return loss, {"loss_frac": loss.detach() / math.log(k), "code_entropy": code_entropy(codes)}
    return loss
