"""``info_nce_loss`` — Triton kernels: flash-attention-style InfoNCE, forward and gradients.

Three launches, no (N, M) tensor, no atomics (deterministic):
  1. ``info_nce_fwd_kernel`` — one program per block of BLOCK_M rows, walking the columns in
     blocks of BLOCK_N: logits ``s = q·kᵀ·inv_temp`` (the dot over D in chunks of BLOCK_DK),
     excluded / out-of-range columns set to −inf, online (rescaled) logsumexp in base 2, and
     the positive's logit picked from its tile. Stores the row lse and the row loss
     ``lse − s_pos``; the launcher averages the row losses (a torch sum: deterministic).
  2. ``info_nce_bwd_dq_kernel`` — one program per (row block, BLOCK_DO output columns of D):
     recomputes the logits tile by tile, ``G = (exp(s − lse) − onehot(pos))·inv_temp/N`` and
     accumulates ``dq += G·k``.
  3. ``info_nce_bwd_dk_kernel`` — one program per (column block, BLOCK_DO output columns):
     recomputes the tiles over all row blocks and accumulates ``dk += Gᵀ·q``.
The gradients are computed in the forward call when asked (the custom op returns them with
the loss, see sslkern/ops/info_nce_loss.py). Exponentials are ``exp2`` with log2(e) folded
into the scale; masked entries are exactly 0, no subnormal arithmetic.

RINCE (``RINCE=True``, rince_q > 0): the forward turns each row's statistics into the row
loss ``exp(q·s_pos)·expm1(q·(log λ + lse − s_pos))/q`` and stores, in place of lse, the shift
``lse − q·(log λ + lse)`` (so the gradient kernels' ``exp(s − shift)`` is ``w·P``, ``w = (λ·Z)^q``)
and the positive's weight ``u = exp(q·s_pos)`` (the one-hot's coefficient, 1 for InfoNCE): the
tiles are the InfoNCE tiles, only per-row scalars differ.

fp32 products use IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then
TF32); fp16 / bf16 products accumulate in fp32 and the softmax is fp32 (G is rounded to the
input dtype for the second product, as flash attention does). fp64 is not supported here (it
runs on the cpu / reference backends). Any D: BLOCK_DO ≤ 256 output columns per program
(D > 256 takes several programs per row block, each recomputing the logits).
Interpreter note: bf16 ``tl.dot`` is wrong under ``TRITON_INTERPRET=1``; tests run bf16 only
on a GPU.
"""
from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl

# The kernels address their tiles with tl.make_block_ptr (no per-element 64-bit address tiles in
# registers: the 2-D pointer version spilled); Triton 3.8 marks it deprecated in favour of tensor
# descriptors, which need a TMA scratch allocator on sm_90. Silence that one notice.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BLOCK_DOS = (64, 128, 256)
# (BLOCK_M, BLOCK_N, BLOCK_DK, num_warps, num_stages) per kernel, keyed by the product class
# ("ieee": fp32 FMA loops, "tf32", "half": fp16 / bf16 tensor cores) and BLOCK_DO (the dq / dk
# accumulator width; the forward does not depend on it). Every entry compiles without spills
# for sm_80 and sm_90a (python tools/gpu_report.py --only info_nce_loss); the launcher and
# AOT_CONFIGS read this table only. "ieee" keeps 4 warps and small tiles (FMA dots hold their
# operands in registers; at 8 warps ptxas capped sm_90a's registers per thread and spilled).
_DEFAULT = {
    "ieee": dict(fwd=(64, 64, 32, 8, 2), dq=(32, 32, 32, 4, 1), dk=(32, 32, 32, 4, 1)),
    "tf32": dict(fwd=(64, 64, 32, 8, 2), dq=(64, 64, 32, 8, 2), dk=(64, 64, 32, 8, 2)),
    "half": dict(fwd=(64, 64, 64, 8, 2), dq=(64, 64, 64, 8, 2), dk=(64, 64, 64, 8, 2)),
}
_OVERRIDES = {
    ("ieee", 256): dict(dq=(16, 32, 32, 4, 1), dk=(16, 16, 32, 4, 1)),
    ("tf32", 256): dict(dq=(64, 32, 32, 8, 2), dk=(64, 32, 32, 8, 2)),
    ("half", 256): dict(dq=(64, 32, 64, 8, 2), dk=(64, 32, 64, 8, 2)),
}
CONFIGS = {(cls, bd): {**cfg, **_OVERRIDES.get((cls, bd), {})} for cls, cfg in _DEFAULT.items() for bd in BLOCK_DOS}


@triton.jit
def _logits_tile(q_ptr, k_ptr, row0, col0, N, M, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 q[row0:]·k[col0:]ᵀ, the dot over D in BLOCK_DK chunks (0 outside).
    Block pointers: no per-element 64-bit address tiles in registers."""
    q_bp = tl.make_block_ptr(q_ptr, shape=(N, D), strides=(D, 1), offsets=(row0, 0), block_shape=(BLOCK_M, BLOCK_DK),
                             order=(1, 0))
    kt_bp = tl.make_block_ptr(k_ptr, shape=(D, M), strides=(1, D), offsets=(0, col0), block_shape=(BLOCK_DK, BLOCK_N),
                              order=(0, 1))
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, D, BLOCK_DK):
        q = tl.load(q_bp, boundary_check=(0, 1), padding_option="zero")
        kt = tl.load(kt_bp, boundary_check=(0, 1), padding_option="zero")
        s += tl.dot(q, kt, input_precision=DOT_PRECISION)
        q_bp = tl.advance(q_bp, (0, BLOCK_DK))
        kt_bp = tl.advance(kt_bp, (BLOCK_DK, 0))
    return s


@triton.jit
def _expm1(x):
    """exp(x) − 1 without the cancellation near 0: the Taylor series to x⁸/8! for |x| < 0.5
    (truncation below 1e-8 relative), exp(x) − 1 beyond."""
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (
        1.0 / 720.0 + x * (1.0 / 5040.0 + x * (1.0 / 40320.0))))))))
    return tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0)


@triton.jit
def info_nce_fwd_kernel(q_ptr, k_ptr, pos_ptr, excl_ptr, lse_ptr, row_loss_ptr, N, M, D, has_excl, inv_temp,
                        pos_w_ptr, rince_q, log2_lam,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, RINCE: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=-1).to(tl.int32)
    excl = tl.full([BLOCK_M], -1, tl.int32)
    if has_excl:
        excl = tl.load(excl_ptr + offs_m, mask=m_ok, other=-1).to(tl.int32)
    scale2 = inv_temp * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    s_pos = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        cols = (start_n + tl.arange(0, BLOCK_N))[None, :]
        s = _logits_tile(q_ptr, k_ptr, row0, start_n, N, M, D, BLOCK_M, BLOCK_N, BLOCK_DK, DOT_PRECISION) * scale2
        s_pos += tl.sum(tl.where(cols == pos[:, None], s, 0.0), 1)
        s = tl.where((cols < M) & (cols != excl[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    lse2 = m_i + tl.math.log2(l_i)
    if RINCE:  # base-2 logits: exp(q·s_pos) = exp2(q·s_pos2), log λ = ln 2·log2 λ
        u = tl.math.exp2(rince_q * s_pos)
        row_loss = u * _expm1(rince_q * (log2_lam + lse2 - s_pos) * 0.6931471805599453) / rince_q
        tl.store(lse_ptr + offs_m, (lse2 - rince_q * (log2_lam + lse2)) * 0.6931471805599453, mask=m_ok)
        tl.store(pos_w_ptr + offs_m, u, mask=m_ok)
        tl.store(row_loss_ptr + offs_m, row_loss, mask=m_ok)
    else:
        tl.store(lse_ptr + offs_m, lse2 * 0.6931471805599453, mask=m_ok)
        tl.store(row_loss_ptr + offs_m, (lse2 - s_pos) * 0.6931471805599453, mask=m_ok)


@triton.jit
def _grad_tile(q_ptr, k_ptr, row0, col0, pos, excl, lse2, pos_w, N, M, D, scale2,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, DOT_PRECISION: tl.constexpr,
               RINCE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) P − onehot(pos) for the tile (0 at excluded and out-of-range entries);
    RINCE: ``lse2`` is the shift, so the first term is w·P, and the one-hot is weighted by ``pos_w``."""
    s = _logits_tile(q_ptr, k_ptr, row0, col0, N, M, D, BLOCK_M, BLOCK_N, BLOCK_DK, DOT_PRECISION) * scale2
    rows = (row0 + tl.arange(0, BLOCK_M))[:, None]
    cols = (col0 + tl.arange(0, BLOCK_N))[None, :]
    ok = (rows < N) & (cols < M) & (cols != excl[:, None])
    p = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
    if RINCE:
        return p - tl.where(cols == pos[:, None], pos_w[:, None], 0.0)
    return p - tl.where(cols == pos[:, None], 1.0, 0.0)


@triton.jit
def info_nce_bwd_dq_kernel(q_ptr, k_ptr, pos_ptr, excl_ptr, lse_ptr, dq_ptr, N, M, D, has_excl, inv_temp, g_scale,
                           pos_w_ptr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                           BLOCK_DO: tl.constexpr, DOT_PRECISION: tl.constexpr, RINCE: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    o0 = tl.program_id(1) * BLOCK_DO
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=-1).to(tl.int32)
    excl = tl.full([BLOCK_M], -1, tl.int32)
    if has_excl:
        excl = tl.load(excl_ptr + offs_m, mask=m_ok, other=-1).to(tl.int32)
    scale2 = inv_temp * 1.4426950408889634
    lse2 = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    pos_w = tl.full([BLOCK_M], 1.0, tl.float32)
    if RINCE:
        pos_w = tl.load(pos_w_ptr + offs_m, mask=m_ok, other=0.0)
    k_bp = tl.make_block_ptr(k_ptr, shape=(M, D), strides=(D, 1), offsets=(0, o0), block_shape=(BLOCK_N, BLOCK_DO),
                             order=(1, 0))
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        g = _grad_tile(q_ptr, k_ptr, row0, start_n, pos, excl, lse2, pos_w, N, M, D, scale2,
                       BLOCK_M, BLOCK_N, BLOCK_DK, DOT_PRECISION, RINCE)
        kv = tl.load(k_bp, boundary_check=(0, 1), padding_option="zero")
        acc += tl.dot(g.to(kv.dtype), kv, input_precision=DOT_PRECISION)
        k_bp = tl.advance(k_bp, (BLOCK_N, 0))
    dq_bp = tl.make_block_ptr(dq_ptr, shape=(N, D), strides=(D, 1), offsets=(row0, o0),
                              block_shape=(BLOCK_M, BLOCK_DO), order=(1, 0))
    tl.store(dq_bp, (acc * g_scale).to(dq_ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def info_nce_bwd_dk_kernel(q_ptr, k_ptr, pos_ptr, excl_ptr, lse_ptr, dk_ptr, N, M, D, has_excl, inv_temp, g_scale,
                           pos_w_ptr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                           BLOCK_DO: tl.constexpr, DOT_PRECISION: tl.constexpr, RINCE: tl.constexpr):
    col0 = tl.program_id(0) * BLOCK_N
    o0 = tl.program_id(1) * BLOCK_DO
    scale2 = inv_temp * 1.4426950408889634
    q_bp = tl.make_block_ptr(q_ptr, shape=(N, D), strides=(D, 1), offsets=(0, o0), block_shape=(BLOCK_M, BLOCK_DO),
                             order=(1, 0))
    acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=-1).to(tl.int32)
        excl = tl.full([BLOCK_M], -1, tl.int32)
        if has_excl:
            excl = tl.load(excl_ptr + offs_m, mask=m_ok, other=-1).to(tl.int32)
        lse2 = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        pos_w = tl.full([BLOCK_M], 1.0, tl.float32)
        if RINCE:
            pos_w = tl.load(pos_w_ptr + offs_m, mask=m_ok, other=0.0)
        g = _grad_tile(q_ptr, k_ptr, start_m, col0, pos, excl, lse2, pos_w, N, M, D, scale2,
                       BLOCK_M, BLOCK_N, BLOCK_DK, DOT_PRECISION, RINCE)
        qv = tl.load(q_bp, boundary_check=(0, 1), padding_option="zero")
        acc += tl.dot(tl.trans(g).to(qv.dtype), qv, input_precision=DOT_PRECISION)
        q_bp = tl.advance(q_bp, (BLOCK_M, 0))
    dk_bp = tl.make_block_ptr(dk_ptr, shape=(M, D), strides=(D, 1), offsets=(col0, o0),
                              block_shape=(BLOCK_N, BLOCK_DO), order=(1, 0))
    tl.store(dk_bp, (acc * g_scale).to(dk_ptr.dtype.element_ty), boundary_check=(0, 1))


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------
def _block_do(d: int) -> int:
    for b in BLOCK_DOS:
        if d <= b:
            return b
    return BLOCK_DOS[-1]


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _config(dtype: torch.dtype, block_do: int) -> dict:
    cls = "half" if dtype != torch.float32 else _dot_precision(dtype)
    return CONFIGS[(cls, block_do)]


def info_nce_loss_triton(q, k, pos, exclude, inv_temp, grad_q, grad_k, tied, rince_q, rince_lam):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"sslkern.info_nce_loss: the triton backend takes fp32, fp16 or bf16 q and k, got "
                        f"{str(q.dtype).replace('torch.', '')} (fp64 runs on backend='cpu' or 'reference')")
    N, D = q.shape
    M = k.shape[0]
    q, k = q.contiguous(), k.contiguous()
    dev = q.device
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    row_loss = torch.empty(N, dtype=torch.float32, device=dev)
    has_excl = 1 if exclude is not None else 0
    excl = exclude if exclude is not None else pos
    robust = rince_q > 0
    pos_w = torch.empty(N, dtype=torch.float32, device=dev) if robust else lse  # read only when robust
    log2_lam = math.log2(rince_lam)
    prec = _dot_precision(q.dtype)
    bdo = _block_do(D)
    cfg = _config(q.dtype, bdo)
    bm, bn, bdk, nw, ns = cfg["fwd"]
    info_nce_fwd_kernel[(triton.cdiv(N, bm),)](
        q, k, pos, excl, lse, row_loss, N, M, D, has_excl, inv_temp, pos_w, rince_q, log2_lam,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, DOT_PRECISION=prec, RINCE=robust, num_warps=nw, num_stages=ns)
    loss = row_loss.sum() / N
    if not robust and rince_lam != 1.0:  # the q → 0 limit of RINCE: InfoNCE + log λ
        loss = loss + math.log(rince_lam)
    g_scale = inv_temp / N
    dq = q.new_empty(0)
    dk = k.new_empty(0)
    if grad_q:
        dq = torch.empty_like(q)
        bm, bn, bdk, nw, ns = cfg["dq"]
        info_nce_bwd_dq_kernel[(triton.cdiv(N, bm), triton.cdiv(D, bdo))](
            q, k, pos, excl, lse, dq, N, M, D, has_excl, inv_temp, g_scale, pos_w,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DO=bdo, DOT_PRECISION=prec, RINCE=robust,
            num_warps=nw, num_stages=ns)
    if grad_k:
        dk = torch.empty_like(k)
        bm, bn, bdk, nw, ns = cfg["dk"]
        info_nce_bwd_dk_kernel[(triton.cdiv(M, bn), triton.cdiv(D, bdo))](
            q, k, pos, excl, lse, dk, N, M, D, has_excl, inv_temp, g_scale, pos_w,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DO=bdo, DOT_PRECISION=prec, RINCE=robust,
            num_warps=nw, num_stages=ns)
    if tied:  # k is q: the one gradient is dq + dk (summed in fp32, rounded once)
        if grad_q:
            dq = dq.add_(dk) if dq.dtype == torch.float32 else (dq.float() + dk.float()).to(q.dtype)
        dk = k.new_empty(0)
    return loss, dq, dk


# ---------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for the GPU report (compiled ahead of time)
# ---------------------------------------------------------------------------------------
_SCALARS = {"N": "i32", "M": "i32", "D": "i32", "has_excl": "i32", "inv_temp": "fp32"}
# (report label, pointer type, DOT_PRECISION, CONFIGS class)
_DTYPES = [("fp32", "fp32", "ieee", "ieee"), ("fp32/tf32", "fp32", "tf32", "tf32"),
           ("fp16", "fp16", "ieee", "half"), ("bf16", "bf16", "ieee", "half")]


def _aot_configs():
    configs = []
    for (label, ty, prec, cls), robust in ((d, r) for d in _DTYPES for r in (False, True)):
        p = "*" + ty
        tag = f"{label}{' rince' if robust else ''}"
        base = {"q_ptr": p, "k_ptr": p, "pos_ptr": "*i64", "excl_ptr": "*i64", "lse_ptr": "*fp32"}
        bm, bn, bdk, nw, ns = CONFIGS[(cls, BLOCK_DOS[0])]["fwd"]
        configs.append(dict(
            name=f"info_nce_fwd {tag}", kernel=info_nce_fwd_kernel,
            signature={**base, "row_loss_ptr": "*fp32", **_SCALARS, "pos_w_ptr": "*fp32", "rince_q": "fp32",
                       "log2_lam": "fp32"},
            constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, DOT_PRECISION=prec, RINCE=robust),
            num_warps=nw, num_stages=ns))
        for bdo in BLOCK_DOS:
            for which, kernel, out in (("dq", info_nce_bwd_dq_kernel, "dq_ptr"), ("dk", info_nce_bwd_dk_kernel, "dk_ptr")):
                bm, bn, bdk, nw, ns = CONFIGS[(cls, bdo)][which]
                configs.append(dict(
                    name=f"info_nce_bwd_{which} {tag} BLOCK_DO={bdo}", kernel=kernel,
                    signature={**base, out: p, **_SCALARS, "g_scale": "fp32", "pos_w_ptr": "*fp32"},
                    constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DO=bdo, DOT_PRECISION=prec,
                                    RINCE=robust),
                    num_warps=nw, num_stages=ns))
    return configs


AOT_CONFIGS = _aot_configs()
