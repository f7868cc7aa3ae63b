"""Checkpoints as safetensors, written atomically; nothing is ever unpickled.

A checkpoint is one ``.safetensors`` file: every tensor (model weights, optimizer state,
RNG states as uint8 tensors) under a prefixed name, plus one JSON string in the file's
metadata for the rest (step, epoch, optimizer hyper-parameters, Python/NumPy RNG states).
Writes go to a temporary file in the same directory, are fsynced, then ``os.replace``d,
so a crash (even SIGKILL) leaves either the old or the new checkpoint, never half of one.

Sharded runs (``--fsdp``): every rank writes its own local shards (model parameters and
optimizer state, as DTensor local tensors) to ``<name>.shards/step<S>-rank<r>-of-<W>.safetensors``,
then, after a barrier, rank 0 writes ``<name>`` itself (RNG states, optimizer
hyper-parameters, ``extra``, and which shard files belong to it) and removes older shard
files. A crash at any point leaves a ``<name>`` whose shard files are complete.

``export_encoder`` writes a bare timm ``VisionTransformer`` state dict with its
constructor arguments in the metadata; ``load_exported_encoder`` rebuilds it and loads it
with ``strict=True``.
"""
from __future__ import annotations

import json
import os
import random
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save

METADATA_KEY = "sslkern"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + os.replace + directory fsync)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomically save ``tensors`` (copied to contiguous CPU memory) with JSON ``metadata``."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata={METADATA_KEY: json.dumps(metadata or {})}))


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON metadata of a file written by :func:`save_tensors`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    return load_file(path), meta


# ---------------------------------------------------------------------------------------
# Optimizer and RNG state <-> tensors + JSON
# ---------------------------------------------------------------------------------------
def optimizer_to_flat(optimizer: torch.optim.Optimizer, prefix: str = "optim/") -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{pid}/{name}"] = value
            else:
                scalars[f"{pid}/{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str = "optim/") -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix):].split("/", 1)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict, dict]:
    """Every RNG a run draws from: torch (CPU, CUDA), the named generators, NumPy, Python."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    for name, g in generators.items():
        tensors[f"rng/gen/{name}"] = g.get_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def set_rng_state(generators: dict[str, torch.Generator], tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    for name, g in generators.items():
        g.set_state(tensors[f"rng/gen/{name}"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_training_state(path: str, *, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator], extra: dict) -> None:
    """One atomic checkpoint: module weights/buffers, optimizer, RNG states, ``extra`` JSON."""
    tensors = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}/{k}"] = v
    opt_t, opt_meta = optimizer_to_flat(optimizer)
    rng_t, rng_meta = rng_state(generators)
    tensors.update(opt_t)
    tensors.update(rng_t)
    save_tensors(path, tensors, {"optimizer": opt_meta, "rng": rng_meta, **extra})


def load_training_state(path: str, *, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator]) -> dict:
    """Restore what :func:`save_training_state` wrote (strict module loads); returns ``extra``."""
    tensors, meta = load_tensors(path)
    for name, module in modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    optimizer_from_flat(optimizer, tensors, meta.pop("optimizer"))
    set_rng_state(generators, tensors, meta.pop("rng"))
    return meta


# ---------------------------------------------------------------------------------------
# Sharded (FSDP2) training state: one file of local shards per rank + rank 0's manifest
# ---------------------------------------------------------------------------------------
def _shard_dir(path: str) -> str:
    return path + ".shards"


def _shard_name(step: int, rank: int, world: int) -> str:
    return f"step{step:08d}-rank{rank}-of-{world}.safetensors"


def save_sharded_training_state(path: str, *, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                                generators: dict[str, torch.Generator], extra: dict) -> None:
    """Collective: every rank's local shards to its own file, then rank 0's manifest ``path``."""
    import torch.distributed as tdist

    from .distributed import is_dtensor, local

    rank, world = tdist.get_rank(), tdist.get_world_size()
    tensors, sharded = {}, []
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}/{k}"] = local(v)
            if is_dtensor(v):
                sharded.append(f"{name}/{k}")
    opt_t, opt_meta = optimizer_to_flat(optimizer)
    for k, v in opt_t.items():
        tensors[k] = local(v)
        if is_dtensor(v):
            sharded.append(k)
    step = int(extra["step"])
    save_tensors(os.path.join(_shard_dir(path), _shard_name(step, rank, world)), tensors,
                 {"rank": rank, "world_size": world, "step": step, "sharded": sharded})
    tdist.barrier()  # every shard file of this step is on disk before the manifest names it
    if rank == 0:
        rng_t, rng_meta = rng_state(generators)
        save_tensors(path, rng_t, {"optimizer": opt_meta, "rng": rng_meta, **extra,
                                   "sharded": {"world_size": world, "step": step}})
        keep = {_shard_name(step, r, world) for r in range(world)}
        for f in os.listdir(_shard_dir(path)):
            if f not in keep:
                os.unlink(os.path.join(_shard_dir(path), f))
    tdist.barrier()


def is_sharded_checkpoint(path: str) -> bool:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return "sharded" in json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def load_sharded_training_state(path: str, *, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                                generators: dict[str, torch.Generator]) -> dict:
    """Restore what :func:`save_sharded_training_state` wrote, on the same number of ranks
    (each rank its own shards, copied in place into its local tensors; strict keys)."""
    import torch.distributed as tdist
    from torch.distributed.tensor import DTensor

    from .distributed import local

    rank, world = tdist.get_rank(), tdist.get_world_size()
    rng_t, meta = load_tensors(path)
    info = meta.pop("sharded", None)
    if info is None:
        raise ValueError(f"{path} is not a sharded (--fsdp) checkpoint")
    if info["world_size"] != world:
        raise ValueError(f"{path} was written by {info['world_size']} ranks (--fsdp), this run has {world}")
    tensors, shard_meta = load_tensors(os.path.join(_shard_dir(path), _shard_name(info["step"], rank, world)))
    sharded = set(shard_meta["sharded"])
    with torch.no_grad():
        for name, module in modules.items():
            prefix = f"{name}/"
            sd = module.state_dict()
            saved = {k[len(prefix):] for k in tensors if k.startswith(prefix)}
            if saved != set(sd):
                raise KeyError(f"{path}: {name} keys differ: missing {sorted(set(sd) - saved)[:5]}, "
                               f"unexpected {sorted(saved - set(sd))[:5]}")
            for k, v in sd.items():
                local(v).copy_(tensors[prefix + k])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_t = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            p = params[int(k[len("optim/"):].split("/", 1)[0])]
            if k in sharded:  # a DTensor when saved: rebuilt like its parameter
                v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            opt_t[k] = v
    optimizer_from_flat(optimizer, opt_t, meta.pop("optimizer"))
    set_rng_state(generators, rng_t, meta.pop("rng"))
    return meta


# ---------------------------------------------------------------------------------------
# Encoder export for timm
# ---------------------------------------------------------------------------------------
def export_encoder(path: str, model: torch.nn.Module, timm_kwargs: dict, extra: dict | None = None) -> None:
    """Save ``model.state_dict()`` so ``timm VisionTransformer(**timm_kwargs)`` loads it strictly."""
    save_tensors(path, dict(model.state_dict()), {"timm_class": "VisionTransformer", "timm_kwargs": timm_kwargs, **(extra or {})})


def load_exported_encoder(path: str):
    """Rebuild the timm ``VisionTransformer`` of an exported encoder and load it with ``strict=True``
    (``timm.create_model(name, pretrained=False, **kwargs)`` when it was built by name)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    tensors, meta = load_tensors(path)
    kw = dict(meta["timm_kwargs"])
    name = kw.pop("model_name", None)
    model = timm.create_model(name, pretrained=False, **kw) if name else VisionTransformer(**kw)
    model.load_state_dict(tensors, strict=True)
    return model


def checkpoint_step(path: str) -> int | None:
    """The ``step`` recorded in a training checkpoint (None if there is no file)."""
    if not os.path.exists(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}")).get("step")
