"""``cross_correlation_loss`` — Triton kernels for the Barlow Twins loss (standardisation and its
backward fused), with the N × N / strip products on cuBLAS (``torch.mm``); no (D, D) tensor.

Launches:
  1. ``standardize_pair_kernel`` — one program per (BLOCK_D columns, group): the group's column
     means and biased variances of both views (two passes over its rows), the standardised
     copies ``ha, hb`` (fp32) and the group's share of ``Σ_n ha·hb`` per column (a (groups, D)
     buffer summed by ``torch.sum``: deterministic, no atomics).
  2. products (``sslkern/ops/cross_correlation_loss.py`` has the algebra): Gram form
     ``K_a = ha[R]·haᵀ``, ``K_b = hb[R]·hbᵀ`` (|R| × N), ``P = K_a·hb/N``, ``Q = K_b·ha/N``; tiled form
     ``S = ha[:, I]ᵀ·hb/N`` per strip of bw ≤ 512 rows of C, ``Q[:, I] = hb[R]·Sᵀ``, ``P += ha[R, I]·S``.
  3. ``barlow_grad_kernel`` — one program per (BLOCK_D columns, group of R): ``G = scale/N ·
     (2λ·X + y⊙δ)`` from P or Q, its column sums ``Σ G`` and ``Σ G⊙h`` over the group, then
     (``FINISH``) ``dz = rstd·(G − ΣG/m − h·Σ(G⊙h)/m)`` in the input dtype; else G (fp32) and the sums.
Products are fp32 (TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set); fp16 / bf16 inputs
are read as they are and standardised in fp32. fp64 runs on the cpu / reference backends.
Row offsets are int64 before the multiply by D (grid-size rule of docs/design.md); grids are
(column blocks, groups) with at most 65,535 groups (checked).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32
BLOCK_D = 128
NUM_WARPS = 4
STRIP = 512

_TS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def standardize_pair_kernel(za_ptr, zb_ptr, ha_ptr, hb_ptr, stat_ptr, cross_ptr, D, M, G, eps,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    g = tl.program_id(1).to(tl.int64)
    cm = cols < D
    r0 = g * M
    sa = tl.zeros([BLOCK_D], tl.float32)
    sb = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows < M)[:, None] & cm[None, :]
        offs = (r0 + rows.to(tl.int64))[:, None] * D + cols[None, :]
        sa += tl.sum(tl.load(za_ptr + offs, mask=m, other=0.0).to(tl.float32), 0)
        sb += tl.sum(tl.load(zb_ptr + offs, mask=m, other=0.0).to(tl.float32), 0)
    mean_a = sa / M
    mean_b = sb / M
    va = tl.zeros([BLOCK_D], tl.float32)
    vb = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows < M)[:, None] & cm[None, :]
        offs = (r0 + rows.to(tl.int64))[:, None] * D + cols[None, :]
        da = tl.where(m, tl.load(za_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean_a[None, :], 0.0)
        db = tl.where(m, tl.load(zb_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean_b[None, :], 0.0)
        va += tl.sum(da * da, 0)
        vb += tl.sum(db * db, 0)
    rstd_a = 1.0 / tl.sqrt(va / M + eps)
    rstd_b = 1.0 / tl.sqrt(vb / M + eps)
    tl.store(stat_ptr + (0 * G + g) * D + cols, mean_a, mask=cm)
    tl.store(stat_ptr + (1 * G + g) * D + cols, rstd_a, mask=cm)
    tl.store(stat_ptr + (2 * G + g) * D + cols, mean_b, mask=cm)
    tl.store(stat_ptr + (3 * G + g) * D + cols, rstd_b, mask=cm)
    cross = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows < M)[:, None] & cm[None, :]
        offs = (r0 + rows.to(tl.int64))[:, None] * D + cols[None, :]
        ha = (tl.load(za_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean_a[None, :]) * rstd_a[None, :]
        hb = (tl.load(zb_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean_b[None, :]) * rstd_b[None, :]
        tl.store(ha_ptr + offs, ha, mask=m)
        tl.store(hb_ptr + offs, hb, mask=m)
        cross += tl.sum(tl.where(m, ha * hb, 0.0), 0)
    tl.store(cross_ptr + g * D + cols, cross, mask=cm)


@triton.jit
def barlow_grad_kernel(x_ptr, y_ptr, h_ptr, delta_ptr, rstd_ptr, out_ptr, sums_ptr, D, M, two_lambda, coef,
                       FINISH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """x: P or Q rows of R (fp32), y: the other view's standardised rows of R, h: this view's;
    program (column block, group g of R's m-row groups)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    g = tl.program_id(1).to(tl.int64)
    cm = cols < D
    delta = tl.load(delta_ptr + cols, mask=cm, other=0.0)
    s1 = tl.zeros([BLOCK_D], tl.float32)
    s2 = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, M, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows < M)[:, None] & cm[None, :]
        offs = (g * M + rows.to(tl.int64))[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        y = tl.load(y_ptr + offs, mask=m, other=0.0)
        h = tl.load(h_ptr + offs, mask=m, other=0.0)
        grad = coef * (two_lambda * x + y * delta[None, :])
        s1 += tl.sum(grad, 0)
        s2 += tl.sum(grad * h, 0)
        if not FINISH:
            tl.store(out_ptr + offs, grad, mask=m)
    if FINISH:
        rstd = tl.load(rstd_ptr + g * D + cols, mask=cm, other=0.0)
        m1 = s1 / M
        m2 = s2 / M
        for n0 in range(0, M, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            m = (rows < M)[:, None] & cm[None, :]
            offs = (g * M + rows.to(tl.int64))[:, None] * D + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0)
            y = tl.load(y_ptr + offs, mask=m, other=0.0)
            h = tl.load(h_ptr + offs, mask=m, other=0.0)
            grad = coef * (two_lambda * x + y * delta[None, :])
            dz = rstd[None, :] * (grad - m1[None, :] - h * m2[None, :])
            tl.store(out_ptr + offs, dz.to(out_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(sums_ptr + cols, s1, mask=cm)
        tl.store(sums_ptr + D + cols, s2, mask=cm)


def _products(ha, hb, r0, r1, tiled, need_p, need_q):
    """(P, Q, ‖C‖²_F or None): P = ha[R]·C, Q = hb[R]·Cᵀ; the total ‖C‖² when R is every row."""
    n = ha.shape[0]
    full = r0 == 0 and r1 == n
    P = Q = sq = None
    if not tiled:
        ka = ha[r0:r1] @ ha.t()
        kb = hb[r0:r1] @ hb.t()
        if full:
            sq = (ka * kb).sum(dtype=torch.float64) / (n * n)
        P = (ka @ hb).div_(n) if need_p else None
        Q = (kb @ ha).div_(n) if need_q else None
        return P, Q, sq
    d = ha.shape[1]
    P = torch.zeros(r1 - r0, d, device=ha.device, dtype=torch.float32) if need_p else None
    Q = torch.empty(r1 - r0, d, device=ha.device, dtype=torch.float32) if need_q else None
    sq = torch.zeros((), device=ha.device, dtype=torch.float64) if full else None
    for i0 in range(0, d, STRIP):
        i1 = min(d, i0 + STRIP)
        s = (ha[:, i0:i1].t() @ hb).div_(n)  # C[I, :]
        if full:
            sq += s.square().sum(dtype=torch.float64)
        if need_q:
            Q[:, i0:i1] = hb[r0:r1] @ s.t()
        if need_p:
            P.addmm_(ha[r0:r1, i0:i1], s)
    return P, Q, sq


def cross_correlation_loss_triton(za, zb, lambd, scale, eps, groups, row0, row1, finish, method, grad_a, grad_b):
    if za.dtype not in _TS:
        raise TypeError(f"sslkern.cross_correlation_loss: the triton backend takes fp32, fp16 or bf16 projections, got "
                        f"{str(za.dtype).replace('torch.', '')} (fp64 runs on backend='cpu' or 'reference')")
    if groups > 65535:
        raise ValueError(f"sslkern.cross_correlation_loss: the triton backend takes at most 65,535 groups, got {groups}")
    za, zb = za.contiguous(), zb.contiguous()
    n, d = za.shape
    m = n // groups
    dev = za.device
    ha = torch.empty(n, d, device=dev, dtype=torch.float32)
    hb = torch.empty_like(ha)
    stat = torch.empty(4, groups, d, device=dev, dtype=torch.float32)
    cross = torch.empty(groups, d, device=dev, dtype=torch.float32)
    grid = (triton.cdiv(d, BLOCK_D), groups)
    standardize_pair_kernel[grid](za, zb, ha, hb, stat, cross, d, m, groups, eps, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                  num_warps=NUM_WARPS)
    c = cross.sum(0, dtype=torch.float64) / n
    on = (1 - c).square().sum()
    tr, tr2 = c.sum(), c.square().sum()
    full = row0 == 0 and row1 == n
    need_p = grad_b or not full
    P, Q, sq = _products(ha, hb, row0, row1, method == "tiled", need_p, grad_a)
    if not full:
        sq = (P.double() * hb[row0:row1].double()).sum() / n
    frac = (row1 - row0) / n
    loss = (scale * (frac * (on - lambd * tr2) + lambd * sq)).float()
    stats = torch.stack([on, sq, tr, tr2]).float()
    gdt = za.dtype if finish else torch.float32
    empty = za.new_empty(0, dtype=gdt)
    if not (grad_a or grad_b):
        return loss, empty, za.new_empty(0, dtype=gdt), stats, za.new_empty(0, dtype=torch.float32)
    delta = (2 * (c - 1) - 2 * lambd * c).float()
    coef, two_lambda = scale / n, 2 * lambd
    nr = row1 - row0
    outs, sums = [], torch.zeros(8, d, device=dev, dtype=torch.float32) if not finish else None
    for k, (want, x, y, h) in enumerate(((grad_a, Q, hb, ha), (grad_b, P, ha, hb))):
        if not want:
            outs.append(empty)
            continue
        out = torch.empty(nr, d, device=dev, dtype=gdt)
        g_rows = m if finish else nr
        rstd = stat[2 * k + 1, row0 // m:] if finish else stat[2 * k + 1]
        s_out = sums[2 * k:2 * k + 2] if not finish else out
        barlow_grad_kernel[(triton.cdiv(d, BLOCK_D), nr // g_rows)](
            x, y[row0:row1], h[row0:row1], delta, rstd, out, s_out, d, g_rows, two_lambda, coef,
            FINISH=finish, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
        outs.append(out)
    if not finish:
        sums[4:] = stat[:, 0]
        return loss, outs[0], outs[1], stats, sums
    return loss, outs[0], outs[1], stats, za.new_empty(0, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for the GPU report (compiled ahead of time)
# ---------------------------------------------------------------------------------------
AOT_DIVISIBLE = ("D",)


def _aot_configs():
    configs = []
    for dt, ty in _TS.items():
        p = "*" + ty
        configs.append(dict(
            name=f"standardize_pair {ty}", kernel=standardize_pair_kernel,
            signature={"za_ptr": p, "zb_ptr": p, "ha_ptr": "*fp32", "hb_ptr": "*fp32", "stat_ptr": "*fp32",
                       "cross_ptr": "*fp32", "D": "i32", "M": "i32", "G": "i32", "eps": "fp32"},
            constexprs=dict(BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D), num_warps=NUM_WARPS, num_stages=3))
        configs.append(dict(
            name=f"barlow_grad {ty} finish", kernel=barlow_grad_kernel,
            signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "h_ptr": "*fp32", "delta_ptr": "*fp32", "rstd_ptr": "*fp32",
                       "out_ptr": p, "sums_ptr": p, "D": "i32", "M": "i32", "two_lambda": "fp32", "coef": "fp32"},
            constexprs=dict(FINISH=True, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D), num_warps=NUM_WARPS, num_stages=3))
    configs.append(dict(
        name="barlow_grad fp32 rows", kernel=barlow_grad_kernel,
        signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "h_ptr": "*fp32", "delta_ptr": "*fp32", "rstd_ptr": "*fp32",
                   "out_ptr": "*fp32", "sums_ptr": "*fp32", "D": "i32", "M": "i32", "two_lambda": "fp32",
                   "coef": "fp32"},
        constexprs=dict(FINISH=False, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D), num_warps=NUM_WARPS, num_stages=3))
    return configs


AOT_CONFIGS = _aot_configs()
