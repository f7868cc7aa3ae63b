"""Barlow Twins and VICReg loss modules: the functional ops, plus exact gradients under torchrun.

Single process: ``forward(z_a, z_b)`` is :func:`sslkern.cross_correlation_loss` /
:func:`sslkern.vicreg_loss`. Under torch.distributed (``gather_distributed=True``, the default)
each rank all-gathers the (n, D) projections of every rank — N × D numbers, never a (D, D)
matrix — and runs the op on the gathered batch for *its own rows* only (``row0, row1``): the
Gram rows ``K[R, :]`` and the gradient rows ``∂L/∂z[R]``, so the per-rank work is 1/world of
the one-process op. What remains is summed over ranks in one small all-reduce: the rows'
shares of the loss (and of ‖C‖²_F / the covariance sums), and, for Barlow Twins with
global statistics, the four (D,) column sums of its standardisation backward.

Gradient convention (the loop's): every rank returns the global loss L, and backward gives
rank r's rows ``world · ∂L/∂z[R]``, so that DDP's average over ranks is exactly the gradient
of the one-process loss. The official VICReg code reaches the same gradients with its
``FullGatherLayer`` (all-reduce of every rank's (N, D) gradient); the official Barlow Twins
code all-reduces C without autograd, so each rank differentiates only its own rows' share of
C and DDP's average gives **1/world** of the gradient (lightly fixed the same issue in its
``BarlowTwinsLoss``). ``tests/test_redundancy_distributed.py`` checks both on 2 gloo ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .._checks import check_choice
from ..ops._common import scale_saved_gradient, world_size
from ..ops.cross_correlation_loss import (barlow_stats, check_barlow_options, check_pair, cross_correlation_loss,
                                          resolve_method)
from ..ops.vicreg_loss import check_vicreg_options, vicreg_loss, vicreg_stats


def _gather_rows(z: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.contiguous())
    return torch.cat(parts)


def _check_gatherable(op: str, z: torch.Tensor) -> None:
    """Every rank must hold the same number of rows (all_gather needs equal shapes)."""
    n = torch.tensor([z.shape[0]], dtype=torch.int64, device=z.device)
    lo, hi = n.clone(), n.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if int(lo) != int(hi):
        raise ValueError(f"sslkern.nn.{op}: every rank expected the same number of rows, got {int(lo)} to {int(hi)}")


def _scaled_rows(ctx, g_loss):
    """world · g_loss · the saved rows' gradients (fp32 / fp64 rows), rounded once to the inputs'
    dtypes (an fp16 step's loss scale, 65,536, is inf in fp16)."""
    if g_loss is None:
        return (None, None)
    return tuple(scale_saved_gradient(g, g_loss * ctx.world).to(dtype) if need else None
                 for g, dtype, need in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:2]))


class _BarlowRows(torch.autograd.Function):
    """Forward: the gathered batch's loss on every rank; backward: world · ∂L/∂z of this rank's rows."""

    @staticmethod
    def forward(ctx, za, zb, lambd, scale, eps, local, method, backend):
        world, rank = dist.get_world_size(), dist.get_rank()
        n, d = za.shape
        N = n * world
        za_all, zb_all = _gather_rows(za), _gather_rows(zb)
        grad_a, grad_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # local statistics: each rank's rows are one group, whose backward sums it holds itself
        method = resolve_method(method, N, d, n)
        share, ga, gb, stats, sums = torch.ops.sslkern.cross_correlation_loss(
            za_all, zb_all, lambd, scale, eps, world if local else 1, rank * n, (rank + 1) * n, local, method,
            grad_a, grad_b, backend)
        parts = [share.reshape(1), stats[1:2]]
        if not local and (grad_a or grad_b):
            parts.append(sums[:4].reshape(-1))
        buf = torch.cat(parts)
        dist.all_reduce(buf)
        loss = buf[0].clone()
        stats = stats.clone()
        stats[1] = buf[1]
        if not local and (grad_a or grad_b):
            col = buf[2:].view(4, d) / N

            def finish(g, z, mean, rstd, s1, s2):
                h = (z.to(g.dtype) - mean) * rstd
                return rstd * (g - s1 - h * s2)

            if grad_a:
                ga = finish(ga, za, sums[4], sums[5], col[0], col[1])
            if grad_b:
                gb = finish(gb, zb, sums[6], sums[7], col[2], col[3])
        ctx.save_for_backward(ga, gb)
        ctx.world, ctx.dtypes = world, (za.dtype, zb.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, g_stats):
        return _scaled_rows(ctx, g_loss) + (None,) * 6


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss (:func:`sslkern.cross_correlation_loss`): ``forward(z_a, z_b)``.

    Args:
        lambd: off-diagonal weight (official 0.0051; lightly / solo-learn 5e-3).
        scale: multiplies the loss (solo-learn ``scale_loss`` 0.025; official 1).
        eps: BatchNorm's eps.
        statistics: ``"global"`` standardises over the global batch (the official code's
            SyncBatchNorm); ``"local"`` over each rank's rows (lightly ``BarlowTwinsLoss``, which
            then averages the ranks' C with ``gather_distributed=True``). One process: the same.
        gather_distributed: under torch.distributed, the loss of the global batch with exact
            gradients (module docstring); ``False``: each rank's own loss (no communication).
        method: ``"auto"``, ``"gram"`` or ``"tiled"`` (see the op).
    ``forward(z_a, z_b, return_stats=True)`` also returns the op's health figures
    (``on_diag``, ``off_diag``, ``mean_diag``, ``off_diag_floor``; 0-dim tensors) of the global batch.
    """

    def __init__(self, lambd: float = 0.0051, *, scale: float = 1.0, eps: float = 1e-5, statistics: str = "global",
                 gather_distributed: bool = True, method: str = "auto", backend: str | None = None):
        super().__init__()
        op = "nn.BarlowTwinsLoss"
        check_choice(op, "statistics", statistics, ("global", "local"))
        self.lambd, self.scale, self.eps = check_barlow_options(op, lambd, scale, eps, method)
        self.statistics, self.gather_distributed, self.method, self.backend = statistics, gather_distributed, method, backend

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, return_stats: bool = False):
        world = world_size()
        if world == 1 or not self.gather_distributed:
            return cross_correlation_loss(z_a, z_b, self.lambd, scale=self.scale, eps=self.eps, method=self.method,
                                          return_stats=return_stats, backend=self.backend)
        n, d = check_pair("nn.BarlowTwinsLoss", z_a, z_b)
        _check_gatherable("BarlowTwinsLoss", z_a)
        local = self.statistics == "local"
        loss, stats = _BarlowRows.apply(z_a.contiguous(), z_b.contiguous(), self.lambd, self.scale, self.eps, local,
                                        self.method, self.backend or "")
        if return_stats:
            return loss, barlow_stats(stats, n * world, d, world if local else 1)
        return loss

    def extra_repr(self) -> str:
        return (f"lambd={self.lambd}, scale={self.scale}, eps={self.eps}, statistics={self.statistics!r}, "
                f"gather_distributed={self.gather_distributed}, method={self.method!r}")


class _VICRegRows(torch.autograd.Function):
    """Forward: the global loss (invariance on each rank's rows, variance and covariance over
    the gathered batch) on every rank; backward: world · ∂L/∂z of this rank's rows."""

    @staticmethod
    def forward(ctx, za, zb, sim, std, cov, eps, std_scale, method, backend):
        world, rank = dist.get_world_size(), dist.get_rank()
        n, d = za.shape
        za_all, zb_all = _gather_rows(za), _gather_rows(zb)
        grad_a, grad_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        method = resolve_method(method, n * world, d, n, tiled_strip_passes=2)
        share, dza, dzb, stats = torch.ops.sslkern.vicreg_loss(
            za_all, zb_all, sim, std, cov, eps, std_scale, rank * n, (rank + 1) * n, method, grad_a, grad_b, backend)
        summed = torch.tensor([0, 7, 8], device=stats.device)  # the rows' shares; the rest is the same on every rank
        buf = torch.cat([share.reshape(1), stats[summed]])
        dist.all_reduce(buf)
        stats = stats.clone()
        stats[summed] = buf[1:]
        ctx.save_for_backward(dza, dzb)
        ctx.world, ctx.dtypes = world, (za.dtype, zb.dtype)
        ctx.mark_non_differentiable(stats)
        return buf[0].clone(), stats

    @staticmethod
    def backward(ctx, g_loss, g_stats):
        return _scaled_rows(ctx, g_loss) + (None,) * 7


class VICRegLoss(nn.Module):
    """VICReg loss (:func:`sslkern.vicreg_loss`): ``forward(z_a, z_b)``.

    Args:
        sim_coeff, std_coeff, cov_coeff: 25, 25, 1 (official, lightly, solo-learn).
        eps: 1e-4.
        std_scale: 0.5 (official and lightly: the two std terms halved), 1.0 (solo-learn).
        gather_distributed: under torch.distributed, the official code's gather: invariance on
            each rank's rows, variance and covariance over the global batch, exact gradients
            (module docstring). ``False``: each rank's own loss (lightly's default).
        method: ``"auto"``, ``"gram"`` or ``"tiled"`` (see the op).
    ``forward(z_a, z_b, return_stats=True)`` also returns the health figures of the global
    batch (``invariance``, ``variance``, ``covariance``, ``mean_std``, ``low_std_frac``,
    ``covariance_floor``; 0-dim tensors). Under torchrun the loss returned on every rank is the
    global loss (its invariance term the mean over all rows).
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0, *,
                 eps: float = 1e-4, std_scale: float = 0.5, gather_distributed: bool = True, method: str = "auto",
                 backend: str | None = None):
        super().__init__()
        (self.sim_coeff, self.std_coeff, self.cov_coeff, self.eps,
         self.std_scale) = check_vicreg_options("nn.VICRegLoss", sim_coeff, std_coeff, cov_coeff, eps, std_scale, method)
        self.gather_distributed, self.method, self.backend = gather_distributed, method, backend

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, return_stats: bool = False):
        world = world_size()
        if world == 1 or not self.gather_distributed:
            return vicreg_loss(z_a, z_b, sim_coeff=self.sim_coeff, std_coeff=self.std_coeff, cov_coeff=self.cov_coeff,
                               eps=self.eps, std_scale=self.std_scale, method=self.method, return_stats=return_stats,
                               backend=self.backend)
        n, d = check_pair("nn.VICRegLoss", z_a, z_b)
        _check_gatherable("VICRegLoss", z_a)
        loss, stats = _VICRegRows.apply(z_a.contiguous(), z_b.contiguous(), self.sim_coeff, self.std_coeff,
                                        self.cov_coeff, self.eps, self.std_scale, self.method, self.backend or "")
        if return_stats:
            return loss, vicreg_stats(stats, n * world, d, self.std_scale)
        return loss

    def extra_repr(self) -> str:
        return (f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}, eps={self.eps}, "
                f"std_scale={self.std_scale}, gather_distributed={self.gather_distributed}, method={self.method!r}")
