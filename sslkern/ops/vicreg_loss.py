r"""``vicreg_loss`` — the VICReg loss without the (D, D) covariance matrices.

For projections ``z_a, z_b`` (N, D): ``X = z − mean(z)`` per view, ``s_i = Σ_n X_ni²``,
``var = s/(N − 1)``, ``std = √(var + eps)``, ``cov = XᵀX/(N − 1)`` and

    L = sim · MSE(z_a, z_b) + std_coeff · std_scale · Σ_v mean_i relu(1 − std_v,i)
        + cov_coeff · Σ_v Σ_{i≠j} cov_v,ij² / D.

``Σ_{i≠j} cov² = (‖XXᵀ‖²_F − Σ_i s_i²)/(N − 1)²`` and its gradient is
``4/(N − 1)² · (K X − X ⊙ s)`` with the (N, N) Gram matrix ``K = XXᵀ``, so with N < D the
covariance terms come from N × N products (``method="gram"``); otherwise the kernels walk
``cov`` in strips of rows (``method="tiled"``): ``dX[:, strip] = X · M[:, strip]`` with
``M = 4/((N − 1)·D)·offdiag(cov)`` symmetric, so each strip writes its own columns — no
(D, D) tensor. The std term's gradient is ``−c·1[std < 1]·X/((N − 1)·std)``; the centring's
backward is the identity (every term's gradient has zero column means).

One custom op, ``torch.ops.sslkern.vicreg_loss(za, zb, sim_coeff, std_coeff, cov_coeff, eps,
std_scale, row0, row1, method, grad_a, grad_b, backend) -> (loss, dza, dzb, stats)``, whose callers
check the rows and resolve ``method`` to ``"gram"`` or ``"tiled"``:

* full batch (``row0 = 0, row1 = N``): the loss and its gradients (computed in the same call
  when asked; backward rescales them), and the health sums ``stats`` (13,) fp32 (fp64 for fp64):
  ``[Σ_R (z_a − z_b)², Σ relu(1 − std_a), Σ relu(1 − std_b), Σ std_a, Σ std_b, #(std_a < 1),
  #(std_b < 1), off_a, off_b, Σ var_a, Σ var_b, Σ var_a², Σ var_b²]`` with
  ``off = Σ_{i≠j} cov²``.
* rows ``R = [row0, row1)`` of a batch gathered from several ranks (``sslkern.nn.VICRegLoss``;
  the op itself never communicates): ``loss`` is R's share (shares of a partition add up to
  the loss; ``off`` entries are R's shares of Σ_{i≠j} cov²) and the gradients are ∂L/∂z[R],
  exact without any reduction: the statistics are those of the gathered rows. Not
  differentiable (the module computes its own gradient).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import Dispatch, standard_impls
from .._checks import check_choice, check_float
from ._common import acc_dtype, needs_grad, register_saved_gradients
from .cross_correlation_loss import METHODS, check_pair, resolve_method

OP = "vicreg_loss"


def vicreg_loss_eager(za, zb, sim_coeff, std_coeff, cov_coeff, eps, std_scale, row0, row1, method, grad_a, grad_b):
    """The custom op's contract in eager PyTorch (builds the (D, D) covariances; the ``reference``
    backend; ``method`` is ignored), gradients written out (custom-op bodies run below autograd)."""
    acc = acc_dtype(za)
    n, d = za.shape
    rows = slice(row0, row1)
    full = row0 == 0 and row1 == n
    frac = (row1 - row0) / n
    a, b = za.to(acc), zb.to(acc)
    diff = a[rows] - b[rows]

    def view(z):
        x = z - z.mean(0)
        s = x.square().sum(0)
        var = s / (n - 1)
        std = (var + eps).sqrt()
        cov = x.t() @ x / (n - 1)
        if full:
            off = cov.square().sum() - cov.diagonal().square().sum()
        else:  # Σ_{n∈R} ‖K[n]‖² = (N − 1) Σ_{n∈R} x_n cov x_nᵀ
            off = (((x[rows] @ cov) * x[rows]).sum() * (n - 1) - frac * s.square().sum()) / (n - 1) ** 2
        relu = torch.relu(1 - std)
        m = cov - torch.diag(cov.diagonal())
        g = (4 * cov_coeff / ((n - 1) * d)) * (x[rows] @ m)
        g = g - (std_coeff * std_scale / d) * (std < 1).to(acc) * x[rows] / ((n - 1) * std)
        return [relu.sum(), std.sum(), (std < 1).sum().to(acc), off, var.sum(), var.square().sum()], g

    sa, ga = view(a)
    sb, gb = view(b)
    sq = diff.square().sum()
    stats = torch.stack([sq, sa[0], sb[0], sa[1], sb[1], sa[2], sb[2], sa[3], sb[3], sa[4], sb[4], sa[5], sb[5]])
    loss = (sim_coeff * sq / (n * d) + frac * std_coeff * std_scale * (sa[0] + sb[0]) / d
            + cov_coeff * (sa[3] + sb[3]) / d)
    g_inv = (2 * sim_coeff / (n * d)) * diff
    dza = (ga + g_inv).to(za.dtype) if grad_a else za.new_empty(0)
    dzb = (gb - g_inv).to(zb.dtype) if grad_b else zb.new_empty(0)
    return loss, dza, dzb, stats


# reference: vicreg_loss_eager; cpu: torch.ops.sslkern_C.vicreg_loss_cpu (csrc/cpu/vicreg_loss.cpp);
# triton: sslkern.triton_ops.vicreg_loss
dispatch = Dispatch(OP, standard_impls(OP, vicreg_loss_eager))


@torch.library.custom_op("sslkern::vicreg_loss", mutates_args=())
def _vicreg_loss_op(za: torch.Tensor, zb: torch.Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float,
                    eps: float, std_scale: float, row0: int, row1: int, method: str, grad_a: bool, grad_b: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch(za.device, backend)(za, zb, sim_coeff, std_coeff, cov_coeff, eps, std_scale, row0, row1, method,
                                        grad_a, grad_b)


@_vicreg_loss_op.register_fake
def _(za, zb, sim_coeff, std_coeff, cov_coeff, eps, std_scale, row0, row1, method, grad_a, grad_b, backend):
    d = za.shape[1]
    dza = za.new_empty((row1 - row0, d)) if grad_a else za.new_empty(0)
    dzb = zb.new_empty((row1 - row0, d)) if grad_b else zb.new_empty(0)
    return za.new_empty((), dtype=acc_dtype(za)), dza, dzb, za.new_empty((13,), dtype=acc_dtype(za))


def _saved_gradient_slots(inputs) -> dict[int, int]:
    """za (input 0) gets dza (output 1), zb (input 1) dzb (output 2) — for a full-batch call only:
    a rows call (``sslkern.nn.VICRegLoss``) returns its gradients, it is not differentiated."""
    za, row0, row1, grad_a, grad_b = inputs[0], inputs[7], inputs[8], inputs[10], inputs[11]
    if not (row0 == 0 and row1 == za.shape[0]):
        return {}
    return {**({0: 1} if grad_a else {}), **({1: 2} if grad_b else {})}


register_saved_gradients(_vicreg_loss_op, OP, _saved_gradient_slots)


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def check_vicreg_options(op: str, sim_coeff, std_coeff, cov_coeff, eps, std_scale, method) -> tuple:
    """The three weights and ``std_scale`` finite, eps finite and > 0, method one of :data:`METHODS`."""
    check_choice(op, "method", method, METHODS)
    return (check_float(op, "sim_coeff", sim_coeff), check_float(op, "std_coeff", std_coeff),
            check_float(op, "cov_coeff", cov_coeff), check_float(op, "eps", eps, 0.0, None, lo_open=True),
            check_float(op, "std_scale", std_scale))


def vicreg_stats(stats: torch.Tensor, n: int, d: int, std_scale: float = 0.5) -> dict:
    """Health figures from the op's ``stats`` (0-dim tensors): ``invariance`` (the MSE),
    ``variance`` (std term before ``std_coeff``), ``covariance`` (cov term before ``cov_coeff``),
    ``mean_std`` (both views), ``low_std_frac`` (share of dimensions with std < 1, both views) and
    ``covariance_floor``: the least covariance term these variances allow — rank(cov) ≤
    r = min(D, N − 1), so ``‖cov‖²_F ≥ (Σ var)²/r`` and ``Σ_{i≠j} cov² ≥ (Σ var)²/r − Σ var²``
    per view (``D/(N − 1) − 1`` per view when every variance is 1)."""
    s = stats.unbind()
    r = min(d, n - 1)
    floor = sum((s[9 + v] * s[9 + v] / r - s[11 + v]).clamp(min=0) for v in (0, 1)) / d
    return {"invariance": s[0] / (n * d), "variance": std_scale * (s[1] + s[2]) / d, "covariance": (s[7] + s[8]) / d,
            "mean_std": (s[3] + s[4]) / (2 * d), "low_std_frac": (s[5] + s[6]) / (2 * d), "covariance_floor": floor}


def vicreg_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    *,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    std_scale: float = 0.5,
    method: str = "auto",
    return_stats: bool = False,
    backend: Optional[str] = None,
):
    r"""VICReg loss (facebookresearch/vicreg ``main_vicreg.py: VICReg.forward``), exact, without
    the (D, D) covariance matrices.

    ``sim·MSE(z_a, z_b) + std_coeff·std_scale·Σ_v mean(relu(1 − √(var_v + eps))) +
    cov_coeff·Σ_v Σ_{i≠j} cov_v²/D`` with unbiased variances and ``cov = XᵀX/(N − 1)`` of the
    centred projections. See the module docstring for the Gram and tiled forms.

    Peers' conventions: the official code and lightly ``VICRegLoss`` are the default
    (25 / 25 / 1, eps 1e-4, the std term halved: ``std_scale=0.5``); solo-learn
    ``vicreg_loss_func`` sums the two std terms: ``std_scale=1.0``. For torchrun use
    :class:`sslkern.nn.VICRegLoss` (the official code's gather: invariance on each rank's
    rows, variance and covariance over the global batch, exact gradients).

    Args:
        z_a, z_b: (N, D) projections of the two views; fp32, bf16, fp16 or fp64, N ≥ 2.
        sim_coeff, std_coeff, cov_coeff: weights of the three terms.
        eps: added to the variance under the square root.
        std_scale: factor of the std term (0.5 official, 1.0 solo-learn).
        method: ``"auto"`` (the form with fewer flops: Gram when N < D), ``"gram"`` or ``"tiled"``.
        return_stats: also return a dict of 0-dim tensors (no host sync; see :func:`vicreg_stats`).
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Returns:
        the loss, a 0-dim fp32 tensor (fp64 for fp64 inputs), or ``(loss, stats)``.
        Differentiable w.r.t. ``z_a`` and ``z_b`` (gradients computed in the same call when
        either requires grad, rescaled by backward). Arithmetic is fp32 (fp64 for fp64);
        fp16 / bf16 gradients are rounded to the input dtype once.
    """
    n, d = check_pair(OP, z_a, z_b)
    sim_coeff, std_coeff, cov_coeff, eps, std_scale = check_vicreg_options(OP, sim_coeff, std_coeff, cov_coeff, eps,
                                                                           std_scale, method)
    loss, _, _, stats = torch.ops.sslkern.vicreg_loss(
        z_a.contiguous(), z_b.contiguous(), sim_coeff, std_coeff, cov_coeff, eps, std_scale, 0, n,
        resolve_method(method, n, d, n, tiled_strip_passes=2), needs_grad(z_a), needs_grad(z_b), backend or "")
    if return_stats:
        return loss, vicreg_stats(stats.detach(), n, d, std_scale)
    return loss
