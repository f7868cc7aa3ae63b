"""``info_nce_loss`` — fused InfoNCE / NT-Xent contrastive loss.

For rows ``q`` (N, D), columns ``k`` (M, D), temperature τ, one positive column ``pos[i]``
per row and optionally one excluded column ``exclude[i]`` per row:

    L = 1/N Σ_i [ logsumexp_{j ≠ exclude[i]} (q_i·k_j/τ) − q_i·k_pos[i]/τ ]

with the gradients ``dq = G·K``, ``dk = Gᵀ·Q``, ``G = (P − onehot(pos))/(N·τ)``,
``P = softmax`` of the logits row (excluded column: 0). Tiled like flash attention: the
(N, M) logits, probabilities and their gradient are never stored; a task holds one block of
rows at a time. Extra memory is O((N + M)·D): the gradients, the normalized inputs, and
per-thread row blocks.

One custom op, ``torch.ops.sslkern.info_nce_loss(q, k, pos, exclude, inv_temp, grad_q, grad_k,
tied, rince_q, rince_lam, backend) -> (loss, dq, dk)``: the gradients of the loss are computed in the same
call when the inputs require grad (the CPU kernel shares one logits block between the loss
and both gradients: three tile GEMMs in all, as many as the eager code, where a separate
backward would recompute the logits), and backward rescales them by the incoming gradient
(``register_saved_gradients``, as ``dino_loss``).

``tied=True`` (NT-Xent: ``k`` is ``q``, the 2n views; the kernels read the columns from ``q``
and check only ``k``'s shape): ``dq`` is the whole gradient ``G·Z + Gᵀ·Z`` and ``dk`` is empty. The CPU kernel then uses the symmetry of the logits: it
forms each (I, J ≥ I) tile once per pass (row statistics, then gradient), two tile GEMMs'
worth of N²·D products in all instead of three; the other backends compute ``dq + dk``.

``rince_q > 0`` (RINCE, Chuang et al. 2022, chingyaoc/RINCE): the row loss is
``ℓ_i = ((λ·Z_i)^q − exp(q·s_i,pos))/q`` with ``Z_i = Σ_{j ≠ exclude[i]} exp(s_ij)`` (the positive
included), computed in the log domain from the row's logsumexp, ``lse_i = log Z_i``, as
``exp(q·s_pos)·expm1(q·(log λ + lse_i − s_pos))/q`` (no exp of a logit outside the softmax: only
q-scaled quantities are exponentiated; expm1 keeps small q exact). Its gradient has InfoNCE's shape with
per-row weights: ``G_ij = (w_i·P_ij − u_i·onehot(pos)_ij)·inv_temp/N``, ``w_i = (λ·Z_i)^q``,
``u_i = exp(q·s_pos)``; the kernels take ``w_i·P_ij = exp(s_ij − (lse_i − log w_i))``, i.e. the
InfoNCE softmax with a shifted row statistic. ``rince_q = 0`` is the limit q → 0: InfoNCE
plus ``log λ`` (``rince_lam = 1``: InfoNCE).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._backend import Dispatch, standard_impls
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_float, check_int, check_tensor, dtype_name, fail
from ..reference.info_nce_loss import nt_xent_indices
from ._common import acc_dtype, check_index_values, needs_grad, register_saved_gradients

OP = "info_nce_loss"


def info_nce_loss_eager(q, k, pos, exclude, inv_temp, grad_q, grad_k, tied, rince_q, rince_lam):
    """The custom op's contract in eager PyTorch (the ``reference`` backend; materializes the
    logits).

    ``tied``: ``k`` is ``q`` itself (NT-Xent over the 2n views); ``dq`` is then the whole
    gradient ``G·Z + Gᵀ·Z`` and ``dk`` is empty. ``rince_q > 0``: RINCE in the log domain (the
    module docstring).
    """
    acc = acc_dtype(q)
    N, M = q.shape[0], k.shape[0]
    qa, ka = q.to(acc), k.to(acc)
    s = (qa @ ka.t()) * inv_temp
    if exclude is not None:
        s = s.masked_fill(torch.arange(M, device=q.device)[None, :] == exclude[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=1)
    rows = torch.arange(N, device=q.device)
    s_pos = s[rows, pos]
    log_lam = math.log(rince_lam)
    if rince_q > 0:
        loss = (torch.exp(rince_q * s_pos) * torch.expm1(rince_q * (log_lam + lse - s_pos)) / rince_q).mean()
        shift = lse - rince_q * (log_lam + lse)  # exp(s − shift) = w·P
        pos_weight = torch.exp(rince_q * s_pos)
    else:
        loss = (lse - s_pos).mean() + log_lam
        shift, pos_weight = lse, 1
    # Custom-op bodies run below autograd: the gradient is written out.
    g = torch.exp(s - shift[:, None])
    g[rows, pos] -= pos_weight
    g = g * (inv_temp / N)
    if tied:
        dq = (g @ ka + g.t() @ qa).to(q.dtype) if grad_q else q.new_empty(0)
        return loss, dq, k.new_empty(0)
    dq = (g @ ka).to(q.dtype) if grad_q else q.new_empty(0)
    dk = (g.t() @ qa).to(k.dtype) if grad_k else k.new_empty(0)
    return loss, dq, dk


dispatch = Dispatch(OP, standard_impls(OP, info_nce_loss_eager), checks_indices=("cpu",))


@torch.library.custom_op("sslkern::info_nce_loss", mutates_args=())
def _info_nce_loss_op(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, exclude: Optional[torch.Tensor],
                      inv_temp: float, grad_q: bool, grad_k: bool, tied: bool, rince_q: float,
                      rince_lam: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if tied and (k.shape != q.shape or grad_q != grad_k):
        fail(OP, f"tied=True expected k to be q itself and grad_q == grad_k, got shapes {tuple(q.shape)}, "
                 f"{tuple(k.shape)} and grad_q={grad_q}, grad_k={grad_k}")
    return dispatch(q.device, backend)(q, k, pos, exclude, inv_temp, grad_q, grad_k, tied, rince_q, rince_lam)


@_info_nce_loss_op.register_fake
def _(q, k, pos, exclude, inv_temp, grad_q, grad_k, tied, rince_q, rince_lam, backend):
    loss = q.new_empty((), dtype=acc_dtype(q))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if grad_q else q.new_empty(0)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if grad_k and not tied else k.new_empty(0)
    return loss, dq, dk


# q (input 0) gets dq (output 1), k (input 1) gets dk (output 2). Tied (k is q): dq is the whole
# gradient, given to the q argument; k's gets None, so autograd's sum over the two uses of the
# one tensor is dq.
register_saved_gradients(_info_nce_loss_op, OP, lambda inputs: {
    **({0: 1} if inputs[5] else {}), **({1: 2} if inputs[6] and not inputs[7] else {})})


def _check_index_values(pos: torch.Tensor, exclude: Optional[torch.Tensor], m: int) -> None:
    """pos in [0, M), exclude in [-1, M) and never the positive: one host sync when all hold."""
    if exclude is None:
        check_index_values(OP, "pos", pos, m, meaning=" (column indices of k)")
        return
    bad_exclude = (exclude < -1) | (exclude >= m) | (exclude == pos)
    if check_index_values(OP, "pos", pos, m, meaning=" (column indices of k)", also=bad_exclude):
        check_index_values(OP, "exclude", exclude, m, lo=-1, meaning=" (column indices of k, -1 = none)")
        i = int((exclude == pos).nonzero()[0, 0])
        fail(OP, f"exclude expected a column other than the positive, got exclude[{i}] = pos[{i}] = {int(pos[i])}")


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def info_nce_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: float = 0.1,
    *,
    normalize: bool = True,
    pos: Optional[torch.Tensor] = None,
    pos_offset: int = 0,
    exclude: Optional[torch.Tensor] = None,
    nt_xent: bool = False,
    rince: Optional[tuple[float, float]] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""InfoNCE contrastive loss, fused: ``mean_i [logsumexp_j(q̂_i·k̂_j/τ) − q̂_i·k̂_pos(i)/τ]``.

    Forms:
      * default (MoCo v3 ``contrastive_loss`` / ``ctr_loss``): rows ``q`` (N, D) against the
        columns ``k`` (M, D); row i's positive is ``k[pos[i]]``, by default ``k[i + pos_offset]``
        (MoCo v3 across ranks: ``k`` = the keys all-gathered from every rank, M = world·N,
        ``pos_offset = rank·N``). MoCo v3 multiplies the cross-entropy by ``2·τ``: its
        ``ctr_loss(q, k)`` equals ``2·τ·info_nce_loss(q, k, τ, pos_offset=rank·N)``, and its
        symmetrized loss is the sum of two calls, ``(q1, k2)`` and ``(q2, k1)``.
      * ``nt_xent=True`` (SimCLR NT-Xent, lightly ``NTXentLoss``; the symmetric
        form): ``q`` and ``k`` are the two views (n, D) of one batch; the 2n views
        ``cat(q, k)`` are both the rows and the columns, each view's positive is the other
        view of its image, its self-similarity is left out of the denominator, and the mean
        runs over the 2n rows. (Cross-rank NT-Xent: pass the local ``cat`` as ``q``, the
        gathered ``cat`` as ``k`` and build ``pos`` / ``exclude`` — see docs/ops/info_nce_loss.md.)

    Args:
        q: (N, D) rows (queries); fp32, bf16, fp16 or fp64.
        k: (M, D) columns (keys); same dtype and device as ``q``. May be ``q`` itself.
        temperature: τ > 0.
        normalize: L2-normalize the rows of ``q`` and ``k`` first (``F.normalize``, eps
            1e-12, as MoCo v3 and lightly do), inside this function with differentiable
            torch ops. ``False``: the caller passes normalized (or any) embeddings.
        pos: optional (N,) integer column index of each row's positive, in [0, M).
        pos_offset: with ``pos=None``, ``pos[i] = i + pos_offset`` (needs N + pos_offset ≤ M).
        exclude: optional (N,) integer column left out of row i's logsumexp (−1 = none;
            never the positive).
        nt_xent: the SimCLR form above (``pos``, ``pos_offset``, ``exclude`` must be unset).
        rince: ``(q, λ)``, q ≥ 0 and λ > 0: RINCE (Chuang et al. 2022, chingyaoc/RINCE) instead
            of InfoNCE, over the same logits and the same denominator:
            ``mean_i [((λ·Σ_{j ≠ exclude[i]} exp(s_ij))^q − exp(q·s_i,pos))/q]``, the positive
            inside the sum. MoCo v3 form (chingyaoc/RINCE ``moco-v3/moco/builder.py``, q 0.6,
            λ 0.01 there): the default rows/columns form, × 2τ by the caller as for InfoNCE.
            SimCLR form (``simclr/simclr_module.py: sym_loss``, q 0.1, λ 0.01, τ 0.1 there):
            ``nt_xent=True``. Computed in the log domain: the public code's ``exp(s)``
            overflows once a logit passes 88.7 (fp32); here only ``q·s_pos`` and
            ``q·(log λ + logsumexp)`` are exponentiated. q → 0 gives InfoNCE + log λ (``q = 0``
            is that limit).
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Returns:
        the loss, a 0-dim fp32 tensor (fp64 for fp64 inputs). Differentiable w.r.t. ``q`` and
        ``k``: when either requires grad, its gradient is computed in the same call (the
        logits are formed once) and backward rescales it. Arithmetic is fp32 (fp64 for fp64);
        fp16 / bf16 gradients are rounded to the input dtype once.

    Index values of a given ``pos`` / ``exclude`` are checked here, with one reduction on the
    device and one host sync (an ``IndexError`` naming the argument); the C++ kernel checks
    every index itself, so CPU calls skip that pass. NaN in a row of ``q`` gives a NaN loss; NaN anywhere makes
    the affected gradient rows NaN, as in the eager code.
    """
    check_tensor(OP, "q", q, dtypes=FLOAT_DTYPES, ndim=2)
    device = q.device
    check_tensor(OP, "k", k, dtypes=FLOAT_DTYPES, ndim=2, device=device)
    if k.dtype != q.dtype:
        fail(OP, f"k expected dtype {dtype_name(q.dtype)} (q's dtype), got {dtype_name(k.dtype)}", TypeError)
    N, D = q.shape
    M = k.shape[0]
    if k.shape[1] != D:
        fail(OP, f"k expected {D} columns (q's D), got shape {tuple(k.shape)}")
    if N == 0 or M == 0 or D == 0:
        fail(OP, f"q and k expected non-empty (N, D) and (M, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    temperature = check_float(OP, "temperature", temperature, 0.0, None, lo_open=True)
    pos_offset = check_int(OP, "pos_offset", pos_offset)
    check_choice(OP, "normalize", normalize, (True, False))
    check_choice(OP, "nt_xent", nt_xent, (True, False))
    rince_q, rince_lam = _check_rince(rince)
    if nt_xent:
        if pos is not None or exclude is not None or pos_offset != 0:
            fail(OP, "nt_xent=True builds its own positives and exclusions: pos, pos_offset and exclude "
                     f"expected unset, got pos={'set' if pos is not None else None}, pos_offset={pos_offset}, "
                     f"exclude={'set' if exclude is not None else None}")
        if k.shape != q.shape:
            fail(OP, f"k expected shape {tuple(q.shape)} with nt_xent=True (the second view of q's batch), "
                     f"got {tuple(k.shape)}")
    else:
        user_indices = pos is not None or exclude is not None
        if pos is not None:
            if pos_offset != 0:
                fail(OP, f"pos_offset expected 0 when pos is given, got {pos_offset}")
            check_tensor(OP, "pos", pos, dtypes=INDEX_DTYPES, shape=(N,), device=device)
            pos = pos.to(torch.int64).contiguous()
        else:
            if pos_offset < 0 or N + pos_offset > M:
                fail(OP, f"pos_offset expected in [0, M - N] = [0, {M - N}] (positives k[i + pos_offset] for "
                         f"N = {N} rows, M = {M} columns), got {pos_offset}")
            pos = torch.arange(pos_offset, pos_offset + N, device=device)
        if exclude is not None:
            check_tensor(OP, "exclude", exclude, dtypes=INDEX_DTYPES, shape=(N,), device=device)
            exclude = exclude.to(torch.int64).contiguous()
        if user_indices and dispatch.needs_index_check(device, backend):
            _check_index_values(pos, exclude, M)

    if normalize:
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
    if nt_xent:
        # the 2n views are both the rows and the columns: the tied form (symmetric logits,
        # one gradient; see the op's docstring)
        z = torch.cat([q, k], dim=0)
        pos, exclude = nt_xent_indices(N, device)
        loss, _, _ = torch.ops.sslkern.info_nce_loss(z, z, pos, exclude, 1.0 / temperature, needs_grad(z),
                                                     needs_grad(z), True, rince_q, rince_lam, backend or "")
        return loss
    q, k = q.contiguous(), k.contiguous()
    loss, _, _ = torch.ops.sslkern.info_nce_loss(q, k, pos, exclude, 1.0 / temperature, needs_grad(q),
                                                 needs_grad(k), False, rince_q, rince_lam, backend or "")
    return loss


def _check_rince(rince) -> tuple[float, float]:
    """(rince_q, rince_lam) of the custom op: (0, 1) = InfoNCE."""
    if rince is None:
        return 0.0, 1.0
    if not isinstance(rince, (tuple, list)) or len(rince) != 2:
        fail(OP, f"rince expected a pair (q, lambda), got {rince!r}", TypeError)
    rince_q = check_float(OP, "rince q", rince[0], 0.0, None)
    rince_lam = check_float(OP, "rince lambda", rince[1], 0.0, None, lo_open=True)
    return rince_q, rince_lam
