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

fp32 products use IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then
TF32); fp16 / bf16 products accumulate in fp32 and the softmax is fp32 (G is rounded to the
input dtype for the second product, as flash attention does). fp64 is not supported here (it
runs on the cpu / reference backends). Any D: BLOCK_DO ≤ 256 output columns per program
(D > 256 takes several programs per row block, each recomputing the logits).
Interpreter note: bf16 ``tl.dot`` is wrong under ``TRITON_INTERPRET=1``; tests run bf16 only
on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BLOCK_DOS = (64, 128, 256)
# (BLOCK_M, BLOCK_N, BLOCK_DK, num_warps, num_stages) per kernel, keyed by the product class
# ("ieee": fp32 FMA loops, "tf32", "half": fp16 / bf16 tensor cores) and BLOCK_DO (the dq / dk
# accumulator width; the forward does not depend on it). Each entry compiles without spills
# for sm_80 and sm_90a (python -m sslkern.gpu_report --only info_nce_loss).
_DEFAULT = {
    "ieee": dict(fwd=(64, 64, 32, 4, 2), dq=(32, 32, 32, 4, 1), dk=(32, 32, 32, 4, 1)),
    "tf32": dict(fwd=(64, 64, 32, 4, 2), dq=(32, 64, 32, 4, 2), dk=(32, 64, 32, 4, 2)),
    "half": dict(fwd=(64, 64, 64, 4, 2), dq=(32, 64, 64, 4, 2), dk=(32, 64, 64, 4, 2)),
}
_OVERRIDES: dict = {}
CONFIGS = {(cls, bd): {**cfg, **_OVERRIDES.get((cls, bd), {})} for cls, cfg in _DEFAULT.items() for bd in BLOCK_DOS}


@triton.jit
def _logits_tile(q_ptr, k_ptr, offs_m, offs_n, N, M, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 q[offs_m]·k[offs_n]ᵀ, the dot over D in BLOCK_DK chunks (0 outside)."""
    m_ok = offs_m < N
    n_ok = offs_n < M
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * D
    k_rows = k_ptr + offs_n.to(tl.int64)[None, :] * D
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        d_ok = offs_d < D
        q = tl.load(q_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.load(k_rows + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s += tl.dot(q, kt, input_precision=DOT_PRECISION)
    return s


@triton.jit
def info_nce_fwd_kernel(q_ptr, k_ptr, pos_ptr, excl_ptr, lse_ptr, row_loss_ptr, N, M, D, has_excl, inv_temp,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=-1)
    excl = tl.full([BLOCK_M], -1, tl.int64)
    if has_excl:
        excl = tl.load(excl_ptr + offs_m, mask=m_ok, other=-1)
    scale2 = inv_temp * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    s_pos = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = _logits_tile(q_ptr, k_ptr, offs_m, offs_n, N, M, D, BLOCK_M, BLOCK_N, BLOCK_DK, DOT_PRECISION) * scale2
        cols = offs_n.to(tl.int64)[None, :]
        s_pos += tl.sum(tl.where(cols == pos[:, None], s, 0.0), 1)
        s = tl.where((offs_n[None, :] < M) & (cols != excl[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    lse2 = m_i + tl.math.log2(l_i)
    tl.store(lse_ptr + offs_m, lse2 * 0.6931471805599453, mask=m_ok)
    tl.store(row_loss_ptr + offs_m, (lse2 - s_pos) * 0.6931471805599453, mask=m_ok)


@triton.jit
def _grad_tile(q_ptr, k_ptr, offs_m, offs_n, pos, excl, lse2, N, M, D, scale2,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) P − onehot(pos) for the tile (0 at excluded and out-of-range entries)."""
    s = _logits_tile(q_ptr, k_ptr, offs_m, offs_n, N, M, D, BLOCK_M, BLOCK_N, BLOCK_DK, DOT_PRECISION) * scale2
    cols = offs_n.to(tl.int64)[None, :]
    ok = (offs_m[:, None] < N) & (offs_n[None, :] < M) & (cols != excl[:, None])
    p = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
    return p - tl.where(cols == pos[:, None], 1.0, 0.0)


@triton.jit
def info_nce_bwd_dq_kernel(q_ptr, k_ptr, pos_ptr, excl_ptr, lse_ptr, dq_ptr, N, M, D, has_excl, inv_temp, g_scale,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                           BLOCK_DO: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    m_ok = offs_m < N
    o_ok = offs_o < D
    pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=-1)
    excl = tl.full([BLOCK_M], -1, tl.int64)
    if has_excl:
        excl = tl.load(excl_ptr + offs_m, mask=m_ok, other=-1)
    scale2 = inv_temp * 1.4426950408889634
    lse2 = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        g = _grad_tile(q_ptr, k_ptr, offs_m, offs_n, pos, excl, lse2, N, M, D, scale2,
                       BLOCK_M, BLOCK_N, BLOCK_DK, DOT_PRECISION)
        kv = tl.load(k_ptr + offs_n.to(tl.int64)[:, None] * D + offs_o[None, :],
                     mask=(offs_n[:, None] < M) & o_ok[None, :], other=0.0)
        acc += tl.dot(g.to(kv.dtype), kv, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + offs_m.to(tl.int64)[:, None] * D + offs_o[None, :], (acc * g_scale).to(dq_ptr.dtype.element_ty),
             mask=m_ok[:, None] & o_ok[None, :])


@triton.jit
def info_nce_bwd_dk_kernel(q_ptr, k_ptr, pos_ptr, excl_ptr, lse_ptr, dk_ptr, N, M, D, has_excl, inv_temp, g_scale,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                           BLOCK_DO: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    n_ok = offs_n < M
    o_ok = offs_o < D
    scale2 = inv_temp * 1.4426950408889634
    acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=-1)
        excl = tl.full([BLOCK_M], -1, tl.int64)
        if has_excl:
            excl = tl.load(excl_ptr + offs_m, mask=m_ok, other=-1)
        lse2 = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        g = _grad_tile(q_ptr, k_ptr, offs_m, offs_n, pos, excl, lse2, N, M, D, scale2,
                       BLOCK_M, BLOCK_N, BLOCK_DK, DOT_PRECISION)
        qv = tl.load(q_ptr + offs_m.to(tl.int64)[:, None] * D + offs_o[None, :], mask=m_ok[:, None] & o_ok[None, :],
                     other=0.0)
        acc += tl.dot(tl.trans(g).to(qv.dtype), qv, input_precision=DOT_PRECISION)
    tl.store(dk_ptr + offs_n.to(tl.int64)[:, None] * D + offs_o[None, :], (acc * g_scale).to(dk_ptr.dtype.element_ty),
             mask=n_ok[:, None] & o_ok[None, :])


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


def info_nce_loss_triton(q, k, pos, exclude, inv_temp, grad_q, grad_k, validate):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"sslkern.info_nce_loss: the triton backend takes fp32, fp16 or bf16 q and k, got "
                        f"{str(q.dtype).replace('torch.', '')} (fp64 runs on backend='cpu' or 'reference')")
    N, D = q.shape
    M = k.shape[0]
    if validate:  # one reduction and a host sync, only for user-given indices
        from ..ops.info_nce_loss import check_indices
        check_indices(pos, exclude, M)
    q, k = q.contiguous(), k.contiguous()
    dev = q.device
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    row_loss = torch.empty(N, dtype=torch.float32, device=dev)
    has_excl = 1 if exclude is not None else 0
    excl = exclude if exclude is not None else pos
    prec = _dot_precision(q.dtype)
    bdo = _block_do(D)
    cfg = _config(q.dtype, bdo)
    bm, bn, bdk, nw, ns = cfg["fwd"]
    info_nce_fwd_kernel[(triton.cdiv(N, bm),)](
        q, k, pos, excl, lse, row_loss, N, M, D, has_excl, inv_temp,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, DOT_PRECISION=prec, num_warps=nw, num_stages=ns)
    loss = row_loss.sum() / N
    g_scale = inv_temp / N
    dq = q.new_empty(0)
    dk = k.new_empty(0)
    if grad_q:
        dq = torch.empty_like(q)
        bm, bn, bdk, nw, ns = cfg["dq"]
        info_nce_bwd_dq_kernel[(triton.cdiv(N, bm), triton.cdiv(D, bdo))](
            q, k, pos, excl, lse, dq, N, M, D, has_excl, inv_temp, g_scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DO=bdo, DOT_PRECISION=prec, num_warps=nw, num_stages=ns)
    if grad_k:
        dk = torch.empty_like(k)
        bm, bn, bdk, nw, ns = cfg["dk"]
        info_nce_bwd_dk_kernel[(triton.cdiv(M, bn), triton.cdiv(D, bdo))](
            q, k, pos, excl, lse, dk, N, M, D, has_excl, inv_temp, g_scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DO=bdo, DOT_PRECISION=prec, num_warps=nw, num_stages=ns)
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
    for label, ty, prec, cls in _DTYPES:
        p = "*" + ty
        base = {"q_ptr": p, "k_ptr": p, "pos_ptr": "*i64", "excl_ptr": "*i64", "lse_ptr": "*fp32"}
        bm, bn, bdk, nw, ns = CONFIGS[(cls, BLOCK_DOS[0])]["fwd"]
        configs.append(dict(
            name=f"info_nce_fwd {label}", kernel=info_nce_fwd_kernel,
            signature={**base, "row_loss_ptr": "*fp32", **_SCALARS},
            constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, DOT_PRECISION=prec), num_warps=nw, num_stages=ns))
        for bdo in BLOCK_DOS:
            for which, kernel, out in (("dq", info_nce_bwd_dq_kernel, "dq_ptr"), ("dk", info_nce_bwd_dk_kernel, "dk_ptr")):
                bm, bn, bdk, nw, ns = CONFIGS[(cls, bdo)][which]
                configs.append(dict(
                    name=f"info_nce_bwd_{which} {label} BLOCK_DO={bdo}", kernel=kernel,
                    signature={**base, out: p, **_SCALARS, "g_scale": "fp32"},
                    constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DO=bdo, DOT_PRECISION=prec),
                    num_warps=nw, num_stages=ns))
    return configs


AOT_CONFIGS = _aot_configs()
