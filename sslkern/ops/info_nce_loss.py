"""``info_nce_loss`` — fused InfoNCE / NT-Xent contrastive loss (issue #14).

For rows ``q`` (N, D), columns ``k`` (M, D), temperature τ, one positive column ``pos[i]``
per row and optionally one excluded column ``exclude[i]`` per row:

    L = 1/N Σ_i [ logsumexp_{j ≠ exclude[i]} (q_i·k_j/τ) − q_i·k_pos[i]/τ ]

with the gradients ``dq = G·K``, ``dk = Gᵀ·Q``, ``G = (P − onehot(pos))/(N·τ)``,
``P = softmax`` of the logits row (excluded column: 0). Tiled like flash attention: the
(N, M) logits, probabilities and their gradient are never stored; a task holds one block of
rows at a time. Extra memory is O((N + M)·D): the gradients, the normalized inputs, and
per-thread row blocks.

One custom op, ``torch.ops.sslkern.info_nce_loss(q, k, pos, exclude, inv_temp, grad_q, grad_k,
validate, backend, tied=False, rince_q=0.0, rince_lam=1.0) -> (loss, dq, dk)``: the gradients of the loss are computed in the same
call when the inputs require grad (the CPU kernel shares one logits block between the loss
and both gradients: three tile GEMMs in all, as many as the eager code, where a separate
backward would recompute the logits), and backward rescales them by the incoming gradient
(Liger cross-entropy style, as ``dino_loss``).

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

from .._backend import Dispatch, ext_op, module_attr
from .._checks import check_range, check_tensor, fail
from ..reference.info_nce_loss import nt_xent_indices

OP = "info_nce_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int64, torch.int32)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_index_values(name: str, idx: torch.Tensor, m: int, allow_none: bool) -> None:
    """Host-side value check (one reduction and a sync): used by the reference and Triton backends."""
    lo = -1 if allow_none else 0
    bad = (idx < lo) | (idx >= m)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        fail(OP, f"{name} expected values in [{lo}, {m}) (column indices of k{', -1 = none' if allow_none else ''}), "
                 f"got {name}[{i}] = {int(idx[i])}", IndexError)


def check_indices(pos: torch.Tensor, exclude: Optional[torch.Tensor], m: int) -> None:
    _check_index_values("pos", pos, m, False)
    if exclude is not None:
        _check_index_values("exclude", exclude, m, True)
        same = exclude == pos
        if bool(same.any()):
            i = int(same.nonzero()[0, 0])
            fail(OP, f"exclude expected a column other than the positive, got exclude[{i}] = pos[{i}] = {int(pos[i])}")


def _reference_impl(q, k, pos, exclude, inv_temp, grad_q, grad_k, validate, tied=False, rince_q=0.0, rince_lam=1.0):
    """The custom op's contract in eager PyTorch (materializes the logits; the oracle backend).

    ``tied``: ``k`` is ``q`` itself (NT-Xent over the 2n views); ``dq`` is then the whole
    gradient ``G·Z + Gᵀ·Z`` and ``dk`` is empty.
    """
    if validate:
        check_indices(pos, exclude, k.shape[0])
    acc = _acc(q.dtype)
    N, M = q.shape[0], k.shape[0]
    qa, ka = q.to(acc), k.to(acc)
    s = (qa @ ka.t()) * inv_temp
    if exclude is not None:
        s = s.masked_fill(torch.arange(M, device=q.device)[None, :] == exclude[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=1)
    rows = torch.arange(N, device=q.device)
    s_pos = s[rows, pos]
    log_lam = math.log(rince_lam)
    if rince_q > 0:  # RINCE in the log domain (the module docstring)
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


dispatch = Dispatch(
    OP,
    {
        "reference": lambda: _reference_impl,
        "cpu": ext_op("info_nce_loss_cpu"),
        "triton": module_attr("sslkern.triton_ops.info_nce_loss", "info_nce_loss_triton"),
    },
)


@torch.library.custom_op("sslkern::info_nce_loss", mutates_args=())
def _info_nce_loss_op(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, exclude: Optional[torch.Tensor],
                      inv_temp: float, grad_q: bool, grad_k: bool, validate: bool,
                      backend: str, tied: bool = False, rince_q: float = 0.0,
                      rince_lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if tied and (k.shape != q.shape or grad_q != grad_k):
        fail(OP, f"tied=True expected k to be q itself and grad_q == grad_k, got shapes {tuple(q.shape)}, "
                 f"{tuple(k.shape)} and grad_q={grad_q}, grad_k={grad_k}")
    loss, dq, dk = dispatch(q.device, backend)(q, k, pos, exclude, inv_temp, grad_q, grad_k, validate, tied,
                                               rince_q, rince_lam)
    return loss, dq, dk


@_info_nce_loss_op.register_fake
def _(q, k, pos, exclude, inv_temp, grad_q, grad_k, validate, backend, tied=False, rince_q=0.0, rince_lam=1.0):
    loss = q.new_empty((), dtype=_acc(q.dtype))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if grad_q else q.new_empty(0)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if grad_k and not tied else k.new_empty(0)
    return loss, dq, dk


def _setup_context(ctx, inputs, output):
    # tied (k is q): dq is the whole gradient, given to the q argument; k's gets None, so
    # autograd's sum over the two uses of the one tensor is dq
    tied = len(inputs) > 9 and inputs[9]
    ctx.grad_q, ctx.grad_k = inputs[5], inputs[6] and not tied
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _is_eager_cpu_scalar(x: torch.Tensor) -> bool:
    """A real CPU tensor (not traced by torch.compile / AOT autograd): its value can be read."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch._guards.detect_fake_mode((x,)) is None)


def _backward(ctx, g_loss, g_dq, g_dk):
    dq, dk = ctx.saved_tensors
    none = (None,) * 10
    if g_loss is None:
        return (None, None) + none
    if _is_eager_cpu_scalar(g_loss) and float(g_loss) == 1.0:
        # loss.backward(): the gradients computed with the loss are the answer, no copy
        return (dq if ctx.grad_q else None, dk if ctx.grad_k else None) + none
    return ((dq * g_loss.to(dq.dtype)) if ctx.grad_q else None,
            (dk * g_loss.to(dk.dtype)) if ctx.grad_k else None) + none


_info_nce_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def _needs_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


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
    backend: Optional[str] = None,
    rince: Optional[tuple[float, float]] = None,
) -> torch.Tensor:
    r"""InfoNCE contrastive loss, fused: ``mean_i [logsumexp_j(q̂_i·k̂_j/τ) − q̂_i·k̂_pos(i)/τ]``.

    Forms:
      * default (MoCo v3 ``contrastive_loss`` / ``ctr_loss``): rows ``q`` (N, D) against the
        columns ``k`` (M, D); row i's positive is ``k[pos[i]]``, by default ``k[i + pos_offset]``
        (MoCo v3 across ranks: ``k`` = the keys all-gathered from every rank, M = world·N,
        ``pos_offset = rank·N``). MoCo v3 multiplies the cross-entropy by ``2·τ``: its
        ``ctr_loss(q, k)`` equals ``2·τ·info_nce_loss(q, k, τ, pos_offset=rank·N)``, and its
        symmetrized loss is the sum of two calls, ``(q1, k2)`` and ``(q2, k1)``.
      * ``nt_xent=True`` (SimCLR NT-Xent, lightly ``NTXentLoss``; the issue's "symmetric
        form"): ``q`` and ``k`` are the two views (n, D) of one batch; the 2n views
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
        pos: optional (N,) int64/int32 column index of each row's positive, in [0, M).
        pos_offset: with ``pos=None``, ``pos[i] = i + pos_offset`` (needs N + pos_offset ≤ M).
        exclude: optional (N,) int64/int32 column left out of row i's logsumexp (−1 = none;
            never the positive).
        nt_xent: the SimCLR form above (``pos``, ``pos_offset``, ``exclude`` must be unset).
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).
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

    Returns:
        the loss, a 0-dim fp32 tensor (fp64 for fp64 inputs). Differentiable w.r.t. ``q`` and
        ``k``: when either requires grad, its gradient is computed in the same call (the
        logits are formed once) and backward rescales it. Arithmetic is fp32 (fp64 for fp64);
        fp16 / bf16 gradients are rounded to the input dtype once.

    Index values are checked where they are read: the C++ kernel checks every index; the
    reference and Triton backends check user-given ``pos`` / ``exclude`` with one reduction
    on the device (a host sync). NaN in a row of ``q`` gives a NaN loss; NaN anywhere makes
    the affected gradient rows NaN, as in the eager code.
    """
    check_tensor(OP, "q", q, dtypes=_FLOATS, ndim=2)
    device = q.device
    check_tensor(OP, "k", k, dtypes=_FLOATS, ndim=2, device=device)
    if k.dtype != q.dtype:
        fail(OP, f"k expected dtype {str(q.dtype).replace('torch.', '')} (q's dtype), "
                 f"got {str(k.dtype).replace('torch.', '')}", TypeError)
    N, D = q.shape
    M = k.shape[0]
    if k.shape[1] != D:
        fail(OP, f"k expected {D} columns (q's D), got shape {tuple(k.shape)}")
    if N == 0 or M == 0 or D == 0:
        fail(OP, f"q and k expected non-empty (N, D) and (M, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if isinstance(temperature, torch.Tensor):
        fail(OP, "temperature expected a Python float, got a Tensor", TypeError)
    check_range(OP, "temperature", float(temperature), 0.0, None, lo_open=True)
    if not float(temperature) < float("inf"):
        fail(OP, f"temperature expected a finite value, got {temperature}")
    if not isinstance(pos_offset, int) or isinstance(pos_offset, bool):
        fail(OP, f"pos_offset expected an int, got {type(pos_offset).__name__}", TypeError)
    rince_q, rince_lam = _check_rince(rince)
    validate = False
    if nt_xent:
        if pos is not None or exclude is not None or pos_offset != 0:
            fail(OP, "nt_xent=True builds its own positives and exclusions: pos, pos_offset and exclude "
                     f"expected unset, got pos={'set' if pos is not None else None}, pos_offset={pos_offset}, "
                     f"exclude={'set' if exclude is not None else None}")
        if k.shape != q.shape:
            fail(OP, f"k expected shape {tuple(q.shape)} with nt_xent=True (the second view of q's batch), "
                     f"got {tuple(k.shape)}")
    else:
        if pos is not None:
            if pos_offset != 0:
                fail(OP, f"pos_offset expected 0 when pos is given, got {pos_offset}")
            check_tensor(OP, "pos", pos, dtypes=_INTS, shape=(N,), device=device)
            pos = pos.to(torch.int64).contiguous()
            validate = True
        else:
            if pos_offset < 0 or N + pos_offset > M:
                fail(OP, f"pos_offset expected in [0, M - N] = [0, {M - N}] (positives k[i + pos_offset] for "
                         f"N = {N} rows, M = {M} columns), got {pos_offset}")
            pos = torch.arange(pos_offset, pos_offset + N, device=device)
        if exclude is not None:
            check_tensor(OP, "exclude", exclude, dtypes=_INTS, shape=(N,), device=device)
            exclude = exclude.to(torch.int64).contiguous()
            validate = True

    if normalize:
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
    if nt_xent:
        # the 2n views are both the rows and the columns: the tied form (symmetric logits,
        # one gradient; see the op's docstring)
        z = torch.cat([q, k], dim=0)
        pos, exclude = nt_xent_indices(N, device)
        loss, _, _ = torch.ops.sslkern.info_nce_loss(z, z, pos, exclude, 1.0 / float(temperature), _needs_grad(z),
                                                     _needs_grad(z), validate, backend or "", True, rince_q, rince_lam)
        return loss
    q, k = q.contiguous(), k.contiguous()
    loss, _, _ = torch.ops.sslkern.info_nce_loss(q, k, pos, exclude, 1.0 / float(temperature), _needs_grad(q),
                                                 _needs_grad(k), validate, backend or "", False, rince_q, rince_lam)
    return loss


def _check_rince(rince) -> tuple[float, float]:
    """(rince_q, rince_lam) of the custom op: (0, 1) = InfoNCE."""
    if rince is None:
        return 0.0, 1.0
    if not isinstance(rince, (tuple, list)) or len(rince) != 2:
        fail(OP, f"rince expected a pair (q, lambda), got {rince!r}", TypeError)
    vals = []
    for name, v in zip(("q", "lambda"), rince):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail(OP, f"rince expected Python numbers (q, lambda), got {name} = {v!r}", TypeError)
        if not math.isfinite(v):
            fail(OP, f"rince expected a finite {name}, got {v}")
        vals.append(float(v))
    if vals[0] < 0:
        fail(OP, f"rince expected q >= 0, got q = {vals[0]}")
    if vals[1] <= 0:
        fail(OP, f"rince expected lambda > 0, got lambda = {vals[1]}")
    return vals[0], vals[1]
