"""Test-only transcriptions of the public code the redundancy-reduction and SwAV losses must match.

Each function transcribes the named function of the public repository as it runs from the
projector outputs on (the backbones, optimisers and data pipelines are left out):
  * facebookresearch/barlowtwins ``main.py``: ``off_diagonal``, ``BarlowTwins.forward``;
  * facebookresearch/vicreg ``main_vicreg.py``: ``FullGatherLayer``, ``off_diagonal``, ``VICReg.forward``;
  * facebookresearch/swav ``main_swav.py``: ``distributed_sinkhorn`` and the loss loop of ``train``
    (queue included);
  * solo-learn ``solo/losses/barlow.py: barlow_loss_func``, ``solo/losses/vicreg.py: vicreg_loss_func``.
The official Barlow Twins and SwAV code convert BatchNorm to SyncBatchNorm, which has no CPU
kernel; under gloo the callers pass ``sslkern.nn.GlobalBatchNorm1d`` (the same statistics and
gradients over every rank) where the official code has ``SyncBatchNorm``.
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------------------------
# barlowtwins main.py
# ---------------------------------------------------------------------------------------
def off_diagonal(x):
    # return a flattened view of the off-diagonal elements of a square matrix
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlowtwins_forward(z1, z2, lambd, batch_size, bn=None):
    """``BarlowTwins.forward`` after ``z = self.projector(self.backbone(y))``; ``batch_size`` is the
    global batch (``args.batch_size``), ``bn`` the ``BatchNorm1d(affine=False)`` (SyncBatchNorm
    under DDP), in training mode."""
    bn = bn if bn is not None else nn.BatchNorm1d(z1.shape[1], affine=False).to(z1.device, z1.dtype)
    # empirical cross-correlation matrix
    c = bn(z1).T @ bn(z2)

    # sum the cross-correlation matrix between all gpus
    c.div_(batch_size)
    if _dist():
        torch.distributed.all_reduce(c)

    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = off_diagonal(c).pow_(2).sum()
    loss = on_diag + lambd * off_diag
    return loss


# ---------------------------------------------------------------------------------------
# vicreg main_vicreg.py
# ---------------------------------------------------------------------------------------
class FullGatherLayer(torch.autograd.Function):
    """
    Gather tensors from all process and support backward propagation
    for the gradients across processes.
    """

    @staticmethod
    def forward(ctx, x):
        output = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(output, x)
        return tuple(output)

    @staticmethod
    def backward(ctx, *grads):
        all_gradients = torch.stack(grads)
        dist.all_reduce(all_gradients)
        return all_gradients[dist.get_rank()]


def vicreg_forward(x, y, batch_size, num_features, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """``VICReg.forward`` after ``x = self.projector(self.backbone(x))``; ``batch_size`` is the global
    batch (``args.batch_size``). One process: the gather is the identity (the official code calls
    ``FullGatherLayer`` unconditionally, which needs a process group)."""
    repr_loss = F.mse_loss(x, y)

    if _dist():
        x = torch.cat(FullGatherLayer.apply(x), dim=0)
        y = torch.cat(FullGatherLayer.apply(y), dim=0)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)

    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2

    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(
        num_features
    ) + off_diagonal(cov_y).pow_(2).sum().div(num_features)

    loss = (
        sim_coeff * repr_loss
        + std_coeff * std_loss
        + cov_coeff * cov_loss
    )
    return loss


# ---------------------------------------------------------------------------------------
# swav main_swav.py
# ---------------------------------------------------------------------------------------
def distributed_sinkhorn(Q, nmb_iters, world_size=1):
    with torch.no_grad():
        sum_Q = torch.sum(Q)
        if _dist():
            dist.all_reduce(sum_Q)
        Q /= sum_Q

        u = torch.zeros(Q.shape[0])
        r = torch.ones(Q.shape[0]) / Q.shape[0]
        c = torch.ones(Q.shape[1]) / (world_size * Q.shape[1])

        curr_sum = torch.sum(Q, dim=1)
        if _dist():
            dist.all_reduce(curr_sum)

        for it in range(nmb_iters):
            u = curr_sum
            Q *= (r / u).unsqueeze(1)
            Q *= (c / torch.sum(Q, dim=0)).unsqueeze(0)
            curr_sum = torch.sum(Q, dim=1)
            if _dist():
                dist.all_reduce(curr_sum)
        return (Q / torch.sum(Q, dim=0, keepdim=True)).t().float()


class SwAVLossLoop:
    """The ``# ============ swav loss ... ============`` block of ``train``, with its queue:
    ``step(embedding, output, prototypes_weight)`` → loss. ``queue``: None or the
    (len(crops_for_assign), queue_length // world, feat_dim) tensor the official ``main`` builds."""

    def __init__(self, nmb_crops, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
                 queue=None, world_size=1):
        self.nmb_crops, self.crops_for_assign = list(nmb_crops), list(crops_for_assign)
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.queue, self.world_size = queue, world_size
        self.use_the_queue = False

    def step(self, embedding, output, prototypes_weight, bs):
        softmax = nn.Softmax(dim=1)
        embedding = embedding.detach()
        queue = self.queue
        loss = 0
        for i, crop_id in enumerate(self.crops_for_assign):
            with torch.no_grad():
                out = output[bs * crop_id: bs * (crop_id + 1)]

                # time to use the queue
                if queue is not None:
                    if self.use_the_queue or not torch.all(queue[i, -1, :] == 0):
                        self.use_the_queue = True
                        out = torch.cat((torch.mm(
                            queue[i],
                            prototypes_weight.t()
                        ), out))
                    # fill the queue
                    queue[i, bs:] = queue[i, :-bs].clone()
                    queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]
                # get assignments
                q = torch.exp(out / self.epsilon).t()
                q = distributed_sinkhorn(q, self.sinkhorn_iterations, self.world_size)[-bs:]

            # cluster assignment prediction
            subloss = 0
            for v in np.delete(np.arange(np.sum(self.nmb_crops)), crop_id):
                p = softmax(output[bs * v: bs * (v + 1)] / self.temperature)
                subloss -= torch.mean(torch.sum(q * torch.log(p), dim=1))
            loss += subloss / (np.sum(self.nmb_crops) - 1)
        loss /= len(self.crops_for_assign)
        return loss


# ---------------------------------------------------------------------------------------
# solo-learn
# ---------------------------------------------------------------------------------------
def solo_barlow_loss_func(z1, z2, lamb=5e-3, scale_loss=0.025):
    """solo/losses/barlow.py ``barlow_loss_func`` (one process)."""
    N, D = z1.size()

    # to match the original code
    bn = torch.nn.BatchNorm1d(D, affine=False).to(z1.device, z1.dtype)
    z1 = bn(z1)
    z2 = bn(z2)

    corr = torch.einsum("bi, bj -> ij", z1, z2) / N

    diag = torch.eye(D, device=corr.device, dtype=corr.dtype)
    cdif = (corr - diag).pow(2)
    cdif[~diag.bool()] *= lamb
    loss = scale_loss * cdif.sum()
    return loss


def solo_vicreg_loss_func(z1, z2, sim_loss_weight=25.0, var_loss_weight=25.0, cov_loss_weight=1.0):
    """solo/losses/vicreg.py ``vicreg_loss_func``: invariance, variance (the two std terms summed,
    not halved) and covariance."""
    sim_loss = F.mse_loss(z1, z2)
    eps = 1e-4
    std_z1 = torch.sqrt(z1.var(dim=0) + eps)
    std_z2 = torch.sqrt(z2.var(dim=0) + eps)
    var_loss = torch.mean(F.relu(1 - std_z1)) + torch.mean(F.relu(1 - std_z2))
    N, D = z1.size()
    z1 = z1 - z1.mean(dim=0)
    z2 = z2 - z2.mean(dim=0)
    cov_z1 = (z1.T @ z1) / (N - 1)
    cov_z2 = (z2.T @ z2) / (N - 1)
    diag = torch.eye(D, device=z1.device)
    cov_loss = cov_z1[~diag.bool()].pow_(2).sum() / D + cov_z2[~diag.bool()].pow_(2).sum() / D
    return sim_loss_weight * sim_loss + var_loss_weight * var_loss + cov_loss_weight * cov_loss
