"""``vicreg_loss`` — Triton kernels for the VICReg loss (centring, statistics and the gradient
fused), with the N × N / strip products on cuBLAS (``torch.mm``); no (D, D) tensor.

Launches per view:
  1. ``centre_kernel`` — one program per BLOCK_D columns: column mean (one pass), then the centred
     copy ``X = z − mean`` (fp32) and ``s = Σ_n X²`` (second pass).
  2. products (``sslkern/ops/vicreg_loss.py`` has the algebra): ``Y = X[R]·XᵀX`` — Gram form
     ``K = X[R]·Xᵀ``, ``Y = K·X``; tiled form ``S = X[:, I]ᵀ·X`` per strip of ≤ 512 rows, ``Y[:, I] =
     X[R]·Sᵀ`` (XᵀX is symmetric).
  3. ``vicreg_grad_kernel`` — one program per (BLOCK_N rows, BLOCK_D columns) of R: the gradient
     ``c_cov·(Y − X⊙s) − g_std⊙X ± c_inv·(z_a − z_b)`` in the input dtype.
The D-length statistics (std, relu sums, counts) and the loss are torch reductions on the device
(no host sync). Products are fp32 (TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set);
fp16 / bf16 inputs are read as they are. fp64 runs on the cpu / reference backends.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# the tile sizes, strip height and dtypes of the Barlow Twins kernels (same access pattern)
from .cross_correlation_loss import _TS, BLOCK_D, BLOCK_N, NUM_WARPS, STRIP


@triton.jit
def centre_kernel(z_ptr, x_ptr, s_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows < N)[:, None] & cm[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        acc += tl.sum(tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32), 0)
    mean = acc / N
    sq = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows < N)[:, None] & cm[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.where(m, tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean[None, :], 0.0)
        tl.store(x_ptr + offs, x, mask=m)
        sq += tl.sum(x * x, 0)
    tl.store(s_ptr + cols, sq, mask=cm)


@triton.jit
def vicreg_grad_kernel(y_ptr, x_ptr, za_ptr, zb_ptr, s_ptr, gstd_ptr, out_ptr, NR, D, c_cov, c_inv,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of R: y = Y (fp32), x = X[R] (fp32), za / zb = the inputs' rows of R."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    m = (rows < NR)[:, None] & cm[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    s = tl.load(s_ptr + cols, mask=cm, other=0.0)
    gs = tl.load(gstd_ptr + cols, mask=cm, other=0.0)
    y = tl.load(y_ptr + offs, mask=m, other=0.0)
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    d = tl.load(za_ptr + offs, mask=m, other=0.0).to(tl.float32) - tl.load(zb_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = c_cov * (y - x * s[None, :]) - gs[None, :] * x + c_inv * d
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=m)


def _covariance_rows(x, r0, r1, tiled, need_y):
    """(Y = X[R]·XᵀX or None, Σ_{n∈R} ‖K[n]‖² as a float64 device scalar)."""
    n, d = x.shape
    full = r0 == 0 and r1 == n
    if not tiled:
        k = x[r0:r1] @ x.t()
        return ((k @ x) if need_y else None), k.square().sum(dtype=torch.float64)
    y = torch.empty(r1 - r0, d, device=x.device, dtype=torch.float32) if need_y else None
    sq = torch.zeros((), device=x.device, dtype=torch.float64)
    for i0 in range(0, d, STRIP):
        i1 = min(d, i0 + STRIP)
        s = x[:, i0:i1].t() @ x  # (XᵀX)[I, :]
        if full:
            sq += s.square().sum(dtype=torch.float64)
        if need_y:
            y[:, i0:i1] = x[r0:r1] @ s.t()
    if not full:
        sq = (x[r0:r1].double() * y.double()).sum()
    return y, sq


def vicreg_loss_triton(za, zb, sim_coeff, std_coeff, cov_coeff, eps, std_scale, row0, row1, method, grad_a, grad_b):
    if za.dtype not in _TS:
        raise TypeError(f"sslkern.vicreg_loss: the triton backend takes fp32, fp16 or bf16 projections, got "
                        f"{str(za.dtype).replace('torch.', '')} (fp64 runs on backend='cpu' or 'reference')")
    za, zb = za.contiguous(), zb.contiguous()
    n, d = za.shape
    nr = row1 - row0
    full = row0 == 0 and row1 == n
    frac = nr / n
    dev = za.device
    diff = (za[row0:row1].float() - zb[row0:row1].float()).square().sum(dtype=torch.float64)
    c_cov = 4 * cov_coeff / ((n - 1) ** 2 * d)
    c_std = std_coeff * std_scale / d
    c_inv = 2 * sim_coeff / (n * d)
    stats, grads = [], []
    for v, (z, want) in enumerate(((za, grad_a), (zb, grad_b))):
        x = torch.empty(n, d, device=dev, dtype=torch.float32)
        s = torch.empty(d, device=dev, dtype=torch.float32)
        centre_kernel[(triton.cdiv(d, BLOCK_D),)](z, x, s, n, d, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
        var = s.double() / (n - 1)
        std = (var + eps).sqrt()
        low = std < 1
        y, sq = _covariance_rows(x, row0, row1, method == "tiled", want or not full)
        off = (sq - frac * s.double().square().sum()) / (n - 1) ** 2
        stats.append([torch.relu(1 - std).sum(), std.sum(), low.sum().double(), off, var.sum(), var.square().sum()])
        if not want:
            grads.append(z.new_empty(0))
            continue
        gstd = torch.where(low, c_std / ((n - 1) * std), 0.0).float()
        out = torch.empty(nr, d, device=dev, dtype=z.dtype)
        vicreg_grad_kernel[(triton.cdiv(nr, BLOCK_N), triton.cdiv(d, BLOCK_D))](
            y, x[row0:row1], za[row0:row1], zb[row0:row1], s, gstd, out, nr, d, c_cov, c_inv if v == 0 else -c_inv,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
        grads.append(out)
    (ra, sa, la, oa, va, qa), (rb, sb, lb, ob, vb, qb) = stats
    loss = sim_coeff * diff / (n * d) + frac * std_coeff * std_scale * (ra + rb) / d + cov_coeff * (oa + ob) / d
    st = torch.stack([diff, ra, rb, sa, sb, la, lb, oa, ob, va, vb, qa, qb]).float()
    return loss.float(), grads[0], grads[1], st


# ---------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for the GPU report (compiled ahead of time)
# ---------------------------------------------------------------------------------------
AOT_DIVISIBLE = ("D",)


def _aot_configs():
    configs = []
    for dt, ty in _TS.items():
        p = "*" + ty
        configs.append(dict(
            name=f"centre {ty}", kernel=centre_kernel,
            signature={"z_ptr": p, "x_ptr": "*fp32", "s_ptr": "*fp32", "N": "i32", "D": "i32"},
            constexprs=dict(BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D), num_warps=NUM_WARPS, num_stages=3))
        configs.append(dict(
            name=f"vicreg_grad {ty}", kernel=vicreg_grad_kernel,
            signature={"y_ptr": "*fp32", "x_ptr": "*fp32", "za_ptr": p, "zb_ptr": p, "s_ptr": "*fp32",
                       "gstd_ptr": "*fp32", "out_ptr": p, "NR": "i32", "D": "i32", "c_cov": "fp32", "c_inv": "fp32"},
            constexprs=dict(BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D), num_warps=NUM_WARPS, num_stages=3))
    return configs


AOT_CONFIGS = _aot_configs()
