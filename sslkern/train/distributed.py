"""torchrun support: process group (gloo on CPU, nccl on GPU), rank helpers, all-reduce.

Data sharding lives in :class:`sslkern.data.BatchOrder` (DistributedSampler-style,
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


# ---------------------------------------------------------------------------------------
# FSDP2 (``--fsdp``): parameters, gradients and optimizer state sharded over the ranks
# ---------------------------------------------------------------------------------------
BLOCK_PATTERN = r"(?:^|[._])blocks\.\d+$"  # timm ``blocks.N``, ``decoder_blocks.N``, ``predictor_blocks.N``


def is_dtensor(t) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise), sharing its memory."""
    return t.to_local() if is_dtensor(t) else t


def fully_shard_method(method: torch.nn.Module, ema_pairs=(), device_type: str | None = None) -> list[str]:
    """Shard ``method`` with FSDP2: one ``fully_shard`` unit per transformer block (any
    submodule named ``…blocks.N``), then the root (everything else: embeddings, heads,
    decoders). Returns the block names.

    Every block of a student and its EMA teacher's copy become units alike, and FSDP2
    shards every parameter on dim 0 over the same mesh, so each rank's teacher shard covers
    exactly the elements of its student shard (``EMATeacher`` checks the placements).
    The mesh is 1-D over all ranks, on ``device_type`` (default: the parameters' device; CPU
    for meta parameters), so a CPU run on a machine with GPUs still shards on CPU.
    """
    import re

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device_type is None:
        device_type = next((p.device.type for p in method.parameters()), "cpu")
        device_type = "cpu" if device_type == "meta" else device_type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))

    for teacher, student in ema_pairs:  # the teacher mirrors the student's blocks, name for name
        tb = {n for n, _ in teacher.module.named_modules() if re.search(BLOCK_PATTERN, n)}
        sb = {n for n, _ in student.named_modules() if re.search(BLOCK_PATTERN, n)}
        if tb - sb:
            raise ValueError(f"--fsdp: the EMA teacher has blocks the student lacks: {sorted(tb - sb)[:4]}")
    names = [n for n, _ in method.named_modules() if re.search(BLOCK_PATTERN, n)]
    for name in sorted(names, key=lambda n: -n.count(".")):  # inner units first
        fully_shard(method.get_submodule(name), mesh=mesh)
    fully_shard(method, mesh=mesh)
    return names


def full_state_dict(module: torch.nn.Module) -> dict | None:
    """The unsharded state dict on rank 0 (CPU), ``None`` on the other ranks (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else None
