"""SwAV pieces (facebookresearch/swav ``main_swav.py``): prototypes renormalised in place, and the
loss with its queue.

Order of a step, as swav: ``prototypes.normalize_()`` (no gradient; the gradient then goes
to the raw weight, not through a weight norm) → embeddings ``z = normalize(projector(x))`` of
every crop → ``loss = swav(z, prototypes)`` → backward → (first epoch: drop the prototypes'
gradient) → optimizer step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float, check_int, fail
from ..ops._common import world_size
from ..ops.dino_loss import sinkhorn_knopp_teacher
from ..ops.swav_loss import code_entropy, swav_loss


class SwAVPrototypes(nn.Linear):
    """swav ``prototypes``: ``nn.Linear(dim, K, bias=False)`` whose rows are set to unit norm in
    place by :meth:`normalize_` before every forward (swav normalises ``weight.data``)."""

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__(dim, n_prototypes, bias=False)

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1, p=2))


class SwAVLoss(nn.Module):
    """SwAV loss with swav's queue: ``forward(z, prototypes, use_queue=False)``.

    ``z``: (V·B, dim) L2-normalised embeddings of V = ``n_crops`` crops, crop-major, the
    ``n_assign`` assigned crops first; ``prototypes``: the (K, dim) prototype layer (unit rows).
    Codes: per assigned crop, Sinkhorn-Knopp over the global batch (every rank's rows under
    torch.distributed) and, once the queue is full, this rank's queue of earlier embeddings
    scored against the current prototypes (one product of ``[queue; z_i]`` with the
    prototypes, only the batch's codes kept). The queue (a buffer, so checkpoints keep it) holds
    ``queue_length`` rows per assigned crop over all processes, ``queue_length / world`` on each
    (swav's split, fixed when the module is built); with ``use_queue=True`` every call
    pushes the batch's assigned embeddings (newest first), and the queue is read once it has
    been filled (swav: once its last row is no longer zero). ``queue_length = 0``: no queue.
    """

    def __init__(self, n_crops: int, dim: int, *, n_assign: int = 2, temperature: float = 0.1,
                 epsilon: float = 0.05, sinkhorn_iterations: int = 3, queue_length: int = 0):
        super().__init__()
        op = "nn.SwAVLoss"
        self.n_crops = check_int(op, "n_crops", n_crops, 2)
        self.n_assign = check_int(op, "n_assign", n_assign, 1, n_crops)
        self.temperature = check_float(op, "temperature", temperature, 0.0, None, lo_open=True)
        self.epsilon = check_float(op, "epsilon", epsilon, 0.0, None, lo_open=True)
        self.sinkhorn_iterations = check_int(op, "sinkhorn_iterations", sinkhorn_iterations, 0)
        self.queue_length = check_int(op, "queue_length", queue_length, 0)
        world = world_size()
        if queue_length % world:
            fail(op, f"queue_length expected a multiple of the number of processes ({world}), got {queue_length}")
        self.local_queue_length = queue_length // world
        dim = check_int(op, "dim", dim, 1)
        self.register_buffer("queue", torch.zeros(n_assign, self.local_queue_length, dim))
        self.register_buffer("queue_rows", torch.zeros((), dtype=torch.int64))  # rows pushed so far (capped)

    def queue_full(self) -> bool:
        return self.local_queue_length > 0 and int(self.queue_rows) >= self.local_queue_length

    @torch.no_grad()
    def codes(self, z: torch.Tensor, weight: torch.Tensor, use_queue: bool) -> torch.Tensor:
        b = z.shape[0] // self.n_crops
        read = use_queue and self.queue_full()
        out = []
        for i in range(self.n_assign):
            zi = z[b * i:b * (i + 1)].detach()
            rows = torch.cat((self.queue[i].to(zi.dtype), zi)) if read else zi
            scores = rows @ weight.detach().t()
            out.append(sinkhorn_knopp_teacher(scores, self.epsilon, self.sinkhorn_iterations, keep_last=b))
        q_len = self.local_queue_length
        if use_queue and q_len > 0:
            for i in range(self.n_assign):  # swav: queue[i, bs:] = queue[i, :-bs]; queue[i, :bs] = z_i
                zi = z[b * i:b * (i + 1)].detach().to(self.queue.dtype)
                self.queue[i, b:] = self.queue[i, :max(q_len - b, 0)].clone()
                self.queue[i, :min(b, q_len)] = zi[:min(b, q_len)]
            self.queue_rows.add_(b).clamp_(max=q_len)
        return torch.cat(out)

    def forward(self, z: torch.Tensor, prototypes: nn.Module, use_queue: bool = False, return_stats: bool = False):
        weight = prototypes.weight
        codes = self.codes(z, weight, use_queue)
        scores = F.linear(z, weight)
        loss = swav_loss(scores, self.n_crops, codes=codes, n_assign=self.n_assign, temperature=self.temperature,
                         epsilon=self.epsilon, sinkhorn_iterations=self.sinkhorn_iterations)
        if return_stats:
            return loss, {"loss_frac": loss.detach() / math.log(weight.shape[0]), "code_entropy": code_entropy(codes)}
        return loss

    def extra_repr(self) -> str:
        return (f"n_crops={self.n_crops}, n_assign={self.n_assign}, temperature={self.temperature}, "
                f"epsilon={self.epsilon}, sinkhorn_iterations={self.sinkhorn_iterations}, "
                f"queue_length={self.queue_length}")
