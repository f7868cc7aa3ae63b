"""data2vec 2.0 pretraining of a small ViT on sslkern ops (Baevski et al. 2022, arXiv:2212.07525).

    python recipes/data2vec2.py                      # digits, 16x16, ~3-4 min on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/data2vec2.py # data-parallel (gloo on CPU, nccl on GPU)

One step, as in fairseq ``examples/data2vec/models/data2vec2.py``:
  1. masks     M clone masks per image (random 0.7 by default; inverse block optional)
  2. targets   the EMA teacher encodes the full image; the FFN outputs (before the residual)
               of its top K blocks are instance-normalized over tokens, averaged and
               layer-normalized (``sslkern.layer_average_targets``)
  3. student   ONE patch-embedding pass, then the visible tokens of all M masks are gathered
               (``sslkern.gather_tokens``) and encoded
  4. decoder   visible outputs are put back on the grid with N(0, 0.01^2) noise in the masked
               slots (``sslkern.restore_tokens``) and refined by two grouped 3x3 convolutions
  5. loss      masked L2 regression scaled by 1/sqrt(D) (``sslkern.masked_regression_loss``),
               divided by the global masked-token count, plus CLS -> mean-target regression
  6. step      AdamW, warm-up then cosine learning rate
  7. EMA       teacher <- EMA of the student encoder, momentum annealed linearly 0.99 -> 0.997

Deviations from fairseq, for a ~500-step run: EMA 0.99 -> 0.997 (not 0.9998 -> 0.99999;
with 0.999 at the end the teacher still lags the student by ~8 kNN points after 60
epochs); the CLS term is averaged over clones, weight 0.1 (fairseq sums it, weight 0.01).

Why random masking by default: the default grid is 4x4 = 16 tokens (16x16 digits, patch 4).
Inverse block masking keeps 3x3 blocks around a few centres; on a 4x4 grid one block already
covers more than half the image, so masks barely vary and the task degenerates
(CALIBRATION: 58.5 % kNN with inverse blocks vs 82 % with random masking). Use
``--mask inverse_block`` on larger grids (e.g. ``--image-size 32 --patch-size 2``).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sslkern  # noqa: E402
from sslkern.train import checkpoint as ckpt  # noqa: E402
from sslkern.train import distributed as dist  # noqa: E402
from sslkern.train.data import DataError, augment, epoch_batches, load_dataset  # noqa: E402
from sslkern.train.evaluate import evaluate_encoder  # noqa: E402
from sslkern.train.logging import RunLogger, Throughput  # noqa: E402


# ---------------------------------------------------------------------------------------
# Model: timm ViT encoder (student, and its EMA copy as teacher) + light conv decoder
# ---------------------------------------------------------------------------------------
def timm_kwargs(a, in_chans):
    return dict(img_size=a.image_size, patch_size=a.patch_size, in_chans=in_chans, embed_dim=a.dim, depth=a.depth,
                num_heads=a.heads, num_classes=0, global_pool="token")


def build_encoder(a, in_chans):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(**timm_kwargs(a, in_chans))
    if a.alibi:  # AlibiAttention keeps timm's parameter names, so the state dict is unchanged
        vit.alibi = sslkern.nn.use_alibi(vit, mode="2d")  # shared context: coordinates of the current tokens
    return vit


class ConvDecoder(nn.Module):
    """fairseq ``Decoder2d``: [grouped conv k×k → LayerNorm (no affine) → GELU] × L, residual from layer 2, linear out."""

    def __init__(self, embed_dim, grid_hw, dim=64, layers=2, kernel=3, groups=16):
        super().__init__()
        self.grid_hw = grid_hw
        self.convs = nn.ModuleList(nn.Conv2d(embed_dim if i == 0 else dim, dim, kernel, padding=kernel // 2, groups=groups)
                                   for i in range(layers))
        self.proj = nn.Linear(dim, embed_dim)

    def forward(self, x):  # (B, N, D) tokens on the full grid
        b, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, *self.grid_hw)
        for i, conv in enumerate(self.convs):
            y = F.gelu(F.layer_norm(conv(x).permute(0, 2, 3, 1), (conv.out_channels,)).permute(0, 3, 1, 2))
            x = y if i == 0 else x + y
        return self.proj(x.flatten(2).transpose(1, 2))


class Student(nn.Module):
    """Encodes the visible tokens of M masks per image from one embedding pass, then decodes."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, images, ids_keep, ids_restore, noise):
        """ids_keep (B, M, Nk), ids_restore (B*M, N), noise (B*M, N, D) → CLS (B*M, D), predictions (B*M, N, D)."""
        vit = self.encoder
        b, m, nk = ids_keep.shape
        x = vit._pos_embed(vit.patch_embed(images))  # (B, 1+N, D): one embedding pass for all clones
        x = sslkern.gather_tokens(x, ids_keep, num_prefix_tokens=1)  # (B*M, 1+Nk, D), image-major
        alibi = getattr(vit, "alibi", None)  # ALiBi bias from the kept tokens' true grid coordinates
        with alibi.tokens(ids_keep=ids_keep.reshape(b * m, nk)) if alibi else contextlib.nullcontext():
            x = vit.norm(vit.blocks(vit.norm_pre(x)))
        full = sslkern.restore_tokens(x, ids_restore, fill=noise.to(x), num_prefix_tokens=1)  # noise in masked slots
        return x[:, 0], self.decoder(full[:, 1:])  # CLS (B*M, D), predictions (B*M, N, D)


@torch.no_grad()
def teacher_targets(teacher_vit, images, top_k):
    """Top-K blocks' FFN outputs (before the residual, CLS dropped) → ``layer_average_targets``."""
    outs = []
    hooks = [blk.mlp.register_forward_hook(lambda mod, inp, out: outs.append(out[:, 1:]))
             for blk in teacher_vit.blocks[-top_k:]]
    teacher_vit.forward_features(images)
    for h in hooks:
        h.remove()
    return sslkern.layer_average_targets(outs, layer_norm="instance", final_norm="layer")  # (B, N, D) fp32


def make_masks(a, batch, grid_hw, generator):
    if a.mask == "random":
        return sslkern.masks.random_mask(batch, grid_hw[0] * grid_hw[1], a.mask_ratio, num_masks=a.clones,
                                     generator=generator, device=generator.device)
    return sslkern.masks.inverse_block_mask(batch, grid_hw, a.mask_ratio, mask_length=a.mask_length, num_masks=a.clones,
                                        generator=generator, device=generator.device)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def build(a, in_chans, info):
    """Student (encoder + decoder, DDP-wrapped when distributed), EMA teacher, AdamW."""
    torch.manual_seed(a.seed)
    encoder = build_encoder(a, in_chans)
    grid = tuple(encoder.patch_embed.grid_size)
    student = Student(encoder, ConvDecoder(a.dim, grid, a.decoder_dim, a.decoder_layers, groups=a.decoder_groups)).to(info.device)
    teacher = sslkern.nn.EMATeacher(student.encoder)  # frozen deep copy; the decoder has no teacher
    model = nn.parallel.DistributedDataParallel(student) if info.enabled else student
    wd = lambda n, p: p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n  # noqa: E731
    opt = torch.optim.AdamW([{"params": [p for n, p in student.named_parameters() if wd(n, p)], "weight_decay": a.weight_decay},
                             {"params": [p for n, p in student.named_parameters() if not wd(n, p)], "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    return student, teacher, model, opt


def train_step(a, model, student, teacher, opt, images, gen, momentum, rank=0, world_size=1):
    """One data2vec 2.0 step on this rank's (augmented) images; returns the global loss (detached).

    Masks and decoder noise are drawn for the whole global batch from the same-seeded
    generator on every rank, and each rank takes its rows (rank::world_size, like its
    images), so a run on any number of ranks computes the same step as one process.
    """
    b, grid, m = images.shape[0], tuple(student.encoder.patch_embed.grid_size), a.clones
    rows = slice(rank, None, world_size)
    masks = make_masks(a, b * world_size, grid, gen)                            # 1. masks
    ids_keep = masks.ids_keep.reshape(b * world_size, m, -1)[rows]              # (B, M, Nk)
    ids_restore = masks.ids_restore.reshape(b * world_size, m, -1)[rows].reshape(b * m, -1)
    mask = masks.mask.reshape(b * world_size, m, -1)[rows].reshape(b * m, -1)   # (B*M, N) True = masked
    noise = torch.randn(b * world_size, m, *ids_restore.shape[1:], a.dim, generator=gen, device=gen.device)
    noise = a.noise_std * noise[rows].reshape(b * m, -1, a.dim)                 # decoder fill of masked slots
    targets = teacher_targets(teacher.module, images, a.top_k)                  # 2. targets (B, N, D)
    cls_pred, pred = model(images, ids_keep, ids_restore, noise)                # 3-4. student + decoder
    n_masked = dist.all_reduce_sum(mask.sum().to(torch.float64))                # global masked tokens
    reg = sslkern.masked_regression_loss(pred, targets, mask, reduction="sum")  # 5. loss (sum over tokens)
    cls = sslkern.masked_regression_loss(cls_pred.unsqueeze(1), targets.mean(1, keepdim=True), None, reduction="sum")
    loss = reg / n_masked + a.cls_weight * cls / (b * m * world_size)
    opt.zero_grad(set_to_none=True)
    (loss * world_size).backward()  # DDP averages gradients over ranks: undo it → global sum / global count
    opt.step()                                                                  # 6. step
    teacher.update(student.encoder, momentum)                                   # 7. EMA
    return dist.all_reduce_sum(loss.detach().to(torch.float64))


def train(a, info, log):
    data = load_dataset(a.data, a.image_size)
    student, teacher, model, opt = build(a, data.in_chans, info)
    gen = torch.Generator(device=info.device)  # masks, augmentation, decoder noise

    steps_per_epoch = data.train_images.shape[0] // a.batch_size
    total_steps, warmup = a.epochs * steps_per_epoch, a.warmup_epochs * steps_per_epoch
    last = min(total_steps, a.steps) if a.steps else total_steps
    step, ckpt_path = 0, os.path.join(a.out, "checkpoint.safetensors")
    modules = {"student": student, "teacher": teacher.module}
    run_config = {k: v for k, v in vars(a).items() if k not in RESUMABLE}  # what a resumed run must share
    if a.resume and os.path.exists(ckpt_path):
        saved = ckpt.load_training_state(ckpt_path, modules=modules, optimizer=opt, generators={"masks": gen})
        changed = {k: (saved["config"].get(k), v) for k, v in run_config.items() if saved["config"].get(k) != v}
        if changed:
            raise ResumeError(f"--resume: {ckpt_path} was written with different settings "
                             f"(name: (checkpoint, now)): {changed}")
        step = saved["step"]
        log.print(f"resumed from {ckpt_path} at step {step}")

    log.progress(last, initial=step)
    speed = Throughput()
    while step < last:
        epoch, pos = divmod(step, steps_per_epoch)
        idx = epoch_batches(len(data.train_labels), a.batch_size, epoch, a.seed, rank=info.rank,
                            world_size=info.world_size)[pos]
        gen.manual_seed(a.seed * 1_000_003 + step)  # same on every rank; independent of interruptions
        lr = sslkern.schedules.warmup_cosine(step, total_steps, warmup, a.lr, a.min_lr)
        momentum = sslkern.schedules.linear_anneal(step, total_steps, a.ema_start, a.ema_end)
        for g in opt.param_groups:
            g["lr"] = lr

        images = augment(data.train_images[idx].to(info.device), gen, rows=(info.rank, info.world_size))
        global_loss = float(train_step(a, model, student, teacher, opt, images, gen, momentum, info.rank, info.world_size))
        step += 1
        if not math.isfinite(global_loss):
            raise FloatingPointError(f"loss became {global_loss} at step {step}")
        rate = speed.tick(a.batch_size)
        log.log("train", step, epoch, loss=global_loss, lr=lr, momentum=momentum, img_per_s=rate)
        log.update_bar(loss=global_loss, lr=lr, m=momentum, img_s=round(rate))
        end_of_epoch = step % steps_per_epoch == 0
        if end_of_epoch and a.eval_every and (step // steps_per_epoch) % a.eval_every == 0 and step < last:
            if info.is_main:
                log.log("eval", step, step // steps_per_epoch,
                        teacher_knn=evaluate_encoder(teacher.module, data, probe=False)["knn"],
                        student_knn=evaluate_encoder(student.encoder, data, probe=False)["knn"])
        if (end_of_epoch or step == last) and info.is_main:
            ckpt.save_training_state(ckpt_path, modules=modules, optimizer=opt, generators={"masks": gen},
                                     extra={"step": step, "epoch": step // steps_per_epoch, "total_steps": total_steps,
                                            "config": run_config})
    log.close_bar()
    dist.barrier()
    return data, student, teacher, step, steps_per_epoch


def final_evaluation(a, info, log, data, student, teacher, step, steps_per_epoch):
    """kNN + probe of teacher, student and the same architecture at its random init (seed)."""
    drift = dist.max_abs_diff_across_ranks(torch.cat([p.flatten() for p in teacher.module.parameters()]))
    results = None
    if info.is_main:
        torch.manual_seed(a.seed)
        random_init = build_encoder(a, data.in_chans).to(info.device)  # the student's exact initial weights
        results = {name: evaluate_encoder(m, data, probe=not a.no_probe)
                   for name, m in (("teacher", teacher.module), ("student", student.encoder), ("random", random_init))}
        log.log("final", step, step // steps_per_epoch, teacher_replica_max_diff=drift,
                **{f"{n}_{m}": v for n, r in results.items() for m, v in r.items()})
        kw = timm_kwargs(a, data.in_chans)
        ckpt.export_encoder(os.path.join(a.out, "encoder_teacher.safetensors"), teacher.module, kw, {"alibi": a.alibi})
        ckpt.export_encoder(os.path.join(a.out, "encoder_student.safetensors"), student.encoder, kw, {"alibi": a.alibi})
    results = dist.broadcast_object(results)
    results["teacher_replica_max_diff"] = drift
    return results


class ResumeError(ValueError):
    """--resume found a checkpoint that this run's settings cannot continue."""


RESUMABLE = ("out", "steps", "resume", "quiet", "threads", "eval_every", "no_probe", "backend", "device")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder tree or CIFAR-10 batches dir (default: sklearn digits)")
    p.add_argument("--out", default="runs/data2vec2", help="run directory")
    p.add_argument("--epochs", type=int, default=70)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps in total (0 = all; schedules unchanged)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split over ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors if present")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", choices=("auto",) + sslkern.BACKENDS, help="sslkern backend for every op")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per rank (0 = cores / ranks). Default 1: the default model's ops are tiny, "
                        "and on a shared 2-core machine 2 threads ran 5x slower than 1")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=int, default=16)
    g.add_argument("--patch-size", type=int, default=4)
    g.add_argument("--dim", type=int, default=96)
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--heads", type=int, default=3)
    g.add_argument("--alibi", action="store_true", help="2-D ALiBi attention (sslkern.nn.AlibiAttention)")
    g.add_argument("--decoder-dim", type=int, default=64)
    g.add_argument("--decoder-layers", type=int, default=2)
    g.add_argument("--decoder-groups", type=int, default=16)
    g = p.add_argument_group("method")
    g.add_argument("--mask", choices=("random", "inverse_block"), default="random")
    g.add_argument("--mask-ratio", type=float, default=0.7)
    g.add_argument("--mask-length", type=int, default=3, help="inverse block: block side")
    g.add_argument("--clones", type=int, default=4, help="masks per image (clone batch)")
    g.add_argument("--top-k", type=int, default=4, help="teacher blocks averaged into the targets")
    g.add_argument("--cls-weight", type=float, default=0.1)
    g.add_argument("--noise-std", type=float, default=0.01, help="std of the decoder's masked-slot noise")
    g.add_argument("--ema-start", type=float, default=0.99)
    g.add_argument("--ema-end", type=float, default=0.997)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--eval-every", type=int, default=10, help="kNN every N epochs (0 = only at the end)")
    g.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    a = p.parse_args(argv)
    for name in ("epochs", "batch_size", "image_size", "patch_size", "dim", "depth", "heads", "clones", "top_k",
                 "decoder_dim", "decoder_layers", "decoder_groups"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(a, name)}")
    for name in ("steps", "threads", "warmup_epochs", "eval_every"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} expected >= 0, got {getattr(a, name)}")
    if not 0 < a.mask_ratio < 1:
        p.error(f"--mask-ratio expected in (0, 1), got {a.mask_ratio}")
    if a.image_size % a.patch_size:
        p.error(f"--image-size {a.image_size} expected a multiple of --patch-size {a.patch_size}")
    if a.dim % a.heads:
        p.error(f"--dim {a.dim} expected a multiple of --heads {a.heads}")
    if a.top_k > a.depth:
        p.error(f"--top-k expected <= --depth ({a.depth}), got {a.top_k}")
    if a.dim % a.decoder_groups or a.decoder_dim % a.decoder_groups:
        p.error(f"--decoder-groups {a.decoder_groups} expected to divide --dim {a.dim} and --decoder-dim {a.decoder_dim}")
    if not (0 <= a.ema_start <= 1 and 0 <= a.ema_end <= 1):
        p.error("--ema-start/--ema-end expected in [0, 1]")
    if a.device not in ("cpu", "cuda") and not a.device.startswith("cuda:"):
        p.error(f"--device expected cpu or cuda, got {a.device!r}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but no CUDA device is visible")
    if a.data is not None and not os.path.exists(a.data):
        p.error(f"--data {a.data!r} does not exist (datasets are never downloaded)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.batch_size % world:
        p.error(f"--batch-size {a.batch_size} expected a multiple of the number of processes ({world})")
    return p, a


def main(argv=None):
    parser, a = parse_args(argv)
    info = dist.init_distributed(a.device)
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // info.world_size))
    if info.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    config = {**vars(a), "world_size": info.world_size, "torch": torch.__version__, "sslkern": sslkern.__version__}
    log = RunLogger(a.out, config, is_main=info.is_main, quiet=a.quiet,
                    resume_step=None if not a.resume else ckpt.checkpoint_step(os.path.join(a.out, "checkpoint.safetensors")))
    t0 = time.perf_counter()
    try:
        with sslkern.use_backend(None if a.backend == "auto" else a.backend):
            data, student, teacher, step, spe = train(a, info, log)
            train_s = time.perf_counter() - t0
            results = final_evaluation(a, info, log, data, student, teacher, step, spe)
    except (DataError, ResumeError) as e:
        parser.error(str(e))
    finally:
        dist.cleanup()
    results.update(train_s=train_s, total_s=time.perf_counter() - t0, step=step, out=a.out)
    log.plot()
    row = lambda k: [k, *(f"{results[k][m]:.1f}" if m in results[k] else "-" for m in ("knn", "probe"))]  # noqa: E731
    log.summary(f"data2vec 2.0 on {data.name} — seed {a.seed}, {step} steps, world {info.world_size}, backend {a.backend}",
                [("train time", f"{train_s:.0f} s"), ("total time", f"{results['total_s']:.0f} s"),
                 ("run directory", a.out)],
                [["encoder", "kNN %", "probe %"], row("teacher"), row("student"), row("random")])
    return results


if __name__ == "__main__":
    main()
