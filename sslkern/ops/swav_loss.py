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

from .._checks import FLOAT_DTYPES, check_choice, check_float, check_int, check_tensor, fail
from ._common import acc_dtype, needs_grad
from .dino_loss import sinkhorn_knopp_teacher

OP = "swav_loss"


def _check_crops(op: str, scores, n_crops, n_assign) -> tuple[int, int, int]:
    """(V, n_assign, B) of V·B rows of ``scores``, the assigned crops among the V."""
    check_tensor(op, "scores", scores, dtypes=FLOAT_DTYPES, ndim=2)
    n_crops = check_int(op, "n_crops", n_crops, 2)
    n_assign = check_int(op, "n_assign", n_assign, 1, n_crops)
    rows = scores.shape[0]
    if rows == 0 or rows % n_crops:
        fail(op, f"scores expected n_crops·B rows with n_crops = {n_crops}, got shape {tuple(scores.shape)}")
    return n_crops, n_assign, rows // n_crops


def _check_queue(op: str, scores, queue_scores, n_assign: int) -> None:
    if queue_scores is None:
        return
    if not isinstance(queue_scores, (list, tuple)):
        fail(op, f"queue_scores expected a list of {n_assign} tensors, got {type(queue_scores).__name__}", TypeError)
    if len(queue_scores) != n_assign:
        fail(op, f"queue_scores expected {n_assign} tensors (one per assigned crop), got {len(queue_scores)}")
    for i, q in enumerate(queue_scores):
        check_tensor(op, f"queue_scores[{i}]", q, dtypes=FLOAT_DTYPES, ndim=2, device=scores.device)
        if q.shape[1] != scores.shape[1]:
            fail(op, f"queue_scores[{i}] expected {scores.shape[1]} columns (the scores' K), got shape {tuple(q.shape)}")


def _codes(scores, b, queue_scores, n_assign, epsilon, sinkhorn_iterations, backend) -> torch.Tensor:
    codes = []
    for i in range(n_assign):
        s = scores[b * i:b * (i + 1)].detach()
        if queue_scores is not None:
            s = torch.cat((queue_scores[i].detach().to(s.dtype), s))
        codes.append(sinkhorn_knopp_teacher(s, epsilon, sinkhorn_iterations, keep_last=b, backend=backend))
    return torch.cat(codes)


@torch.no_grad()
def swav_codes(scores: torch.Tensor, n_crops: int, *, queue_scores: Optional[Sequence[torch.Tensor]] = None,
               n_assign: int = 2, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
               backend: Optional[str] = None) -> torch.Tensor:
    """The (n_assign·B, K) codes of the first ``n_assign`` crops: per crop, the Sinkhorn-Knopp
    equipartition of its B rows of ``scores`` (after the queue's ``queue_scores[i]`` rows, when
    given) at temperature ε, the batch's rows kept (:func:`sslkern.sinkhorn_knopp_teacher` with
    ``keep_last=B``). Across ranks (torch.distributed initialized) the equipartition runs over
    every rank's rows, as swav's ``distributed_sinkhorn``. fp32 (fp64 for fp64 scores), no gradient."""
    op = "swav_codes"
    _, n_assign, b = _check_crops(op, scores, n_crops, n_assign)
    _check_queue(op, scores, queue_scores, n_assign)
    epsilon = check_float(op, "epsilon", epsilon, 0.0, None, lo_open=True)
    sinkhorn_iterations = check_int(op, "sinkhorn_iterations", sinkhorn_iterations, 0)
    return _codes(scores, b, queue_scores, n_assign, epsilon, sinkhorn_iterations, backend)


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
    n_crops, n_assign, b = _check_crops(OP, scores, n_crops, n_assign)
    k = scores.shape[1]
    temperature = check_float(OP, "temperature", temperature, 0.0, None, lo_open=True)
    epsilon = check_float(OP, "epsilon", epsilon, 0.0, None, lo_open=True)
    sinkhorn_iterations = check_int(OP, "sinkhorn_iterations", sinkhorn_iterations, 0)
    check_choice(OP, "return_stats", return_stats, (True, False))
    if codes is not None:
        if queue_scores is not None:
            fail(OP, "queue_scores expected None when codes are given (the codes already include the queue)")
        check_tensor(OP, "codes", codes, dtypes=FLOAT_DTYPES, shape=(n_assign * b, k), device=scores.device)
        codes = codes.detach()
    else:
        _check_queue(OP, scores, queue_scores, n_assign)
        codes = _codes(scores, b, queue_scores, n_assign, epsilon, sinkhorn_iterations, backend)
    n_pairs = n_assign * (n_crops - 1)
    # the DINO loss's custom op with the codes as teacher probabilities (no center, no column sum)
    loss, _, _ = torch.ops.sslkern.dino_loss(
        scores.contiguous(), codes.to(acc_dtype(scores)).contiguous(), None, None, 1.0 / (n_pairs * b), temperature,
        epsilon, n_crops, n_assign, True, True, needs_grad(scores), False, backend or "")
    if return_stats:
        return loss, {"loss_frac": loss.detach() / math.log(k), "code_entropy": code_entropy(codes)}
    return loss
