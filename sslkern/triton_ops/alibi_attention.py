"""``alibi_attention`` — flash attention with an in-kernel ALiBi bias, Triton kernels.

Forward (one program per (batch·head, query block); B·H on grid axis 0): scores ``scale·q·kᵀ`` for one key
block at a time plus the bias ``−slope·dist(x_i, x_j)`` computed from the tokens'
coordinates (zero for prefix tokens), folded in with the online softmax (running max and
sum per row; the accumulator is rescaled by ``2^(m_old − m_new)`` when the max grows).
Exponentials are base 2 with ``log2 e`` folded into the scale and slope. Stores the output
and the natural-log row log-sum-exp.

Backward (FlashAttention-2 recomputation, no atomics): a preprocess kernel computes
``Δ_i = Σ_d dO·O``; one kernel per key block accumulates dK, dV and the slope gradient
partial ``Σ dS·(−dist)`` over all query blocks; one kernel per query block accumulates dQ.
``P = exp(scale·S + bias − lse)`` is recomputed from the stored lse.

fp32 products use IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then
TF32, like torch's matmuls); fp16 / bf16 products accumulate in fp32 and the softmax is
fp32. fp64 is not supported here (it runs on the cpu / reference backends). Head dims up to
128 (padded to a power of two ≥ 32); larger ones raise an error naming the limit.
Interpreter note: bf16 ``tl.dot`` is wrong under ``TRITON_INTERPRET=1``; tests run bf16
only on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 128
# Launch configuration per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by the
# product class and the head-dim padding BLOCK_D. Classes: "ieee" (fp32 × fp32 as exact FMA
# loops: operand tiles live in registers, so register pressure grows with BLOCK_D), "tf32"
# (fp32 on TF32 tensor cores) and "half" (fp16 / bf16 tensor cores). Every entry compiles
# without register spills for sm_80 and sm_90a when compiled unspecialised (ptxas figures in
# docs/ops/alibi_attention.md); compiled as real launches are (16-divisible pointers and strides,
# tools/gpu_report.py: launch_attrs) some fp32 dkdv / dq entries spill (docs/gpu_report.md) and need re-tuning;
# the launchers and AOT_CONFIGS both read this table only. dkdv: BLOCK_N keys resident,
# BLOCK_M queries streamed; fwd / dq: BLOCK_M queries resident, BLOCK_N keys streamed.
# num_stages=1 where the FMA path would otherwise spill: software pipelining keeps a second
# copy of the streamed operand tiles live, which IEEE fp32 products cannot afford at large tiles.
_DEFAULT = {
    "ieee": dict(fwd=(32, 64, 8, 2), dkdv=(32, 32, 8, 2), dq=(32, 64, 8, 2)),
    "tf32": dict(fwd=(32, 64, 8, 2), dkdv=(32, 32, 8, 2), dq=(32, 64, 8, 2)),
    "half": dict(fwd=(64, 64, 4, 2), dkdv=(32, 32, 4, 2), dq=(32, 64, 4, 2)),
}
_OVERRIDES = {
    ("ieee", 32): dict(dq=(32, 64, 8, 1)),
    ("ieee", 64): dict(dkdv=(32, 32, 8, 1)),
    ("ieee", 128): dict(fwd=(32, 32, 8, 2), dkdv=(32, 32, 16, 1), dq=(32, 32, 8, 2)),
    ("half", 128): dict(dq=(32, 32, 4, 2)),
}
BLOCK_DS = (32, 64, 128)
CONFIGS = {(cls, bd): {**cfg, **_OVERRIDES.get((cls, bd), {})} for cls, cfg in _DEFAULT.items() for bd in BLOCK_DS}
# Δ preprocess (a row reduction, bandwidth-bound): (BLOCK_M, num_warps, num_stages) by BLOCK_D,
# 2048 elements per tile so each thread holds 16 of O and 16 of dO; no loop, nothing to pipeline.
PRE_CONFIGS = {32: (64, 4, 1), 64: (32, 4, 1), 128: (16, 4, 1)}
LOG2E = 1.4426950408889634


@triton.jit
def _alibi_dist(offs_m, offs_n, coords_b, L, P, MODE):
    """(BLOCK_M, BLOCK_N) distances between query tokens offs_m and key tokens offs_n
    (0 where either is a prefix token or out of range); MODE 1 Manhattan, 2 Euclidean."""
    qm = (offs_m >= P) & (offs_m < L)
    kn = (offs_n >= P) & (offs_n < L)
    ri = tl.load(coords_b + (offs_m - P) * 2, mask=qm, other=0.0)
    ci = tl.load(coords_b + (offs_m - P) * 2 + 1, mask=qm, other=0.0)
    rj = tl.load(coords_b + (offs_n - P) * 2, mask=kn, other=0.0)
    cj = tl.load(coords_b + (offs_n - P) * 2 + 1, mask=kn, other=0.0)
    dr = ri[:, None] - rj[None, :]
    dc = ci[:, None] - cj[None, :]
    if MODE == 2:
        dist = tl.sqrt(dr * dr + dc * dc)
    else:
        dist = tl.abs(dr) + tl.abs(dc)
    return tl.where(qm[:, None] & kn[None, :], dist, 0.0)


@triton.jit
def alibi_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, slopes_ptr, coords_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    H, L, P, D, mode, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)  # B·H on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    pid_m = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m0_q = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_m0_q
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + (pid_m * BLOCK_M).to(tl.int64) * stride_ql
                + offs_m0_q[:, None] * stride_ql + offs_d[None, :],
                mask=(offs_m[:, None] < L) & d_ok[None, :], other=0.0)  # block start int64: L·stride may pass 2^31
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    coords_b = coords_ptr + b * (L - P) * 2
    qk_scale = scale * 1.4426950408889634
    slope2 = tl.load(slopes_ptr + bh) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Row offsets: pointers advance by BLOCK·stride per block (64-bit pointer arithmetic, so
    # L·stride may pass 2^31); in-block offsets are int32 (BLOCK·stride < 2^31: the launcher
    # copies views whose row stride is larger)
    kt_ptrs = k_base + (offs_n0[None, :] * stride_kl + offs_d[:, None])
    v_ptrs = v_base + (offs_n0[:, None] * stride_vl + offs_d[None, :])
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < L
        kt = tl.load(kt_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if mode != 0:
            s -= slope2 * _alibi_dist(offs_m, offs_n, coords_b, L, P, mode)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        kt_ptrs += BLOCK_N * stride_kl  # pointers advance in 64 bits
        v_ptrs += BLOCK_N * stride_vl
    acc = acc / l_i[:, None]
    m_ok = offs_m < L
    row = bh.to(tl.int64) * L + offs_m
    tl.store(out_ptr + row[:, None] * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + row, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=m_ok)


@triton.jit
def alibi_attention_bwd_preprocess_kernel(out_ptr, dout_ptr, delta_ptr, L, D,
                                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta_i = Σ_d dO[i, d]·O[i, d] (both contiguous (B·H·L, D)).
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    idx = (bh * L + offs_m)[:, None] * D + offs_d[None, :]
    o = tl.load(out_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def alibi_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, slopes_ptr, coords_ptr,
    dk_ptr, dv_ptr, dslope_part_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    H, L, P, D, mode, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)  # B·H on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    pid_n = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < L
    kv_mask = n_ok[:, None] & d_ok[None, :]
    n0 = (pid_n * BLOCK_N).to(tl.int64)  # block start in int64, in-block rows in int32
    rows_n = tl.arange(0, BLOCK_N)[:, None]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + n0 * stride_kl + rows_n * stride_kl + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + n0 * stride_vl + rows_n * stride_vl + offs_d[None, :],
                mask=kv_mask, other=0.0)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    coords_b = coords_ptr + b * (L - P) * 2
    qk_scale = scale * 1.4426950408889634
    slope = tl.load(slopes_ptr + bh)
    slope2 = slope * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dslope = tl.zeros([BLOCK_N], tl.float32)
    q_ptrs = q_base + (offs_m0[:, None] * stride_ql + offs_d[None, :])  # advanced per block in 64 bits
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < L
        mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptrs, mask=mask, other=0.0)
        q_ptrs += BLOCK_M * stride_ql
        do = tl.load(dout_ptr + (bh64 * L + offs_m)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        lse2 = tl.load(lse_ptr + bh64 * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + bh64 * L + offs_m, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        dist = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if mode != 0:
            dist = _alibi_dist(offs_m, offs_n, coords_b, L, P, mode)
        s -= slope2 * dist
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dslope -= tl.sum(ds * dist, 0)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    out_idx = (bh64 * L + offs_n)[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + out_idx, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_idx, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dslope_part_ptr + bh64 * tl.num_programs(1) + pid_n, tl.sum(dslope, 0))


@triton.jit
def alibi_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, slopes_ptr, coords_ptr, dq_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    H, L, P, D, mode, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)  # B·H on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    pid_m = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < L
    mask = m_ok[:, None] & d_ok[None, :]
    m0 = (pid_m * BLOCK_M).to(tl.int64)  # block start in int64, in-block rows in int32
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + m0 * stride_ql + tl.arange(0, BLOCK_M)[:, None] * stride_ql
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dout_ptr + (bh64 * L + offs_m)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    lse2 = tl.load(lse_ptr + bh64 * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh64 * L + offs_m, mask=m_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    coords_b = coords_ptr + b * (L - P) * 2
    qk_scale = scale * 1.4426950408889634
    slope2 = tl.load(slopes_ptr + bh) * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_ptrs = k_base + (offs_n0[:, None] * stride_kl + offs_d[None, :])  # advanced per block in 64 bits
    v_ptrs = v_base + (offs_n0[:, None] * stride_vl + offs_d[None, :])
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < L
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        k_ptrs += BLOCK_N * stride_kl
        v_ptrs += BLOCK_N * stride_vl
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if mode != 0:
            s -= slope2 * _alibi_dist(offs_m, offs_n, coords_b, L, P, mode)
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + (bh64 * L + offs_m)[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def _block_d(head_dim: int) -> int:
    return max(32, triton.next_power_of_2(head_dim))


def _check(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"sslkern.alibi_attention: the triton backend takes fp32, fp16 or bf16 q, k, v, got "
                        f"{str(q.dtype).replace('torch.', '')} (fp64 runs on backend='cpu' or 'reference')")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"sslkern.alibi_attention: q expected head dim Dh <= {MAX_HEAD_DIM} for the triton backend, "
                         f"got {q.shape[-1]} (use backend='reference' for larger heads)")


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _config(dtype: torch.dtype, block_d: int) -> dict:
    """The CONFIGS entry for q's dtype (and the TF32 switch) and the padded head dim."""
    cls = "half" if dtype != torch.float32 else _dot_precision(dtype)
    return CONFIGS[(cls, block_d)]


MAX_GRID_YZ = 65535  # CUDA limit of grid axes 1 and 2 (axis 0: 2^31 - 1)


def _grid(B: int, H: int, L: int, block: int) -> tuple[int, int]:
    """(B·H, query or key blocks): B·H on axis 0, whose limit is 2^31 - 1, so batches with
    B·H > 65,535 (masked clone batches of small sequences) launch; L / block stays far
    below axis 1's 65,535 for any sequence that fits in memory."""
    grid = (B * H, triton.cdiv(L, block))
    if grid[0] >= 2**31 or grid[1] > MAX_GRID_YZ:
        raise ValueError(f"sslkern.alibi_attention: q expected B·H < 2^31 and L / {block} <= {MAX_GRID_YZ} "
                         f"(launch grid limits), got B·H = {grid[0]}, L = {L}")
    return grid


def _strides(*ts):
    return [s for t in ts for s in (t.stride(0), t.stride(1), t.stride(2))]


def _rows_fit(*ts):
    """Views whose row stride times a block (64 rows) passes 2^31 - 1 are copied: the kernels
    keep in-block row offsets in int32 (block starts are int64)."""
    return [t if t.stride(2) * 64 < 2**31 else t.contiguous() for t in ts]


def alibi_attention_triton(q, k, v, slopes, coords, num_prefix_tokens, mode, scale):
    _check(q)
    q, k, v = _rows_fit(q, k, v)
    B, H, L, D = q.shape
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    bd = _block_d(D)
    bm, bn, nw, ns = _config(q.dtype, bd)["fwd"]
    alibi_attention_fwd_kernel[_grid(B, H, L, bm)](
        q, k, v, out, lse, slopes, coords, *_strides(q, k, v), H, L, num_prefix_tokens, D, mode, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=nw, num_stages=ns)
    return out, lse


def alibi_attention_backward_triton(dout, q, k, v, out, lse, slopes, coords, num_prefix_tokens, mode, scale):
    _check(q)
    q, k, v = _rows_fit(q, k, v)
    B, H, L, D = q.shape
    dout = dout.contiguous()
    dq = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if dq.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), torch.zeros_like(slopes)
    bd = _block_d(D)
    prec = _dot_precision(q.dtype)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    bm, nw, ns = PRE_CONFIGS[bd]
    alibi_attention_bwd_preprocess_kernel[_grid(B, H, L, bm)](
        out, dout, delta, L, D, BLOCK_M=bm, BLOCK_D=bd, num_warps=nw, num_stages=ns)
    cfg = _config(q.dtype, bd)
    bm, bn, nw, ns = cfg["dkdv"]
    n_blocks = triton.cdiv(L, bn)
    dslope_part = torch.empty((B, H, n_blocks), dtype=torch.float32, device=q.device)
    alibi_attention_bwd_dkdv_kernel[_grid(B, H, L, bn)](
        q, k, v, dout, lse, delta, slopes, coords, dk, dv, dslope_part, *_strides(q, k, v),
        H, L, num_prefix_tokens, D, mode, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=prec, num_warps=nw, num_stages=ns)
    bm, bn, nw, ns = cfg["dq"]
    alibi_attention_bwd_dq_kernel[_grid(B, H, L, bm)](
        q, k, v, dout, lse, delta, slopes, coords, dq, *_strides(q, k, v),
        H, L, num_prefix_tokens, D, mode, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=prec, num_warps=nw, num_stages=ns)
    return dq, dk, dv, dslope_part.sum(-1).to(slopes.dtype)


# ---------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for the GPU report (compiled ahead of time)
# ---------------------------------------------------------------------------------------
# Head dim 64 and the strides (multiples of it): 16-divisible at the benchmark sizes, as a real
# launch specialises them; the GPU report compiles with the same attributes.
AOT_DIVISIBLE = ("D",) + tuple(f"stride_{t}{d}" for t in "qkv" for d in "bhl")
_STRIDES = {f"stride_{t}{d}": "i32" for t in "qkv" for d in "bhl"}
_SCALARS = {"H": "i32", "L": "i32", "P": "i32", "D": "i32", "mode": "i32", "scale": "fp32"}
# (report label, pointer type, DOT_PRECISION, CONFIGS class)
_DTYPES = [("fp32", "fp32", "ieee", "ieee"), ("fp32/tf32", "fp32", "tf32", "tf32"),
           ("fp16", "fp16", "ieee", "half"), ("bf16", "bf16", "ieee", "half")]


def _aot_configs():
    configs = []
    for label, ty, prec, cls in _DTYPES:
        for bd in BLOCK_DS:
            p = "*" + ty
            blocks = {name: dict(constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=prec),
                                 num_warps=nw, num_stages=ns) for name, (bm, bn, nw, ns) in CONFIGS[(cls, bd)].items()}
            configs.append(dict(
                name=f"alibi_attention_fwd {label} BLOCK_D={bd}", kernel=alibi_attention_fwd_kernel,
                signature={"q_ptr": p, "k_ptr": p, "v_ptr": p, "out_ptr": p, "lse_ptr": "*fp32",
                           "slopes_ptr": "*fp32", "coords_ptr": "*fp32", **_STRIDES, **_SCALARS},
                **blocks["fwd"]))
            configs.append(dict(
                name=f"alibi_attention_bwd_dkdv {label} BLOCK_D={bd}", kernel=alibi_attention_bwd_dkdv_kernel,
                signature={"q_ptr": p, "k_ptr": p, "v_ptr": p, "dout_ptr": p, "lse_ptr": "*fp32",
                           "delta_ptr": "*fp32", "slopes_ptr": "*fp32", "coords_ptr": "*fp32", "dk_ptr": p,
                           "dv_ptr": p, "dslope_part_ptr": "*fp32", **_STRIDES, **_SCALARS},
                **blocks["dkdv"]))
            configs.append(dict(
                name=f"alibi_attention_bwd_dq {label} BLOCK_D={bd}", kernel=alibi_attention_bwd_dq_kernel,
                signature={"q_ptr": p, "k_ptr": p, "v_ptr": p, "dout_ptr": p, "lse_ptr": "*fp32",
                           "delta_ptr": "*fp32", "slopes_ptr": "*fp32", "coords_ptr": "*fp32", "dq_ptr": p,
                           **_STRIDES, **_SCALARS},
                **blocks["dq"]))
            if prec == "ieee":
                configs.append(dict(
                    name=f"alibi_attention_bwd_preprocess {label} BLOCK_D={bd}",
                    kernel=alibi_attention_bwd_preprocess_kernel,
                    signature={"out_ptr": p, "dout_ptr": p, "delta_ptr": "*fp32", "L": "i32", "D": "i32"},
                    constexprs={"BLOCK_M": PRE_CONFIGS[bd][0], "BLOCK_D": bd}, num_warps=PRE_CONFIGS[bd][1],
                    num_stages=PRE_CONFIGS[bd][2]))
    return configs


AOT_CONFIGS = _aot_configs()
