"""``relation_loss`` — Triton kernels: RelViT pairwise relation loss, forward and gradients.

Layout: q, k (B, N, C·dh) (class c in columns c·dh..), positions (B, N) int64, optional (G, G)
fp32 regression table. Scores of the pair (i, j) for class c: ``x_c = scale·q_ic·k_jc``.
Three launches, no (B, C, N, N) or (B, N, N) tensor, no atomics (deterministic):
  1. ``relation_fwd_kernel`` — one program per (image, block of BLOCK_I rows), walking the
     columns in blocks of BLOCK_J; per tile the C score tiles (dots over dh in BLOCK_D chunks)
     feed an online logsumexp / argmax over the classes (relations: labels from the cells'
     coordinates) or the squared error against ``table[pos_i, pos_j]`` (regression); stores
     the program's loss and hit sums (the launcher adds them: a torch sum).
  2. ``relation_bwd_dq_kernel`` — one program per (image, row block, output class, BLOCK_DO
     columns of dh): recomputes the C score tiles of each column block, ``G = dℓ/dx`` of its
     class, ``dq += G·k``.
  3. ``relation_bwd_dk_kernel`` — the same per column block over all row blocks, ``dk += Gᵀ·q``.
The backward programs of one class recompute all C score tiles (the softmax needs them): C
times the forward's products per class, i.e. C² = 81 tile products per pair for relations —
simple and register-light, not the fastest possible GPU schedule (a single-pass kernel
holding the C accumulators would do 3·C).

Products are fp32 (inputs up-cast on load; IEEE unless ``torch.backends.cuda.matmul.allow_tf32``),
so fp16 / bf16 inputs give fp32-accurate scores; exponentials are ``exp2`` with log2(e) folded
in. fp64 runs on the cpu / reference backends. Out-of-range positions (only possible with
the public function's checks bypassed) give undefined labels; table reads are masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# (BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_DO, num_warps, num_stages). 16 x 16 tiles: at 32 x 32 the
# nine unrolled class tiles spilled on sm_90a; at 16 x 16 nothing spills (register counts in
# docs/gpu_report.md; python tools/gpu_report.py --only relation_loss).
CFG = dict(fwd=(16, 16, 16, 4, 1), bwd=(16, 16, 16, 64, 4, 1))
BLOCK_DOS = (16, 32, 64)


@triton.jit
def _scores(q_ptr, k_ptr, qbase, kbase, rows, cols, N, LD, DH, c,
            BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_I, BLOCK_J) fp32 q[rows, c]·k[cols, c] (0 outside)."""
    s = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    for d0 in range(0, DH, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < DH
        qv = tl.load(q_ptr + qbase + rows[:, None].to(tl.int64) * LD + c * DH + d[None, :],
                     mask=(rows[:, None] < N) & dm[None, :], other=0.0).to(tl.float32)
        kv = tl.load(k_ptr + kbase + cols[:, None].to(tl.int64) * LD + c * DH + d[None, :],
                     mask=(cols[:, None] < N) & dm[None, :], other=0.0).to(tl.float32)
        s += tl.dot(qv, tl.trans(kv), input_precision=DOT_PRECISION)
    return s


@triton.jit
def _labels(pos_i, pos_j, GRID_W):
    ri, ci = pos_i // GRID_W, pos_i % GRID_W
    rj, cj = pos_j // GRID_W, pos_j % GRID_W
    dr = (ri[:, None] > rj[None, :]).to(tl.int32) - (ri[:, None] < rj[None, :]).to(tl.int32) + 1
    dc = (ci[:, None] > cj[None, :]).to(tl.int32) - (ci[:, None] < cj[None, :]).to(tl.int32) + 1
    return 3 * dr + dc


@triton.jit
def _pair_grad(q_ptr, k_ptr, table_ptr, qbase, kbase, rows, cols, pos_i, pos_j, N, LD, DH, GRID_W, CELLS, c_out,
               scale, smoothing, CLASSES: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
               BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dℓ/dx_{c_out} for the (BLOCK_I, BLOCK_J) tile (0 outside), unscaled by the mean."""
    valid = (rows[:, None] < N) & (cols[None, :] < N)
    if CLASSES == 1:
        x = _scores(q_ptr, k_ptr, qbase, kbase, rows, cols, N, LD, DH, 0,
                    BLOCK_I, BLOCK_J, BLOCK_D, DOT_PRECISION) * scale
        ok = valid & (pos_i[:, None] >= 0) & (pos_i[:, None] < CELLS) & (pos_j[None, :] >= 0) & (pos_j[None, :] < CELLS)
        t = tl.load(table_ptr + pos_i[:, None] * CELLS + pos_j[None, :], mask=ok, other=0.0)
        g = 2.0 * (x - t)
    else:
        y = _labels(pos_i, pos_j, GRID_W)
        m = tl.full([BLOCK_I, BLOCK_J], float("-inf"), tl.float32)
        z = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        x_sel = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        for c in tl.static_range(CLASSES):
            x = _scores(q_ptr, k_ptr, qbase, kbase, rows, cols, N, LD, DH, c,
                        BLOCK_I, BLOCK_J, BLOCK_D, DOT_PRECISION) * (scale * 1.4426950408889634)
            m_new = tl.maximum(m, x)
            z = z * tl.math.exp2(m - m_new) + tl.math.exp2(x - m_new)
            m = m_new
            x_sel = tl.where(c_out == c, x, x_sel)
        p = tl.math.exp2(x_sel - m) / z
        g = p - (1.0 - smoothing) * (y == c_out).to(tl.float32) - smoothing / CLASSES
    return tl.where(valid, g, 0.0)


@triton.jit
def relation_fwd_kernel(q_ptr, k_ptr, pos_ptr, table_ptr, loss_ptr, hits_ptr, N, LD, DH, GRID_W, CELLS, scale,
                        smoothing, CLASSES: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    ib = tl.program_id(1)
    base = b.to(tl.int64) * N * LD
    rows = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    pos_i = tl.load(pos_ptr + b.to(tl.int64) * N + rows, mask=rows < N, other=0)
    loss = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    hits = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        pos_j = tl.load(pos_ptr + b.to(tl.int64) * N + cols, mask=cols < N, other=0)
        valid = (rows[:, None] < N) & (cols[None, :] < N)
        if CLASSES == 1:
            x = _scores(q_ptr, k_ptr, base, base, rows, cols, N, LD, DH, 0,
                        BLOCK_I, BLOCK_J, BLOCK_D, DOT_PRECISION) * scale
            ok = valid & (pos_i[:, None] >= 0) & (pos_i[:, None] < CELLS) & (pos_j[None, :] >= 0) & \
                (pos_j[None, :] < CELLS)
            t = tl.load(table_ptr + pos_i[:, None] * CELLS + pos_j[None, :], mask=ok, other=0.0)
            loss += tl.where(valid, (x - t) * (x - t), 0.0)
        else:
            y = _labels(pos_i, pos_j, GRID_W)
            m = tl.full([BLOCK_I, BLOCK_J], float("-inf"), tl.float32)
            z = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
            xy = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
            xs = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
            am = tl.zeros([BLOCK_I, BLOCK_J], tl.int32)
            for c in tl.static_range(CLASSES):
                x = _scores(q_ptr, k_ptr, base, base, rows, cols, N, LD, DH, c,
                            BLOCK_I, BLOCK_J, BLOCK_D, DOT_PRECISION) * scale
                am = tl.where(x > m, c, am)
                m_new = tl.maximum(m, x)
                z = z * tl.math.exp2((m - m_new) * 1.4426950408889634) + tl.math.exp2((x - m_new) * 1.4426950408889634)
                m = m_new
                xy += tl.where(y == c, x, 0.0)
                xs += x
            lse = m + tl.math.log2(z) * 0.6931471805599453
            loss += tl.where(valid, lse - (1.0 - smoothing) * xy - (smoothing / CLASSES) * xs, 0.0)
            hits += tl.where(valid & (am == y), 1.0, 0.0)
    idx = b * tl.num_programs(1) + ib
    tl.store(loss_ptr + idx, tl.sum(tl.sum(loss, 1), 0))
    tl.store(hits_ptr + idx, tl.sum(tl.sum(hits, 1), 0))


@triton.jit
def relation_bwd_dq_kernel(q_ptr, k_ptr, pos_ptr, table_ptr, dq_ptr, N, LD, DH, GRID_W, CELLS, scale, smoothing,
                           g_scale, CLASSES: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    ib = tl.program_id(1)
    c_out = tl.program_id(2) // tl.cdiv(DH, BLOCK_DO)
    o0 = (tl.program_id(2) % tl.cdiv(DH, BLOCK_DO)) * BLOCK_DO
    base = b.to(tl.int64) * N * LD
    rows = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    pos_i = tl.load(pos_ptr + b.to(tl.int64) * N + rows, mask=rows < N, other=0)
    do = o0 + tl.arange(0, BLOCK_DO)
    acc = tl.zeros([BLOCK_I, BLOCK_DO], tl.float32)
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        pos_j = tl.load(pos_ptr + b.to(tl.int64) * N + cols, mask=cols < N, other=0)
        g = _pair_grad(q_ptr, k_ptr, table_ptr, base, base, rows, cols, pos_i, pos_j, N, LD, DH, GRID_W, CELLS, c_out,
                       scale, smoothing, CLASSES, BLOCK_I, BLOCK_J, BLOCK_D, DOT_PRECISION)
        kv = tl.load(k_ptr + base + cols[:, None].to(tl.int64) * LD + c_out * DH + do[None, :],
                     mask=(cols[:, None] < N) & (do[None, :] < DH), other=0.0).to(tl.float32)
        acc += tl.dot(g, kv, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + base + rows[:, None].to(tl.int64) * LD + c_out * DH + do[None, :],
             (acc * g_scale).to(dq_ptr.dtype.element_ty), mask=(rows[:, None] < N) & (do[None, :] < DH))


@triton.jit
def relation_bwd_dk_kernel(q_ptr, k_ptr, pos_ptr, table_ptr, dk_ptr, N, LD, DH, GRID_W, CELLS, scale, smoothing,
                           g_scale, CLASSES: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    jb = tl.program_id(1)
    c_out = tl.program_id(2) // tl.cdiv(DH, BLOCK_DO)
    o0 = (tl.program_id(2) % tl.cdiv(DH, BLOCK_DO)) * BLOCK_DO
    base = b.to(tl.int64) * N * LD
    cols = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    pos_j = tl.load(pos_ptr + b.to(tl.int64) * N + cols, mask=cols < N, other=0)
    do = o0 + tl.arange(0, BLOCK_DO)
    acc = tl.zeros([BLOCK_J, BLOCK_DO], tl.float32)
    for i0 in range(0, N, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        pos_i = tl.load(pos_ptr + b.to(tl.int64) * N + rows, mask=rows < N, other=0)
        g = _pair_grad(q_ptr, k_ptr, table_ptr, base, base, rows, cols, pos_i, pos_j, N, LD, DH, GRID_W, CELLS, c_out,
                       scale, smoothing, CLASSES, BLOCK_I, BLOCK_J, BLOCK_D, DOT_PRECISION)
        qv = tl.load(q_ptr + base + rows[:, None].to(tl.int64) * LD + c_out * DH + do[None, :],
                     mask=(rows[:, None] < N) & (do[None, :] < DH), other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(g), qv, input_precision=DOT_PRECISION)
    tl.store(dk_ptr + base + cols[:, None].to(tl.int64) * LD + c_out * DH + do[None, :],
             (acc * g_scale).to(dk_ptr.dtype.element_ty), mask=(cols[:, None] < N) & (do[None, :] < DH))


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block_do(dh: int) -> int:
    for b in BLOCK_DOS:
        if dh <= b:
            return b
    return BLOCK_DOS[-1]


def _check(q):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"sslkern.relation_loss: the triton backend takes fp32, fp16 or bf16 tokens, got "
                        f"{str(q.dtype).replace('torch.', '')} (fp64 runs on backend='cpu' or 'reference')")


def _table(table, q):
    return table if table is not None else q.new_zeros(1, dtype=torch.float32)


def relation_loss_triton(q, k, pos, table, grid_w, cells, classes, scale, smoothing):
    _check(q)
    q, k, pos = q.contiguous(), k.contiguous(), pos.contiguous()
    B, N, LD = q.shape
    dh = LD // classes
    bi, bj, bd, nw, ns = CFG["fwd"]
    n_ib = triton.cdiv(N, bi)
    loss = torch.empty(B * n_ib, dtype=torch.float32, device=q.device)
    hits = torch.empty(B * n_ib, dtype=torch.float32, device=q.device)
    relation_fwd_kernel[(B, n_ib)](q, k, pos, _table(table, q), loss, hits, N, LD, dh, grid_w, cells, scale, smoothing,
                                   CLASSES=classes, BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd,
                                   DOT_PRECISION=_dot_precision(q.dtype), num_warps=nw, num_stages=ns)
    pairs = B * N * N
    return loss.sum() / pairs, hits.sum() / pairs


def relation_loss_backward_triton(grad, q, k, pos, table, grid_w, cells, classes, scale, smoothing):
    _check(q)
    q, k, pos = q.contiguous(), k.contiguous(), pos.contiguous()
    B, N, LD = q.shape
    dh = LD // classes
    bi, bj, bd, _, nw, ns = CFG["bwd"]
    bdo = _block_do(dh)
    gs = scale / (B * N * N)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    n_o = classes * triton.cdiv(dh, bdo)
    prec = _dot_precision(q.dtype)
    t = _table(table, q)
    relation_bwd_dq_kernel[(B, triton.cdiv(N, bi), n_o)](
        q, k, pos, t, dq, N, LD, dh, grid_w, cells, scale, smoothing, gs, CLASSES=classes, BLOCK_I=bi, BLOCK_J=bj,
        BLOCK_D=bd, BLOCK_DO=bdo, DOT_PRECISION=prec, num_warps=nw, num_stages=ns)
    relation_bwd_dk_kernel[(B, triton.cdiv(N, bj), n_o)](
        q, k, pos, t, dk, N, LD, dh, grid_w, cells, scale, smoothing, gs, CLASSES=classes, BLOCK_I=bi, BLOCK_J=bj,
        BLOCK_D=bd, BLOCK_DO=bdo, DOT_PRECISION=prec, num_warps=nw, num_stages=ns)
    g = grad.to(torch.float32)  # the incoming gradient, a device scalar: no host sync
    return (dq * g).to(q.dtype), (dk * g).to(k.dtype)


# ---------------------------------------------------------------------------------------
# Every configuration the launchers can pick, for the GPU report (compiled ahead of time)
# ---------------------------------------------------------------------------------------
_SCALARS = {"N": "i32", "LD": "i32", "DH": "i32", "GRID_W": "i32", "CELLS": "i32", "scale": "fp32", "smoothing": "fp32"}
_DTYPES = [("fp32", "fp32", "ieee"), ("fp32/tf32", "fp32", "tf32"), ("fp16", "fp16", "ieee"), ("bf16", "bf16", "ieee")]


def _aot_configs():
    configs = []
    for label, ty, prec in _DTYPES:
        p = "*" + ty
        base = {"q_ptr": p, "k_ptr": p, "pos_ptr": "*i64", "table_ptr": "*fp32"}
        for classes in (9, 1):
            bi, bj, bd, nw, ns = CFG["fwd"]
            configs.append(dict(
                name=f"relation_fwd {label} C={classes}", kernel=relation_fwd_kernel,
                signature={**base, "loss_ptr": "*fp32", "hits_ptr": "*fp32", **_SCALARS},
                constexprs=dict(CLASSES=classes, BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, DOT_PRECISION=prec),
                num_warps=nw, num_stages=ns))
            bi, bj, bd, _, nw, ns = CFG["bwd"]
            for bdo in BLOCK_DOS:
                for which, kernel, out in (("dq", relation_bwd_dq_kernel, "dq_ptr"),
                                           ("dk", relation_bwd_dk_kernel, "dk_ptr")):
                    configs.append(dict(
                        name=f"relation_bwd_{which} {label} C={classes} BLOCK_DO={bdo}", kernel=kernel,
                        signature={**base, out: "*fp32", **_SCALARS, "g_scale": "fp32"},
                        constexprs=dict(CLASSES=classes, BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, BLOCK_DO=bdo,
                                        DOT_PRECISION=prec),
                        num_warps=nw, num_stages=ns))
    return configs


AOT_CONFIGS = _aot_configs()
