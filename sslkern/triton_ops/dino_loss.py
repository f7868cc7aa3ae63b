"""``dino_loss`` — Triton kernels: column-blocked online logsumexp, then pair dots + gradient.

Two launches (K = 65,536 never fits one block):
  1. ``dino_row_stats_kernel`` — one program per row, walking the row in BLOCK columns
     with the online max / rescaled sum: ``m = max_k x'[k]``, ``logZ = log Σ_k exp((x'[k] − m)·inv)``
     with ``x' = x − c`` for teacher rows (centering) and ``x' = x`` for student rows.
  2. ``dino_pairs_kernel`` — one program per (image b, column block): rebuilds the teacher
     probabilities ``p_q = exp((t_q − c − m_q)·inv_tt − logZ_q)`` of image b on its block,
     and for every student crop v accumulates ``Σ_k p_paired[k]·(s_v[k] − m_v)`` into the loss
     and writes the gradient ``w/τs·(n_v softmax(s_v/τs) − p_paired)``. Partial losses go
     to a (B, n_blocks) buffer summed afterwards (deterministic); the raw teacher column
     sum for the center update is accumulated with (relaxed) atomics, or, when
     ``torch.are_deterministic_algorithms_enabled()``, computed by a separate ``torch.sum``.
Runtime flags (ints) rather than constexprs keep the compiled variants few: the only
constexprs are the block size and the compute dtype. The scalars (scale, 1/τs, 1/τt) are read
from a small cached device buffer, so fp64 inputs keep fp64 temperatures.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def dino_row_stats_kernel(x_ptr, c_ptr, max_ptr, logz_ptr, inv_temp_ptr, K, has_center,
                          COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * K
    inv_temp = tl.load(inv_temp_ptr)
    m = tl.full((), float("-inf"), COMPUTE)
    z = tl.zeros((), COMPUTE)
    n_nan = tl.zeros((), tl.int32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(COMPUTE)
        if has_center:
            x = x - tl.load(c_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        n_nan += tl.sum((x != x).to(tl.int32))
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # online logsumexp: rescale what was summed under the old max. While every column so
        # far is -inf (masked prototypes leading the row) m_new is -inf too: shift by 0, not
        # by -inf (-inf - -inf is NaN), so those columns add exp(-inf) = 0 and z stays 0.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp((m - m_shift) * inv_temp) + tl.sum(tl.exp((x - m_shift) * inv_temp), axis=0)
        m = m_new
    nan = float("nan")
    tl.store(max_ptr + row, tl.where(n_nan > 0, nan, m))
    tl.store(logz_ptr + row, tl.where(n_nan > 0, nan, tl.log(z)))


@triton.jit
def dino_pairs_kernel(s_ptr, t_ptr, c_ptr, w_ptr, s_max_ptr, s_logz_ptr, t_max_ptr, t_logz_ptr,
                      grad_ptr, partial_ptr, colsum_ptr, params_ptr,
                      B, K, V, T,
                      skip_same_view, teacher_is_probs, has_weights, compute_grad, center_sum,
                      COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)  # images / tokens on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    j = tl.program_id(1)
    n_blocks = tl.num_programs(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    c = tl.zeros((BLOCK,), COMPUTE)
    if teacher_is_probs == 0:
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    # scalars travel in a COMPUTE-dtype buffer (fp64 stays fp64): scale, 1/τs, 1/τt
    w = tl.load(params_ptr)
    inv_ts = tl.load(params_ptr + 1)
    inv_tt = tl.load(params_ptr + 2)
    if has_weights:
        w = w * tl.load(w_ptr + b).to(COMPUTE)
    # Sum of every teacher crop's probabilities on this block (+ raw column sum).
    p_all = tl.zeros((BLOCK,), COMPUTE)
    csum = tl.zeros((BLOCK,), COMPUTE)
    for q in range(0, T):
        row = (q * B + b).to(tl.int64)
        t = tl.load(t_ptr + row * K + offs, mask=mask, other=0.0).to(COMPUTE)
        csum += t
        if teacher_is_probs:
            p = t
        else:
            p = tl.exp((t - c - tl.load(t_max_ptr + row)) * inv_tt - tl.load(t_logz_ptr + row))
        p_all += tl.where(mask, p, 0.0)
    if center_sum:
        tl.atomic_add(colsum_ptr + offs, csum, mask=mask, sem="relaxed")
    acc = tl.zeros((), COMPUTE)
    for v in range(0, V):
        n_v = T
        p_pair = p_all
        if skip_same_view:
            if v < T:
                # every teacher crop but v itself, summed afresh (not p_all − p_v: exact, and
                # a NaN in teacher crop v stays out of student crop v, as in the reference)
                n_v = T - 1
                p_pair = tl.zeros((BLOCK,), COMPUTE)
                for q in range(0, T):
                    if q != v:
                        row_q = (q * B + b).to(tl.int64)
                        t = tl.load(t_ptr + row_q * K + offs, mask=mask, other=0.0).to(COMPUTE)
                        if teacher_is_probs:
                            p = t
                        else:
                            p = tl.exp((t - c - tl.load(t_max_ptr + row_q)) * inv_tt - tl.load(t_logz_ptr + row_q))
                        p_pair += tl.where(mask, p, 0.0)
        row = (v * B + b).to(tl.int64)
        s = tl.load(s_ptr + row * K + offs, mask=mask, other=0.0).to(COMPUTE)
        m = tl.load(s_max_ptr + row)
        lz = tl.load(s_logz_ptr + row)
        dot = tl.sum(tl.where(mask, p_pair * (s - m), 0.0), axis=0)
        lz_term = tl.where(j == 0, n_v * lz, 0.0)  # log Z_v counted once per pair per row
        acc += w * (lz_term - dot * inv_ts)
        if compute_grad:
            sm = tl.exp((s - m) * inv_ts - lz)
            g = (w * inv_ts) * (n_v * sm - p_pair)
            tl.store(grad_ptr + row * K + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + b * n_blocks + j, acc)


def _stats_block(K: int) -> int:
    return 1024 if K <= 8192 else 4096


def _pairs_block(K: int) -> int:
    return 256 if K <= 2048 else 1024


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4


_param_cache: OrderedDict = OrderedDict()


def _params(scale: float, student_temp: float, teacher_temp: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[scale, 1/τs, 1/τt] on the device, cached (the values change once per epoch at most),
    so a training step does no host-to-device copy."""
    key = (scale, student_temp, teacher_temp, dtype, str(device))
    t = _param_cache.get(key)
    if t is None:
        t = _param_cache[key] = torch.tensor([scale, 1.0 / student_temp, 1.0 / teacher_temp], dtype=dtype).to(device)
        while len(_param_cache) > 64:
            _param_cache.popitem(last=False)
    _param_cache.move_to_end(key)
    return t


def dino_loss_triton(student, teacher, center, weights, scale, student_temp, teacher_temp, n_student_views,
                     n_teacher_views, skip_same_view, teacher_is_probs, compute_grad, center_sum):
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    COMPUTE = _TL[acc]
    dev = student.device
    V, T = int(n_student_views), int(n_teacher_views)
    K = student.shape[1]
    B = student.shape[0] // V
    student = student.contiguous()
    teacher = teacher.contiguous()
    dummy = torch.zeros(1, dtype=acc, device=dev)
    c = center.reshape(-1).to(acc).contiguous() if (center is not None and not teacher_is_probs) else dummy
    w = weights.to(acc).contiguous() if weights is not None else dummy
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    csum = torch.zeros(K if center_sum else 0, dtype=acc, device=dev)
    if B == 0 or K == 0:
        return torch.zeros((), dtype=acc, device=dev), grad, csum
    params = _params(float(scale), float(student_temp), float(teacher_temp), acc, dev)
    s_max = torch.empty(V * B, dtype=acc, device=dev)
    s_logz = torch.empty_like(s_max)
    sb = _stats_block(K)
    dino_row_stats_kernel[(V * B,)](student, dummy, s_max, s_logz, params[1:], K, 0,
                                    COMPUTE=COMPUTE, BLOCK=sb, num_warps=_warps(sb))
    if teacher_is_probs:
        t_max, t_logz = dummy, dummy
    else:
        t_max = torch.empty(T * B, dtype=acc, device=dev)
        t_logz = torch.empty_like(t_max)
        dino_row_stats_kernel[(T * B,)](teacher, c, t_max, t_logz, params[2:], K, 1,
                                        COMPUTE=COMPUTE, BLOCK=sb, num_warps=_warps(sb))
    # The fused raw column sum adds B programs' partial sums with atomics (order varies from run
    # to run); in deterministic mode it is a separate torch.sum over the teacher instead.
    fused_sum = bool(center_sum) and not torch.are_deterministic_algorithms_enabled()
    pb = _pairs_block(K)
    n_blocks = triton.cdiv(K, pb)
    partial = torch.empty(B, n_blocks, dtype=acc, device=dev)
    dino_pairs_kernel[(B, n_blocks)](
        student, teacher, c, w, s_max, s_logz, t_max, t_logz,
        grad if compute_grad else dummy, partial, csum if fused_sum else dummy, params,
        B, K, V, T,
        int(skip_same_view), int(teacher_is_probs), int(weights is not None), int(compute_grad), int(fused_sum),
        COMPUTE=COMPUTE, BLOCK=pb, num_warps=_warps(pb))
    if center_sum and not fused_sum:
        csum = teacher.to(acc).sum(0)
    return partial.sum(), grad, csum


# K = 65,536 / 8,192 at the benchmark sizes: a real launch specialises it as 16-divisible.
AOT_DIVISIBLE = ("K",)
# Every configuration the launchers can pick (block choices × every student / teacher
# storage dtype pair: the teacher may differ, e.g. fp32 Sinkhorn probabilities with a bf16
# student), for the GPU report.
_DT = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}
_PAIRS = [(sn, tn) for sn in _DT for tn in _DT]


def _compute(sn, tn):
    return "fp64" if "fp64" in (sn, tn) else "fp32"


AOT_CONFIGS = [
    dict(name=f"dino_row_stats_kernel x={xn} compute={cn} BLOCK={blk}", kernel=dino_row_stats_kernel,
         signature={"x_ptr": _DT[xn], "c_ptr": _DT[cn], "max_ptr": _DT[cn], "logz_ptr": _DT[cn],
                    "inv_temp_ptr": _DT[cn], "K": "i32", "has_center": "i32"},
         constexprs={"COMPUTE": tl.float64 if cn == "fp64" else tl.float32, "BLOCK": blk},
         num_warps=_warps(blk), num_stages=3)
    for xn, cn in [(xn, cn) for xn in _DT for cn in ("fp32", "fp64") if cn == "fp64" or xn != "fp64"]
    for blk in (1024, 4096)
] + [
    dict(name=f"dino_pairs_kernel s={sn} t={tn} BLOCK={blk}", kernel=dino_pairs_kernel,
         signature={"s_ptr": _DT[sn], "t_ptr": _DT[tn], "c_ptr": _DT[_compute(sn, tn)], "w_ptr": _DT[_compute(sn, tn)],
                    "s_max_ptr": _DT[_compute(sn, tn)], "s_logz_ptr": _DT[_compute(sn, tn)],
                    "t_max_ptr": _DT[_compute(sn, tn)], "t_logz_ptr": _DT[_compute(sn, tn)],
                    "grad_ptr": _DT[sn], "partial_ptr": _DT[_compute(sn, tn)], "colsum_ptr": _DT[_compute(sn, tn)],
                    "params_ptr": _DT[_compute(sn, tn)],
                    "B": "i32", "K": "i32", "V": "i32", "T": "i32", "skip_same_view": "i32", "teacher_is_probs": "i32", "has_weights": "i32",
                    "compute_grad": "i32", "center_sum": "i32"},
         constexprs={"COMPUTE": tl.float64 if _compute(sn, tn) == "fp64" else tl.float32, "BLOCK": blk},
         num_warps=_warps(blk), num_stages=3)
    for sn, tn in _PAIRS
    for blk in (256, 1024)
]
