"""VICReg loss, eager PyTorch: the oracle for tests and the baseline for benchmarks.

Follows facebookresearch/vicreg ``main_vicreg.py: VICReg.forward`` (one process, so its
``FullGatherLayer`` is the identity): ``repr_loss = mse_loss(x, y)``; x and y centred;
``std = sqrt(var + 1e-4)`` (unbiased variance), ``std_loss = mean(relu(1 − std_x))/2 +
mean(relu(1 − std_y))/2``; ``cov = xᵀx / (N − 1)``, ``cov_loss = Σ_{i≠j} cov_x²/D + Σ_{i≠j}
cov_y²/D``; ``loss = 25·repr + 25·std + 1·cov``. It builds the two (D, D) covariances, as
every public implementation does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cross_correlation_loss import off_diagonal


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, *, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4, std_scale: float = 0.5) -> torch.Tensor:
    """``sim·MSE(a, b) + std_coeff·std_scale·Σ_v mean(relu(1 − std_v)) + cov_coeff·Σ_v Σ_{i≠j} cov_v²/D``.

    ``std_scale``: 0.5 is the official code's ``/2`` (and lightly's), 1.0 solo-learn's.
    """
    n, d = z_a.shape
    repr_loss = F.mse_loss(z_a, z_b)
    x = z_a - z_a.mean(dim=0)
    y = z_b - z_b.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = std_scale * (torch.mean(F.relu(1 - std_x)) + torch.mean(F.relu(1 - std_y)))
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(d) + off_diagonal(cov_y).pow_(2).sum().div(d)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
