"""torchrun support: process group (gloo on CPU, nccl on GPU), rank helpers, all-reduce.

Data sharding lives in :func:`sslkern.train.data.epoch_batches` (DistributedSampler-style,
by rank stride within each global batch). Without torchrun (no ``WORLD_SIZE``) everything
here is a no-op for a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick this rank's device.

    CUDA device: with several processes (torchrun, ``WORLD_SIZE`` > 1) rank ``LOCAL_RANK``
    uses ``cuda:LOCAL_RANK`` whatever index ``device`` names; a single process runs on the
    device asked for (``cuda:N`` → N, plain ``cuda`` → the current device). The device
    is made current (``torch.cuda.set_device``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if world > 1:
            index = local_rank
        else:
            index = dev.index if dev.index is not None else torch.cuda.current_device()
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself if single-process)."""
    if not is_enabled():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / (dist.get_world_size() if is_enabled() else 1)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def max_abs_diff_across_ranks(t: torch.Tensor) -> float:
    """max over ranks of |t - t_rank0| (0.0 single-process): checks replicas stayed equal."""
    if not is_enabled():
        return 0.0
    ref = t.detach().clone()
    dist.broadcast(ref, src=0)
    d = (t.detach() - ref).abs().max()
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return float(d)


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
