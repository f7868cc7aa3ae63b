"""The one training loop every recipe runs on.

A recipe is a :class:`Method`: an ``nn.Module`` holding every part it trains and every
piece of state it keeps (teachers, centers, queues — as submodules and registered
buffers, so checkpoints need no special cases), plus four small declarations::

    class DINO(Method):
        name, title = "dino", "DINO"
        defaults = dict(epochs=80, lr=1e-3)          # overrides of the common options
        health = {"teacher_entropy_frac": "high"}   # collapse signals: which way is bad

        @staticmethod
        def add_arguments(p): ...                   # the method's own options
        def __init__(self, a, data): ...            # build the model (pure: seeded by the loop)
        def schedule(self, ctx): ...                # per-step values: {"momentum": ..., ...}
        def forward(self, images, ctx): ...         # one step -> (loss, {metric: value})
        def ema_pairs(self): ...                    # [(EMATeacher, student module)]
        def encoders(self): ...                     # {"teacher": vit, "student": vit}
        @staticmethod
        def load_data(a): ...                       # optional: the dataset (default: --data or the digits)

    if __name__ == "__main__":
        sslkern.train.run(DINO)

The loop owns the rest: common options and their checks, the step loop and progress bar,
learning-rate / weight-decay schedules, backward, gradient clipping, frozen parameter
groups, the optimizer step, EMA updates after it, metrics, periodic kNN, atomic
checkpoints and bitwise resume, torchrun (DDP, or FSDP2 with ``--fsdp``), the final kNN +
linear probe of every encoder against the same architecture at its random initialisation,
encoder export, plots, ``summary.txt`` and ``summary.json``.

Contract of ``forward(images, ctx)``: ``images`` are this rank's images of the step, decoded
but not augmented, as a ragged uint8 batch (:class:`sslkern.RaggedImages`, each image at its
own size). The method renders its views and draws its masks and noise through ``ctx``
(:class:`~sslkern.train.context.StepContext`: ``ctx.views``, ``ctx.per_sample``,
``ctx.rand``/``randn``/``randint``), which draws for the global batch from generators seeded
by (seed, step) and keeps this rank's rows: a recipe never sees a rank, and any number of
ranks, workers or prefetched batches gives the same step. The returned loss is the mean over
this rank's rows (DDP averages it over ranks into the global mean); metrics are scalars,
averaged over ranks for the log.

Data (:mod:`sslkern.data`): the global batch order is a pure function of (seed, epoch,
step); worker processes only read and decode; resuming at step s restarts the loader at s.

``--fsdp`` (``--parallel fsdp``) shards instead of replicating: ``fully_shard`` on every
transformer block (``…blocks.N``) of the student and of its EMA teacher alike, then on the
method (the root unit: embeddings, heads, decoders). Parameters, gradients and AdamW state
are DTensors holding 1/world of each tensor; the EMA averages local shards; checkpoints
are one shard file per rank; evaluation and export gather the full weights to rank 0.
A recipe calls its modules as usual; what it must not do under ``--fsdp`` is read a
parameter outside a ``forward`` of the method (it would find a shard).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import torch
from torch import nn

import sslkern
from sslkern.data import BatchOrder, DataError, Dataset, TrainLoader, open_dataset
from sslkern.train import checkpoint as ckpt
from sslkern.train import distributed as dist
from sslkern.train.context import StepContext
from sslkern.train.evaluate import evaluate_encoder
from sslkern.train.logging import RunLogger, Throughput
from sslkern.train.precision import PRECISIONS, LossScaler, autocast, resolve_precision

# Options that may differ between a run and its --resume (everything else must match).
RESUMABLE = ("out", "steps", "resume", "quiet", "threads", "eval_every", "no_probe", "backend", "device", "workers",
             "prefetch", "save_every")


class ResumeError(ValueError):
    """--resume found a checkpoint that this run's settings cannot continue."""


class Method(nn.Module):
    """Base class of a recipe's model; see the module docstring for the contract."""

    name = "method"
    title = "method"
    defaults: dict = {}
    health: dict = {}           # metric -> "high" or "low": the direction that signals collapse
    betas = (0.9, 0.999)        # AdamW
    no_weight_decay = ("pos_embed", "cls_token", "mask_token", "reg_token")
    presets: dict = {}          # {"paper": {option: value, "_doc": "one line"}}: --preset NAME

    def compile_targets(self) -> list:
        """Modules ``--compile`` compiles besides every ViT's blocks (default: the DINO heads)."""
        return [m for m in self.modules() if isinstance(m, sslkern.nn.DINOHead)]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        pass

    @staticmethod
    def check_arguments(a, error) -> None:
        """Call ``error(message)`` for a bad combination of options."""

    @staticmethod
    def load_data(a) -> Dataset:
        """The run's dataset: ``sslkern.data.open_dataset(--data)`` (default: the digits). A recipe
        that needs other data (a colour default, a refusal of grey data) overrides this and returns
        a :class:`sslkern.data.Dataset`; raise ``DataError`` to refuse."""
        return open_dataset(a.data)

    def schedule(self, ctx: StepContext) -> dict:
        return {}

    def ema_pairs(self) -> list:
        return []

    def encoders(self) -> dict:
        raise NotImplementedError

    def frozen(self) -> dict[str, int]:
        """{parameter-name prefix: epochs}: parameters not updated during their first epochs
        (DINO's last layer). Default: none."""
        return {}

    def param_groups(self) -> list[dict]:
        """AdamW groups: weight decay on matrices except position/prefix/mask tokens, one
        group per ``frozen()`` prefix (``freeze_epochs``). A group may also set ``lr_scale``."""
        groups: dict[tuple, list] = {}
        frozen = self.frozen()
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            wd = not (p.ndim <= 1 or any(k in n for k in self.no_weight_decay))
            freeze = next((e for prefix, e in frozen.items() if n.startswith(prefix)), 0)
            groups.setdefault((wd, freeze), []).append(p)
        return [{"params": ps, "apply_wd": wd, "freeze_epochs": fr} for (wd, fr), ps in groups.items()]

    def verdict(self, health: dict) -> tuple[bool, str]:
        """(collapsed, one line) from the final health figures; default: not judged."""
        return False, "no collapse signal defined"

    def timm_kwargs(self) -> dict:
        """Constructor arguments of the exported encoders (``VisionTransformer(**kw)``)."""
        return dict(self._timm_kwargs)


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------
COMMON_DEFAULTS = dict(epochs=70, batch_size=128, lr=2e-3, min_lr=0.0, weight_decay=0.05, weight_decay_end=None,
                       warmup_epochs=5, clip_grad=0.0, clip_mode="global", eval_every=10, threads=1,
                       image_size=16, patch_size=4, dim=96, depth=4, heads=3, parallel="ddp")


def build_parser(method: type[Method]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=method.__doc__ or method.title,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder tree, folder of indexed tar shards (each optionally with "
                                                "train/ and val/), or CIFAR-10 batches dir (default: sklearn digits)")
    p.add_argument("--out", default=f"runs/{method.name}", help="run directory")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps in total (0 = all; schedules unchanged)")
    p.add_argument("--batch-size", type=int, help="global batch (split over ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors if present")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=("auto",) + sslkern.BACKENDS, help="sslkern backend for every op")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast of the forward passes (fp32 weights, optimizer state and EMA teachers; fp16 with a "
                        "loss scaler). auto: bf16 on CUDA with bf16; on a CPU with native bf16 matmul for models of "
                        "embed dim >= 384; else fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks of every ViT (student and teachers) and the heads")
    if method.presets:
        p.add_argument("--preset", choices=sorted(method.presets),
                       help="a published configuration (ImageNet at 224): "
                            + "; ".join(f"{k}: {v.get('_doc', '')}" for k, v in sorted(method.presets.items()))
                            + ". Flags given with it override it")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads per rank (0 = cores / ranks). Default 1: the default model's ops are tiny, "
                        "and on a shared 2-core machine 2 threads ran 5x slower than 1")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("data loading")
    g.add_argument("--workers", type=int, default=None,
                   help="decode processes per rank (default: 0 for the in-memory sets, else min(8, cores/ranks - 1), "
                        "at least 1); any value gives the same run")
    g.add_argument("--prefetch", type=int, default=2, help="batches each worker decodes ahead")
    g.add_argument("--decode-size", type=int, default=0,
                   help="JPEGs are downscaled in the DCT domain while both sides stay >= this (0: 2 x --image-size)")
    g.add_argument("--shard-window", type=int, default=0,
                   help="tar shards only: visit shards in permuted windows of this many (locality on network storage)")
    p.add_argument("--eval-every", type=int, help="kNN every N epochs (0 = only at the end)")
    p.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps as well as at every epoch's end (0 = epoch ends only); a resumed "
                        "run continues mid-epoch exactly")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    p.add_argument("--eval-images", type=int, default=0,
                   help="kNN / probe on at most this many train and test images each (a seeded subset; 0 = all)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), help="under torchrun: replicate (DDP) or shard (FSDP2 "
                                                               "fully_shard per block + root); default ddp")
    p.add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp", help="same as --parallel fsdp")
    g = p.add_argument_group("model (timm VisionTransformer)")
    g.add_argument("--model", default=None,
                   help="a timm ViT name (vit_small_patch16_224, vit_base_patch16_224, ...; sets --dim, --depth, "
                        "--heads, --patch-size); default: the small ViT of the options below")
    g.add_argument("--image-size", type=int)
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the ViT (timm drop_path_rate)")
    g.add_argument("--patch-size", type=int)
    g.add_argument("--dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--heads", type=int)
    g = p.add_argument_group("optimisation (AdamW, warm-up then cosine)")
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--weight-decay-end", type=float, help="cosine weight-decay schedule to this value (default: constant)")
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--clip-grad", type=float, help="gradient clipping norm (0 = off)")
    g.add_argument("--clip-mode", choices=("global", "per-param"), help="one norm over all gradients, or dino's per parameter")
    method.add_arguments(p.add_argument_group(f"{method.title}"))
    p.set_defaults(**{**COMMON_DEFAULTS, **method.defaults})
    return p


def check_common(a, error) -> None:
    for name in ("epochs", "batch_size", "image_size", "patch_size", "dim", "depth", "heads"):
        if getattr(a, name) <= 0:
            error(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(a, name)}")
    for name in ("steps", "threads", "warmup_epochs", "eval_every", "save_every", "decode_size", "shard_window",
                 "eval_images"):
        if getattr(a, name) < 0:
            error(f"--{name.replace('_', '-')} expected >= 0, got {getattr(a, name)}")
    if a.lr <= 0:
        error(f"--lr expected > 0, got {a.lr}")
    if not 0 <= a.drop_path < 1:
        error(f"--drop-path expected in [0, 1), got {a.drop_path}")
    if a.clip_grad < 0:
        error(f"--clip-grad expected >= 0, got {a.clip_grad}")
    if a.image_size % a.patch_size:
        error(f"--image-size {a.image_size} expected a multiple of --patch-size {a.patch_size}")
    if a.dim % a.heads:
        error(f"--dim {a.dim} expected a multiple of --heads {a.heads}")
    if a.device not in ("cpu", "cuda") and not a.device.startswith("cuda:"):
        error(f"--device expected cpu, cuda or cuda:N, got {a.device!r}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        error("--device cuda given but no CUDA device is visible")
    if a.workers is not None and a.workers < 0:
        error(f"--workers expected >= 0, got {a.workers}")
    if a.prefetch < 1:
        error(f"--prefetch expected >= 1, got {a.prefetch}")
    if a.data is not None and not os.path.exists(a.data):
        error(f"--data {a.data!r} does not exist (datasets are never downloaded)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.batch_size % world:
        error(f"--batch-size {a.batch_size} expected a multiple of the number of processes ({world})")


def _timm_config(name: str, error) -> dict:
    """embed dim, depth, heads and patch size of a timm ViT name (built on the meta device)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as e:  # unknown name, or arguments it does not take
        error(f"--model {name!r}: {e}")
    if not isinstance(m, VisionTransformer):
        error(f"--model {name!r} is a {type(m).__name__}; expected a timm VisionTransformer")
    return dict(dim=m.embed_dim, depth=len(m.blocks), heads=m.blocks[0].attn.num_heads,
                patch_size=m.patch_embed.patch_size[0])


def parse_args(method: type[Method], argv=None):
    p = build_parser(method)
    if method.presets:  # a preset replaces the defaults; flags given on the command line still win
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--preset", default=None)
        name = pre.parse_known_args(argv)[0].preset
        if name in method.presets:
            p.set_defaults(**{k: v for k, v in method.presets[name].items() if not k.startswith("_")})
    a = p.parse_args(argv)
    if a.model:
        for k, v in _timm_config(a.model, p.error).items():
            setattr(a, k, v)
    check_common(a, p.error)
    method.check_arguments(a, p.error)
    return p, a


def build_vit(a, in_chans: int, **overrides):
    """The recipes' timm ``VisionTransformer`` (no classifier): ``--model NAME`` through
    ``timm.create_model``, else from ``--dim/--depth/--heads/--patch-size``."""
    if getattr(a, "model", None):
        import timm

        kw = dict(img_size=a.image_size, in_chans=in_chans, num_classes=0, global_pool="token",
                  **({"drop_path_rate": a.drop_path} if getattr(a, "drop_path", 0.0) else {}))
        kw.update(overrides)  # as below: an override replaces a default (I-JEPA: global_pool="avg")
        vit = timm.create_model(a.model, pretrained=False, **kw)
        vit._sslkern_timm_kwargs = {"model_name": a.model, **kw}  # timm.create_model(**) rebuilds it exactly
        return vit
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=a.image_size, patch_size=a.patch_size, in_chans=in_chans, embed_dim=a.dim, depth=a.depth,
              num_heads=a.heads, num_classes=0, global_pool="token")
    if getattr(a, "drop_path", 0.0):
        kw["drop_path_rate"] = a.drop_path
    kw.update(overrides)  # e.g. class_token=False, global_pool="avg"
    vit = VisionTransformer(**kw)
    vit._sslkern_timm_kwargs = kw  # what export_encoder writes, so timm rebuilds it exactly
    return vit


def sincos_pos_embed(dim: int, grid_hw, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``(1, P + H·W, dim)`` (mae / ijepa ``get_2d_sincos_pos_embed``).

    Half the channels encode the column index, half the row index (mae's meshgrid puts w
    first), each as ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_k = 10000^(−k/(dim/4))``; prefix
    tokens (CLS) get zeros.
    """
    h, w = grid_hw
    if dim % 4:
        raise ValueError(f"sincos_pos_embed: dim expected a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def emb(pos):
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    pe = torch.cat([emb(cols), emb(rows)], dim=1)
    pe = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=torch.float64), pe])
    return pe.float().unsqueeze(0)


def use_sincos_pos_embed(vit) -> None:
    """Replace a timm ViT's learned position embedding by the fixed sin-cos one (MAE, I-JEPA)."""
    grid = tuple(vit.patch_embed.grid_size)
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed(vit.embed_dim, grid, prefix))
    vit.pos_embed.requires_grad_(False)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def make_optimizer(method: Method, a) -> torch.optim.Optimizer:
    groups = method.param_groups()
    for g in groups:
        g.setdefault("apply_wd", True)
        g.setdefault("lr_scale", 1.0)
        g.setdefault("freeze_epochs", 0)
        g["weight_decay"] = a.weight_decay if g["apply_wd"] else 0.0
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=a.lr, betas=method.betas)


def _clip(params, max_norm: float, mode: str) -> None:
    grads = [p for p in params if p.grad is not None]
    if any(dist.is_dtensor(p.grad) for p in grads):
        return _clip_sharded(grads, max_norm, mode)
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(grads, max_norm)
        return
    for p in grads:  # dino utils.clip_gradients: each parameter's gradient norm capped on its own
        coef = max_norm / (float(p.grad.norm(2)) + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)


def _clip_sharded(grads, max_norm: float, mode: str) -> None:
    """``_clip`` on FSDP2 gradients: the norms are of the full gradients (sums of squares of
    the local shards, one all-reduce over ranks), the scaling is applied to the shards."""
    if any(not dist.is_dtensor(p.grad) or not all(pl.is_shard() for pl in p.grad.placements) for p in grads):
        raise NotImplementedError("gradient clipping under --fsdp expects every gradient sharded (FSDP2 Shard(0))")
    local_sq = torch.stack([dist.local(p.grad).float().pow(2).sum() for p in grads])
    sq = dist.all_reduce_sum(local_sq)
    if mode == "global":
        coefs = (max_norm / (sq.sum().sqrt() + 1e-6)).clamp(max=1.0).expand(len(grads))
    else:  # per parameter, as dino: each full gradient's norm capped on its own
        coefs = torch.where(max_norm / (sq.sqrt() + 1e-6) < 1, max_norm / (sq.sqrt() + 1e-6), torch.ones_like(sq))
    for p, c in zip(grads, coefs):
        dist.local(p.grad).mul_(c.to(p.grad.dtype))


class StepTimer:
    """Wall time of a step's phases: data wait, forward, backward, optimizer + EMA. On CUDA the
    phases are CUDA events read after the step has finished (no extra sync); on the CPU, clocks."""

    PHASES = ("forward", "backward", "optimizer")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        self.marks = []
        self.mark()

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> dict:
        m = self.marks
        if self.cuda:
            m[-1].synchronize()
            return {f"{k}_s": m[i].elapsed_time(m[i + 1]) / 1e3 for i, k in enumerate(self.PHASES)}
        return {f"{k}_s": m[i + 1] - m[i] for i, k in enumerate(self.PHASES)}


def train_step(a, model: nn.Module, method: Method, opt: torch.optim.Optimizer, images, ctx: StepContext,
               scaler: LossScaler | None = None, timer: StepTimer | None = None):
    """One optimisation step: schedules → the method's forward (under autocast) → backward
    (fp16: scaled) → frozen groups → clipping → AdamW → EMA updates. ``model`` is ``method``
    (also when sharded) or its DDP wrapper."""
    scaler = scaler or LossScaler(torch.device("cpu"), "fp32")
    for g in opt.param_groups:
        g["lr"] = ctx.lr * g["lr_scale"]
        g["weight_decay"] = ctx.weight_decay if g["apply_wd"] else 0.0
    if timer:
        timer.start()
    with autocast(ctx.device, a.precision):
        loss, metrics = model(images, ctx)                                      # the method's step
    if timer:
        timer.mark()
    opt.zero_grad(set_to_none=True)
    scaler.backward(loss)
    if timer:
        timer.mark()
    for g in opt.param_groups:                                                  # e.g. DINO's last layer
        if ctx.epoch < g["freeze_epochs"]:
            for p in g["params"]:
                p.grad = None
    scaler.unscale_(opt)                                                        # fp16: clip true gradients
    if a.clip_grad:
        _clip([p for g in opt.param_groups for p in g["params"]], a.clip_grad, a.clip_mode)
    scaler.step(opt)
    for teacher, student in method.ema_pairs():                                 # EMA after the step
        teacher.update(student, ctx.momentum)
    if timer:
        timer.mark()
    return loss, metrics


def _metric_values(loss: torch.Tensor, metrics: dict) -> dict[str, float]:
    """Loss and metrics averaged over ranks, as floats (one all-reduce)."""
    names = ["loss", *metrics]
    vals = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).cpu()
                        for v in [loss, *metrics.values()]])
    if dist.is_enabled():
        vals = dist.all_reduce_mean(vals.to(loss.device)).cpu()
    return dict(zip(names, vals.tolist()))


def is_sharded(a, info) -> bool:
    """``--fsdp`` under torchrun with more than one process (one process runs unsharded)."""
    return info.enabled and a.parallel == "fsdp"


def unsharded_copy(method_cls: type[Method], a, data, method: Method, info):
    """Collective under ``--fsdp``: a plain copy of ``method`` with the full weights on rank 0
    (``None`` on the other ranks), for kNN, probe and export; ``method`` itself otherwise."""
    if not is_sharded(a, info):
        return method
    sd = dist.full_state_dict(method)
    if not info.is_main:
        return None
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the run's RNG
        copy = method_cls(a, data)
    copy.load_state_dict(sd, strict=True)
    return copy.to(info.device)


def compile_method(method: Method) -> None:
    """``--compile``: every transformer block of every ViT in the method (students, EMA teachers)
    and the method's ``compile_targets()``, each with ``torch.compile`` (the sslkern custom ops
    inside stay single graph nodes). Blocks rather than whole models: the recipes call pieces of
    a ViT (patch embedding, blocks, norm) as well as the whole. A forward that reads layers
    through hooks added for the call (``sslkern.nn.block_outputs``: data2vec's teacher targets)
    runs its blocks eagerly, since compiled blocks do not see such hooks."""
    from timm.models.vision_transformer import VisionTransformer

    for m in method.modules():
        if isinstance(m, VisionTransformer):
            for blk in m.blocks:
                blk.compile()
    for m in method.compile_targets():
        m.compile()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated, or this process's peak resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loader_settings(a, data: Dataset, info) -> dict:
    """Worker count and decode size for this run (``--workers``, ``--decode-size`` resolved)."""
    workers = a.workers
    if workers is None:
        workers = 0 if data.in_memory else max(1, min(8, (os.cpu_count() or 1) // info.world_size - 1))
    return dict(workers=workers, prefetch=a.prefetch, min_side=None if data.in_memory else (a.decode_size or
                                                                                            2 * a.image_size))


def train(method_cls: type[Method], a, info, log):
    t_start = time.perf_counter()
    data = method_cls.load_data(a)
    torch.manual_seed(a.seed)
    method = method_cls(a, data).to(info.device)
    if a.compile:
        compile_method(method)
    sharded = is_sharded(a, info)
    if sharded:  # FSDP2: the method is its own root unit, called as usual
        dist.fully_shard_method(method, method.ema_pairs())
        model = method
    else:
        model = (nn.parallel.DistributedDataParallel(method, broadcast_buffers=False) if info.enabled else method)
    opt = make_optimizer(method, a)  # after sharding: AdamW holds (and keeps state of) the shards
    gen = torch.Generator(device=info.device)  # masks, noise: reseeded every step
    host_gen = torch.Generator()               # view parameters (drawn from the images' sizes, on the host)

    if a.shard_window and not data.train.shard_sizes:
        raise DataError(f"--shard-window needs a training split of tar shards; {data.train.name} is not one")
    if a.batch_size > len(data.train):
        raise DataError(f"--batch-size {a.batch_size} is larger than the training set ({len(data.train)} images)")
    order = BatchOrder(len(data.train), a.batch_size, a.seed, shard_sizes=data.train.shard_sizes,
                       window=a.shard_window)
    steps_per_epoch = order.steps_per_epoch
    total_steps, warmup = a.epochs * steps_per_epoch, a.warmup_epochs * steps_per_epoch
    last = min(total_steps, a.steps) if a.steps else total_steps
    step, ckpt_path = 0, os.path.join(a.out, "checkpoint.safetensors")
    # what a resumed run must share, as the checkpoint's JSON stores it (tuples become lists)
    run_config = json.loads(json.dumps({k: v for k, v in vars(a).items() if k not in RESUMABLE}))
    if a.resume and os.path.exists(ckpt_path):
        if ckpt.is_sharded_checkpoint(ckpt_path) != sharded:
            kind = "a replicated (not --fsdp)" if sharded else "a sharded (--fsdp)"
            raise ResumeError(f"--resume: {ckpt_path} is {kind} checkpoint; resume it with the parallel mode "
                              f"and the number of ranks that wrote it")
        load = ckpt.load_sharded_training_state if sharded else ckpt.load_training_state
        try:
            saved = load(ckpt_path, modules={"method": method}, optimizer=opt, generators={"step": gen})
        except ValueError as e:
            raise ResumeError(f"--resume: {e}") from None
        saved["config"].setdefault("parallel", "ddp")  # checkpoints from before --fsdp
        changed = {k: (saved["config"].get(k), v) for k, v in run_config.items() if saved["config"].get(k) != v}
        if changed:
            raise ResumeError(f"--resume: {ckpt_path} was written with different settings "
                              f"(name: (checkpoint, now)): {changed}")
        step = saved["step"]
        log.print(f"resumed from {ckpt_path} at step {step}")
    else:
        saved = {}

    settings = loader_settings(a, data, info)
    loader = TrainLoader(data.train, order, start=step, stop=last, rank=info.rank, world_size=info.world_size,
                         device=info.device, **settings)
    scaler, timer = LossScaler(info.device, a.precision), StepTimer(info.device)
    if a.resume and os.path.exists(ckpt_path) and step:
        scaler.load_state_dict(saved.get("scaler", {}))
    log.progress(last, initial=step)
    speed = Throughput()
    reported: set[str] = set()
    batches = iter(loader)
    first = True
    while step < last:
        t_wait = time.perf_counter()
        batch = next(batches)                                                   # this rank's decoded images
        wait_s = time.perf_counter() - t_wait
        for msg in batch.bad:                                                   # replaced unreadable images
            if msg not in reported:
                reported.add(msg)
                log.print(f"warning: {msg} (replaced by the next image of the epoch's order)")
        epoch = step // steps_per_epoch
        gen.manual_seed(a.seed * 1_000_003 + step)  # same on every rank; independent of interruptions
        host_gen.manual_seed(a.seed * 1_000_003 + step)
        ctx = StepContext(step, epoch, total_steps, steps_per_epoch, gen, a.batch_size, info.rank, info.world_size,
                          lr=sslkern.schedules.warmup_cosine(step, total_steps, warmup, a.lr, a.min_lr),
                          weight_decay=a.weight_decay if a.weight_decay_end is None else
                          sslkern.schedules.cosine_schedule(step, total_steps, a.weight_decay, a.weight_decay_end),
                          host_generator=host_gen, mean=tuple(data.mean), std=tuple(data.std))
        ctx.values = method.schedule(ctx)

        loss, metrics = train_step(a, model, method, opt, batch.images(), ctx, scaler, timer)
        step += 1

        values = _metric_values(loss, metrics)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss became {values['loss']} at step {step}")
        step_s = speed.tick()
        extra = {k: ctx.values[k] for k in ctx.values if isinstance(ctx.values[k], (int, float))}
        timing = {"img_per_s": a.batch_size / step_s, "rank_img_per_s": len(batch) / step_s, "step_s": step_s,
                  "data_wait_s": wait_s, "data_wait_frac": min(1.0, wait_s / step_s), **timer.seconds(),
                  "peak_mem_mb": peak_memory_mb(info.device)}
        if first:
            timing["first_step_s"] = time.perf_counter() - t_start  # process start to the end of the first step
            first = False
        log.log("train", step, epoch, **values, lr=ctx.lr, weight_decay=ctx.weight_decay, **extra,
                **scaler.metrics(), bad_images=len(batch.bad), **timing)
        rate = timing["img_per_s"]
        log.update_bar(**{k: values[k] for k in ["loss", *list(method.health)[:1]] if k in values}, lr=ctx.lr,
                       img_s=round(rate))
        end_of_epoch = step % steps_per_epoch == 0
        if end_of_epoch and a.eval_every and (step // steps_per_epoch) % a.eval_every == 0 and step < last:
            full = unsharded_copy(method_cls, a, data, method, info)
            if info.is_main:
                log.log("eval", step, step // steps_per_epoch,
                        **{f"{n}_knn": evaluate_encoder(m, data, image_size=a.image_size, probe=False,
                                                        max_images=a.eval_images, **settings)["knn"]
                           for n, m in full.encoders().items()})
        if end_of_epoch or step == last or (a.save_every and step % a.save_every == 0):
            state = dict(modules={"method": method}, optimizer=opt, generators={"step": gen},
                         extra={"step": step, "epoch": step // steps_per_epoch, "total_steps": total_steps,
                                "config": run_config, "scaler": scaler.state_dict()})
            if sharded:  # collective: every rank writes its shards
                ckpt.save_sharded_training_state(ckpt_path, **state)
            elif info.is_main:
                ckpt.save_training_state(ckpt_path, **state)
        speed.tick()  # evaluation and checkpoints are not step time
    log.close_bar()
    dist.barrier()
    return data, method, step, steps_per_epoch


def final_evaluation(method_cls, a, info, log, data: Dataset, method: Method, step: int, steps_per_epoch: int):
    """kNN + probe of every encoder and of the same architecture at its random init (seed)."""
    teachers = [t for t, _ in method.ema_pairs()]
    # replicas (DDP) must hold equal teachers; sharded, only the buffers are replicated
    replicated = [x for t in teachers for x in (t.buffers() if is_sharded(a, info) else t.parameters())
                  if x.is_floating_point()]
    drift = dist.max_abs_diff_across_ranks(torch.cat([x.flatten() for x in replicated])) if replicated else 0.0
    full = unsharded_copy(method_cls, a, data, method, info)
    results = None
    if info.is_main:
        method = full
        torch.manual_seed(a.seed)  # rebuilt exactly as the run began: the student's initial weights
        random_init = next(iter(method_cls(a, data).encoders().values())).to(info.device)
        encoders = {**method.encoders(), "random": random_init}
        settings = loader_settings(a, data, info)
        results = {name: evaluate_encoder(m, data, image_size=a.image_size, probe=not a.no_probe,
                                          max_images=a.eval_images, **settings)
                   for name, m in encoders.items()}
        log.log("final", step, step // steps_per_epoch, teacher_replica_max_diff=drift,
                **{f"{n}_{m}": v for n, r in results.items() for m, v in r.items()})
        for name, enc in method.encoders().items():
            ckpt.export_encoder(os.path.join(a.out, f"encoder_{name}.safetensors"), enc,
                                getattr(enc, "_sslkern_timm_kwargs", {}), getattr(method, "export_extra", {}))
    results = dist.broadcast_object(results)
    results["teacher_replica_max_diff"] = drift
    return results


def run(method_cls: type[Method], argv=None) -> dict:
    """Parse options, train, evaluate, write the run directory; returns the results dict."""
    from sslkern.train.summary import health_summary, throughput_summary, write_summary

    parser, a = parse_args(method_cls, argv)
    info = dist.init_distributed(a.device)
    a.precision, precision_why = resolve_precision(a.precision, info.device, a.dim)
    if a.precision == "fp16" and info.device.type == "cpu" and not hasattr(torch.amp, "GradScaler"):
        parser.error("--precision fp16 needs torch.amp.GradScaler (torch >= 2.3)")
    # process-wide settings for the run, restored afterwards (run() is also called in-process)
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // info.world_size))
    if info.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    config = {**vars(a), "method": method_cls.name, "world_size": info.world_size, "torch": torch.__version__,
              "sslkern": sslkern.__version__}
    log = RunLogger(a.out, config, is_main=info.is_main, quiet=a.quiet,
                    resume_step=None if not a.resume else ckpt.checkpoint_step(os.path.join(a.out, "checkpoint.safetensors")))
    log.print(f"precision {a.precision} ({precision_why})")
    t0 = time.perf_counter()
    try:
        with sslkern.use_backend(None if a.backend == "auto" else a.backend):
            data, method, step, spe = train(method_cls, a, info, log)
            train_s = time.perf_counter() - t0
            results = final_evaluation(method_cls, a, info, log, data, method, step, spe)
    except (DataError, ResumeError) as e:
        parser.error(str(e))
    finally:
        dist.cleanup()
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
    results.update(train_s=train_s, total_s=time.perf_counter() - t0, step=step, out=a.out)
    if not info.is_main:
        return results
    rows = RunLogger.read_metrics(log.metrics_path)
    health = health_summary(rows, method_cls.health, step)
    results["throughput"] = throughput_summary(rows)
    results["skipped_steps"] = next((r["skipped_steps"] for r in reversed(rows) if "skipped_steps" in r), 0)
    collapsed, verdict = method.verdict({k: v["final"] for k, v in health.items()})
    results.update(health=health, collapsed=collapsed, verdict=verdict)
    log.plot(health=list(method_cls.health))
    write_summary(a, method_cls, data, info, results)
    encs = [k for k in results if isinstance(results[k], dict) and "knn" in results[k]]
    row = lambda k: [k, *(f"{results[k][m]:.1f}" if m in results[k] else "-" for m in ("knn", "probe"))]  # noqa: E731
    tp = results["throughput"]
    lines = [("train time", f"{train_s:.0f} s"), ("total time", f"{results['total_s']:.0f} s")]
    if tp:
        lines.append(("throughput", f"{tp.get('img_per_s', 0):.0f} images/s (median), data wait "
                                    f"{100 * tp.get('data_wait_frac', 0):.1f} %, peak memory {tp.get('peak_mem_mb', 0):.0f} MiB"))
    lines += [(name, f"{v['final']:.3g} (worst {v['worst']:.3g})") for name, v in health.items()]
    lines += [("verdict", verdict), ("run directory", a.out)]
    log.summary(f"{method_cls.title} on {data.name} — seed {a.seed}, {step} steps, world {info.world_size}, "
                f"backend {a.backend}", lines, [["encoder", "kNN %", "probe %"], *map(row, encs)])
    return results

