"""SwAV swapped-prediction loss, eager PyTorch: the oracle for tests and the baseline for benchmarks.

Follows facebookresearch/swav ``main_swav.py: train`` (the loss loop) and
``distributed_sinkhorn`` in one process: for each assigned crop, the codes are the Sinkhorn-Knopp
equipartition of ``exp(scores/ε)`` over that crop's batch (queue rows first, when given; only
the batch's codes are kept); the loss is, for each assigned crop, the mean over the other
crops of ``−Σ_k q·log softmax(s_v/τ)``, averaged over the assigned crops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iterations: int = 3) -> torch.Tensor:
    """swav ``distributed_sinkhorn`` (one process): (B, K) scores → (B, K) codes, rows sum to 1."""
    q = torch.exp(scores / epsilon).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def swav_loss(scores: torch.Tensor, n_crops: int, *, queue_scores=None, n_assign: int = 2, temperature: float = 0.1,
              epsilon: float = 0.05, sinkhorn_iterations: int = 3) -> torch.Tensor:
    """``scores``: (V·B, K) prototype scores, crop-major; ``queue_scores``: None or one (Q, K)
    tensor per assigned crop (the queue's embeddings against the current prototypes)."""
    b = scores.shape[0] // n_crops
    loss = scores.new_zeros(())
    for i in range(n_assign):
        with torch.no_grad():
            out = scores[b * i:b * (i + 1)].detach()
            if queue_scores is not None:
                out = torch.cat((queue_scores[i], out))
            q = sinkhorn(out, epsilon, sinkhorn_iterations)[-b:]
        subloss = 0
        for v in range(n_crops):
            if v == i:
                continue
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(scores[b * v:b * (v + 1)] / temperature, dim=1),
                                                     dim=1))
        loss = loss + subloss / (n_crops - 1)
    return loss / n_assign
