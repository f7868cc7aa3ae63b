"""Barlow Twins loss, eager PyTorch: the oracle for tests and the baseline for benchmarks.

Follows facebookresearch/barlowtwins ``main.py: BarlowTwins.forward``: the projections are
standardised per dimension over the batch by ``BatchNorm1d(affine=False)`` in training mode
(batch mean, biased variance, eps 1e-5), ``c = bn(z1).T @ bn(z2) / N``, then
``on_diag = Σ_i (c_ii − 1)²``, ``off_diag = Σ_{i≠j} c_ij²`` (its ``off_diagonal`` view) and
``loss = on_diag + λ·off_diag``. It builds the (D, D) matrix, as every public implementation
does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The off-diagonal elements of a square matrix, flattened (barlowtwins ``off_diagonal``)."""
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def standardize(z: torch.Tensor, eps: float, groups: int = 1) -> torch.Tensor:
    """``BatchNorm1d(affine=False)`` in training mode, over each of ``groups`` equal row blocks."""
    return torch.cat([F.batch_norm(c, None, None, training=True, eps=eps) for c in z.chunk(groups)])


def cross_correlation_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 0.0051, *, scale: float = 1.0,
                           eps: float = 1e-5, groups: int = 1) -> torch.Tensor:
    """``scale·[Σ_i (1 − c_ii)² + λ Σ_{i≠j} c_ij²]`` with ``c = ẑ_aᵀ ẑ_b / N`` (the (D, D) matrix).

    ``groups``: the rows are ``groups`` equal blocks, each standardised with its own
    statistics (lightly ``BarlowTwinsLoss(gather_distributed=True)`` on ``groups`` ranks:
    local BatchNorm, cross-correlations averaged); 1 = the whole batch (the official code's
    SyncBatchNorm). ``scale``: solo-learn's ``scale_loss``.
    """
    n = z_a.shape[0]
    c = standardize(z_a, eps, groups).T @ standardize(z_b, eps, groups)
    c.div_(n)  # the official code's in-place operations, so the benchmark baseline allocates what it does
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = off_diagonal(c).pow_(2).sum()
    loss = on_diag + lambd * off_diag
    return loss if scale == 1.0 else scale * loss
