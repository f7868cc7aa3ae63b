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
row1, finish, method, grad_a, grad_b, backend) -> (loss, dza, dzb, stats, sums)``, whose callers
check the rows (:func:`check_rows`) and resolve ``method`` to ``"gram"`` or ``"tiled"``:

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

from typing import Optional

import torch

from .._backend import Dispatch, standard_impls
from .._checks import FLOAT_DTYPES, check_choice, check_float, check_int, check_tensor, dtype_name, fail
from ._common import acc_dtype, needs_grad, register_saved_gradients

OP = "cross_correlation_loss"
METHODS = ("auto", "gram", "tiled")


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


def check_rows(op: str, n: int, row0: int, row1: int, groups: int = 1, finish: bool = True) -> None:
    """Rows ``[row0, row1)`` of an N-row batch standardised in ``groups`` blocks: whole groups
    when ``finish``; one group otherwise (the caller finishes the standardisation backward)."""
    if not 0 <= row0 < row1 <= n:
        fail(op, f"rows expected 0 <= row0 < row1 <= N = {n}, got [{row0}, {row1})")
    if groups < 1 or n % groups or n // groups < 2:
        fail(op, f"groups expected a divisor of N = {n} leaving at least 2 rows per group, got {groups}")
    m = n // groups
    if finish and (row0 % m or row1 % m):
        fail(op, f"finish=True expected rows [{row0}, {row1}) made of whole groups of {m} rows")
    if not finish and groups != 1:
        fail(op, f"finish=False expected groups = 1 (the sums span one standardisation group), got {groups}")


def _standardize(z: torch.Tensor, groups: int, eps: float):
    n, d = z.shape
    zg = z.view(groups, n // groups, d)
    mean = zg.mean(1, keepdim=True)
    var = (zg - mean).square().mean(1, keepdim=True)
    rstd = (var + eps).rsqrt()
    return ((zg - mean) * rstd).view(n, d), mean.view(groups, d), rstd.view(groups, d)


def cross_correlation_loss_eager(za, zb, lambd, scale, eps, groups, row0, row1, finish, method, grad_a, grad_b):
    """The custom op's contract in eager PyTorch (builds the (D, D) matrix; the ``reference``
    backend; ``method`` is ignored). Custom-op bodies run below autograd, so the gradient is
    written out: ``dC = scale·(2λC + diag(2(C_ii − 1) − 2λC_ii))``, ``G_a = ẑ_b dCᵀ/N``,
    ``G_b = ẑ_a dC/N``."""
    acc = acc_dtype(za)
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


# reference: cross_correlation_loss_eager; cpu: torch.ops.sslkern_C.cross_correlation_loss_cpu
# (csrc/cpu/cross_correlation_loss.cpp); triton: sslkern.triton_ops.cross_correlation_loss
dispatch = Dispatch(OP, standard_impls(OP, cross_correlation_loss_eager))


@torch.library.custom_op("sslkern::cross_correlation_loss", mutates_args=())
def _cross_correlation_loss_op(za: torch.Tensor, zb: torch.Tensor, lambd: float, scale: float, eps: float,
                               groups: int, row0: int, row1: int, finish: bool, method: str, grad_a: bool,
                               grad_b: bool, backend: str
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch(za.device, backend)(za, zb, lambd, scale, eps, groups, row0, row1, finish, method, grad_a, grad_b)


@_cross_correlation_loss_op.register_fake
def _(za, zb, lambd, scale, eps, groups, row0, row1, finish, method, grad_a, grad_b, backend):
    acc = acc_dtype(za)
    rows = row1 - row0
    d = za.shape[1]
    gdt = za.dtype if finish else acc
    dza = za.new_empty((rows, d), dtype=gdt) if grad_a else za.new_empty(0, dtype=gdt)
    dzb = zb.new_empty((rows, d), dtype=gdt) if grad_b else zb.new_empty(0, dtype=gdt)
    sums = za.new_empty((8, d) if (not finish and (grad_a or grad_b)) else (0,), dtype=acc)
    return za.new_empty((), dtype=acc), dza, dzb, za.new_empty((4,), dtype=acc), sums


def _saved_gradient_slots(inputs) -> dict[int, int]:
    """za (input 0) gets dza (output 1), zb (input 1) dzb (output 2) — for a full-batch call only:
    a rows call (``sslkern.nn.BarlowTwinsLoss``) returns its gradients, it is not differentiated."""
    za, row0, row1, finish, grad_a, grad_b = inputs[0], inputs[6], inputs[7], inputs[8], inputs[10], inputs[11]
    if not (row0 == 0 and row1 == za.shape[0] and finish):
        return {}
    return {**({0: 1} if grad_a else {}), **({1: 2} if grad_b else {})}


register_saved_gradients(_cross_correlation_loss_op, OP, _saved_gradient_slots)


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def check_pair(op: str, z_a, z_b) -> tuple[int, int]:
    """The two projections: (N, D) float tensors of one shape, dtype and device, N >= 2."""
    check_tensor(op, "z_a", z_a, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "z_b", z_b, dtypes=FLOAT_DTYPES, ndim=2, device=z_a.device)
    if z_b.dtype != z_a.dtype:
        fail(op, f"z_b expected dtype {dtype_name(z_a.dtype)} (z_a's dtype), got {dtype_name(z_b.dtype)}", TypeError)
    if z_b.shape != z_a.shape:
        fail(op, f"z_b expected shape {tuple(z_a.shape)} (z_a's shape), got {tuple(z_b.shape)}")
    n, d = z_a.shape
    if n < 2:
        fail(op, f"z_a expected at least 2 rows (batch statistics need two samples), got shape {tuple(z_a.shape)}")
    if d < 1:
        fail(op, f"z_a expected at least 1 column, got shape {tuple(z_a.shape)}")
    return n, d


def check_barlow_options(op: str, lambd, scale, eps, method) -> tuple[float, float, float]:
    """λ and scale finite, eps finite and > 0, method one of :data:`METHODS`."""
    check_choice(op, "method", method, METHODS)
    return (check_float(op, "lambd", lambd), check_float(op, "scale", scale),
            check_float(op, "eps", eps, 0.0, None, lo_open=True))


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
    lambd, scale, eps = check_barlow_options(OP, lambd, scale, eps, method)
    groups = check_int(OP, "groups", groups)
    check_rows(OP, n, 0, n, groups)
    loss, _, _, stats, _ = torch.ops.sslkern.cross_correlation_loss(
        z_a.contiguous(), z_b.contiguous(), lambd, scale, eps, groups, 0, n, True, resolve_method(method, n, d, n),
        needs_grad(z_a), needs_grad(z_b), backend or "")
    if return_stats:
        return loss, barlow_stats(stats.detach(), n, d, groups)
    return loss
