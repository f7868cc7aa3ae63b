r"""``cross_correlation_loss`` — the Barlow Twins loss without the (D, D) cross-correlation matrix.

For projections ``z_a, z_b`` (N, D), standardised per dimension over the batch (mean, biased
variance, eps: ``BatchNorm1d(affine=False)``), ``C = ẑ_aᵀ ẑ_b / N`` and

    L = scale · [ Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij² ].

``Σ_ij C_ij² = ⟨K_a, K_b⟩_F / N²`` with the (N, N) Gram matrices ``K = ẑ ẑᵀ``, so for N ≪ D the
loss and its gradients

    G_a = ∂L/∂ẑ_a = scale · [ (2λ/N²) K_b ẑ_a + (2/N) ((C_ii − 1) − λ C_ii)_i ⊙ ẑ_b ]   (G_b alike)

come from N × N products (``method="gram"``); for N ≳ D the kernels walk C in strips of rows
(``method="tiled"``): a (bd, D) strip of C at a time, its loss terms and ``dL/dC`` strip,
``G_a[:, strip] = ẑ_b dC_stripᵀ / N`` and ``G_b += ẑ_a[:, strip] dC_strip / N`` — flash style,
no (D, D) tensor. The standardisation and its backward (``dz = rstd·(G − mean(G) −
ẑ·mean(G⊙ẑ))`` per group) are fused in. ``method="auto"`` picks the form with fewer flops
(:func:`resolve_method`: Gram for the whole batch when N < 3D/4).

One custom op, ``torch.ops.sslkern.cross_correlation_loss(za, zb, lambd, scale, eps, groups, row0,
row1, finish, method, grad_a, grad_b, backend) -> (loss, dza, dzb, stats, sums)``:

* full batch (``row0 = 0, row1 = N, finish = True``): the loss, its gradients w.r.t. ``za`` and
  ``zb`` (computed in the same call when asked; backward rescales them, as ``dino_loss``), and
  ``stats = [Σ(1 − C_ii)², ‖C‖²_F, Σ C_ii, Σ C_ii²]`` (fp32; fp64 for fp64), ``sums`` empty.
* rows ``R = [row0, row1)`` of a batch gathered from several ranks (``sslkern.nn.BarlowTwinsLoss``;
  the op itself never communicates): ``loss`` is R's share of the loss (the shares of a
  partition of the rows add up to the loss), ``stats[1]`` R's share of ‖C‖²_F
  (``Σ_{n∈R} ⟨K_a[n], K_b[n]⟩ / N²``), the gradients are those of the rows R only. With
  ``finish = True`` (R a union of whole groups) they are ∂L/∂z[R]; with ``finish = False``
  (``groups = 1``: the standardisation statistics span every rank) they are ``G[R]`` (fp32)
  and ``sums = [Σ_R G_a, Σ_R G_a⊙ẑ_a, Σ_R G_b, Σ_R G_b⊙ẑ_b, mean_a, rstd_a, mean_b, rstd_b]``
  (8, D): the caller adds the sums over ranks and finishes ``dz = rstd·(G − ΣG/N − ẑ·Σ(G⊙ẑ)/N)``.
  These calls are not differentiable (the module computes its own gradient).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import Dispatch, ext_op, module_attr
from .._checks import check_choice, check_tensor, fail
from .dino_loss import _is_eager_cpu_scalar

OP = "cross_correlation_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
METHODS = ("auto", "gram", "tiled")
_N_INPUTS = 13


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_method(method: str, n: int, d: int, rows: int, tiled_strip_passes: int = 1) -> str:
    """``"gram"`` or ``"tiled"``: the given one, or for ``"auto"`` the one with fewer flops for the
    ``rows`` (≤ N) whose gradients are wanted: Gram ``8·rows·N·D`` (two Gram row blocks, two
    products with them) against tiled ``2·p·N·D² + 4·rows·D²`` (p = ``tiled_strip_passes``: the
    strips of the (D, D) matrix formed, 1 for Barlow Twins' C, 2 for VICReg's two covariances,
    then two strip products). The whole batch: Gram when N < 3D/4 (Barlow Twins), N < D (VICReg)."""
    if method != "auto":
        return method
    gram = 8 * rows * n * d
    tiled = 2 * tiled_strip_passes * n * d * d + 4 * rows * d * d
    return "gram" if gram < tiled else "tiled"


def _standardize(z: torch.Tensor, groups: int, eps: float):
    n, d = z.shape
    zg = z.view(groups, n // groups, d)
    mean = zg.mean(1, keepdim=True)
    var = (zg - mean).square().mean(1, keepdim=True)
    rstd = (var + eps).rsqrt()
    return ((zg - mean) * rstd).view(n, d), mean.view(groups, d), rstd.view(groups, d)


def _reference_impl(za, zb, lambd, scale, eps, groups, row0, row1, finish, method, grad_a, grad_b):
    """The custom op's contract in eager PyTorch (builds the (D, D) matrix; the oracle backend).
    Custom-op bodies run below autograd, so the gradient is written out:
    ``dC = scale·(2λC + diag(2(C_ii − 1) − 2λC_ii))``, ``G_a = ẑ_b dCᵀ/N``, ``G_b = ẑ_a dC/N``."""
    acc = _acc(za.dtype)
    n, d = za.shape
    ha, mean_a, rstd_a = _standardize(za.to(acc), groups, eps)
    hb, mean_b, rstd_b = _standardize(zb.to(acc), groups, eps)
    c = ha.t() @ hb / n
    diag = c.diagonal()
    on = (1 - diag).square().sum()
    rows = slice(row0, row1)
    full = row0 == 0 and row1 == n
    sq_rows = (c * c).sum() if full else ((ha[rows] @ c) * hb[rows]).sum() / n
    stats = torch.stack([on, sq_rows, diag.sum(), diag.square().sum()])
    frac = (row1 - row0) / n
    loss = scale * (frac * (on - lambd * stats[3]) + lambd * sq_rows)
    gdt = za.dtype if finish else acc
    empty = za.new_empty(0, dtype=gdt)
    if not (grad_a or grad_b):
        return loss, empty, zb.new_empty(0, dtype=gdt), stats, za.new_empty(0, dtype=acc)
    dc = 2 * lambd * c
    dc.diagonal().copy_(2 * (diag - 1))
    dc = dc * scale
    ga = hb[rows] @ dc.t() / n
    gb = ha[rows] @ dc / n
    if not finish:
        sums = torch.stack([ga.sum(0), (ga * ha[rows]).sum(0), gb.sum(0), (gb * hb[rows]).sum(0),
                            mean_a[0], rstd_a[0], mean_b[0], rstd_b[0]])
        return loss, ga if grad_a else empty, gb if grad_b else empty, stats, sums

    def finish_rows(g, h, rstd, z):
        m = n // groups
        k0, k1 = row0 // m, row1 // m
        gg = g.view(k1 - k0, m, d)
        hh = h[rows].view(k1 - k0, m, d)
        out = rstd[k0:k1, None, :] * (gg - gg.mean(1, keepdim=True) - hh * (gg * hh).mean(1, keepdim=True))
        return out.reshape(row1 - row0, d).to(z.dtype)

    dza = finish_rows(ga, ha, rstd_a, za) if grad_a else empty
    dzb = finish_rows(gb, hb, rstd_b, zb) if grad_b else empty
    return loss, dza, dzb, stats, za.new_empty(0, dtype=acc)


dispatch = Dispatch(
    OP,
    {
        "reference": lambda: _reference_impl,
        "cpu": ext_op("cross_correlation_loss_cpu"),
        "triton": module_attr("sslkern.triton_ops.cross_correlation_loss", "cross_correlation_loss_triton"),
    },
)


def _check_rows(n: int, groups: int, row0: int, row1: int, finish: bool) -> None:
    if not 0 <= row0 < row1 <= n:
        fail(OP, f"rows expected 0 <= row0 < row1 <= N = {n}, got [{row0}, {row1})")
    if groups < 1 or n % groups or n // groups < 2:
        fail(OP, f"groups expected a divisor of N = {n} leaving at least 2 rows per group, got {groups}")
    m = n // groups
    if finish and (row0 % m or row1 % m):
        fail(OP, f"finish=True expected rows [{row0}, {row1}) made of whole groups of {m} rows")
    if not finish and groups != 1:
        fail(OP, f"finish=False expected groups = 1 (the sums span one standardisation group), got {groups}")


@torch.library.custom_op("sslkern::cross_correlation_loss", mutates_args=())
def _cross_correlation_loss_op(za: torch.Tensor, zb: torch.Tensor, lambd: float, scale: float, eps: float,
                               groups: int, row0: int, row1: int, finish: bool, method: str, grad_a: bool,
                               grad_b: bool, backend: str
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d = za.shape
    _check_rows(n, groups, row0, row1, finish)
    method = resolve_method(method, n, d, row1 - row0)
    out = dispatch(za.device, backend)(za, zb, lambd, scale, eps, groups, row0, row1, finish, method, grad_a, grad_b)
    return tuple(out)


@_cross_correlation_loss_op.register_fake
def _(za, zb, lambd, scale, eps, groups, row0, row1, finish, method, grad_a, grad_b, backend):
    acc = _acc(za.dtype)
    rows = row1 - row0
    d = za.shape[1]
    gdt = za.dtype if finish else acc
    dza = za.new_empty((rows, d), dtype=gdt) if grad_a else za.new_empty(0, dtype=za.dtype if finish else acc)
    dzb = zb.new_empty((rows, d), dtype=gdt) if grad_b else zb.new_empty(0, dtype=zb.dtype if finish else acc)
    sums = za.new_empty((8, d) if (not finish and (grad_a or grad_b)) else (0,), dtype=acc)
    return za.new_empty((), dtype=acc), dza, dzb, za.new_empty((4,), dtype=acc), sums


def _setup_context(ctx, inputs, output):
    za, zb = inputs[0], inputs[1]
    ctx.full = inputs[6] == 0 and inputs[7] == za.shape[0] and inputs[8]
    ctx.grad_a, ctx.grad_b = inputs[10], inputs[11]
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _scaled(grad, g_loss):
    acc = torch.float64 if torch.float64 in (grad.dtype, g_loss.dtype) else torch.float32
    return torch.mul(grad.to(acc), g_loss.to(device=grad.device, dtype=acc)).to(grad.dtype)


def _backward(ctx, g_loss, *unused):
    none = (None,) * (_N_INPUTS - 2)
    if g_loss is None:
        return (None, None) + none
    if not ctx.full:
        raise RuntimeError("sslkern.cross_correlation_loss: backward through a rows call (row0, row1 not the whole "
                           "batch, or finish=False): its gradients are returned, not differentiated")
    dza, dzb = ctx.saved_tensors
    if not (_is_eager_cpu_scalar(g_loss) and float(g_loss) == 1.0):  # else: the stored gradients as they are
        dza = _scaled(dza, g_loss) if ctx.grad_a else dza
        dzb = _scaled(dzb, g_loss) if ctx.grad_b else dzb
    return (dza if ctx.grad_a else None, dzb if ctx.grad_b else None) + none


_cross_correlation_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def _needs_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


def check_pair(op: str, z_a, z_b) -> tuple[int, int]:
    """The two projections: (N, D) float tensors of one shape, dtype and device, N >= 2."""
    check_tensor(op, "z_a", z_a, dtypes=_FLOATS, ndim=2)
    check_tensor(op, "z_b", z_b, dtypes=_FLOATS, ndim=2, device=z_a.device)
    if z_b.dtype != z_a.dtype:
        fail(op, f"z_b expected dtype {str(z_a.dtype).replace('torch.', '')} (z_a's dtype), "
                 f"got {str(z_b.dtype).replace('torch.', '')}", TypeError)
    if z_b.shape != z_a.shape:
        fail(op, f"z_b expected shape {tuple(z_a.shape)} (z_a's shape), got {tuple(z_b.shape)}")
    n, d = z_a.shape
    if n < 2:
        fail(op, f"z_a expected at least 2 rows (batch statistics need two samples), got shape {tuple(z_a.shape)}")
    if d < 1:
        fail(op, f"z_a expected at least 1 column, got shape {tuple(z_a.shape)}")
    return n, d


def check_float(op: str, name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(op, f"{name} expected a Python float, got {type(value).__name__}", TypeError)
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        fail(op, f"{name} expected a finite{' positive' if positive else ''} value, got {value}")
    return value


def barlow_stats(stats: torch.Tensor, n: int, d: int, groups: int = 1) -> dict:
    """Health figures from the op's ``stats``: ``on_diag`` Σ(1 − C_ii)², ``off_diag`` Σ_{i≠j} C_ij²,
    ``mean_diag`` mean C_ii, and ``off_diag_floor``, the least Σ_{i≠j} C_ij² any embedding with
    these C_ii can reach: rank(C) ≤ r = min(D, N − groups) (columns centred per group), so
    ``‖C‖²_F ≥ (Σ C_ii)²/r`` and ``off ≥ (Σ C_ii)²/r − Σ C_ii²`` (``D²/(N − 1) − D`` when every C_ii = 1)."""
    on, sq, tr, tr2 = stats.unbind()
    r = min(d, n - groups)
    return {"on_diag": on, "off_diag": sq - tr2, "mean_diag": tr / d,
            "off_diag_floor": (tr * tr / r - tr2).clamp(min=0)}


def cross_correlation_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    lambd: float = 0.0051,
    *,
    scale: float = 1.0,
    eps: float = 1e-5,
    groups: int = 1,
    method: str = "auto",
    return_stats: bool = False,
    backend: Optional[str] = None,
):
    r"""Barlow Twins loss (facebookresearch/barlowtwins ``main.py: BarlowTwins.forward``), exact,
    without the (D, D) cross-correlation matrix.

    ``scale·[Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²]``, ``C = ẑ_aᵀ ẑ_b / N``, ẑ the projections
    standardised per dimension over the batch (mean, biased variance + ``eps``: the official
    ``BatchNorm1d(affine=False)`` in training mode). See the module docstring for the Gram
    and tiled forms.

    Peers' conventions: the official code is the default (λ = 0.0051, statistics over the
    whole batch); lightly ``BarlowTwinsLoss`` uses ``lambd=5e-3`` (and, across ranks, each
    rank's own statistics: ``groups = world`` on the gathered batch); solo-learn
    ``barlow_loss_func`` ``lambd=5e-3, scale=0.025``. For torchrun use
    :class:`sslkern.nn.BarlowTwinsLoss` (exact gradients; the official code's are 1/world of them).

    Args:
        z_a, z_b: (N, D) projections of the two views; fp32, bf16, fp16 or fp64, N ≥ 2.
        lambd: weight λ of the off-diagonal terms.
        scale: multiplies the loss (solo-learn's ``scale_loss``).
        eps: added to the variance (BatchNorm's eps).
        groups: the rows are ``groups`` equal blocks standardised separately (≥ 2 rows each).
        method: ``"auto"`` (the form with fewer flops: Gram when N < 3D/4), ``"gram"`` or ``"tiled"``.
        return_stats: also return a dict of 0-dim tensors (no host sync): ``on_diag``,
            ``off_diag``, ``mean_diag``, ``off_diag_floor`` (see :func:`barlow_stats`).
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Returns:
        the loss, a 0-dim fp32 tensor (fp64 for fp64 inputs), or ``(loss, stats)``.
        Differentiable w.r.t. ``z_a`` and ``z_b``: the gradients are computed in the same
        call when either requires grad; backward rescales them. Arithmetic is fp32 (fp64 for
        fp64); fp16 / bf16 gradients are rounded to the input dtype once.
    """
    n, d = check_pair(OP, z_a, z_b)
    lambd = check_float(OP, "lambd", lambd)
    scale = check_float(OP, "scale", scale)
    eps = check_float(OP, "eps", eps, positive=True)
    if isinstance(groups, bool) or not isinstance(groups, int):
        fail(OP, f"groups expected an int, got {type(groups).__name__}", TypeError)
    if groups < 1 or n % groups or n // groups < 2:
        fail(OP, f"groups expected a divisor of N = {n} leaving at least 2 rows per group, got {groups}")
    check_choice(OP, "method", method, METHODS)
    loss, _, _, stats, _ = torch.ops.sslkern.cross_correlation_loss(
        z_a.contiguous(), z_b.contiguous(), lambd, scale, eps, groups, 0, n, True, method,
        _needs_grad(z_a), _needs_grad(z_b), backend or "")
    if return_stats:
        return loss, barlow_stats(stats.detach(), n, d, groups)
    return loss
