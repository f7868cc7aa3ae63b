"""Options shared by the self-distillation recipes (DINO, iBOT): head, crops, temperatures, EMA.

Defaults are those tuned for the default data (digits 16x16, see docs/recipes/dino.md);
dino's own defaults are given in each help text.
"""
from __future__ import annotations

import sslkern
from sslkern.train import views


def add_distillation_arguments(g, out_dim=4096):
    """Head, temperature and EMA options shared by DINO and iBOT."""
    g.add_argument("--out-dim", type=int, default=out_dim, help="K, number of prototypes (dino: 65536)")
    g.add_argument("--hidden-dim", type=int, default=256, help="head MLP width (dino: 2048)")
    g.add_argument("--bottleneck-dim", type=int, default=64, help="(dino: 256)")
    g.add_argument("--head-layers", type=int, default=3)
    g.add_argument("--no-bn-in-head", dest="bn_in_head", action="store_false",
                   help="no BatchNorm in the head MLP (dino's default; here the teacher then goes uniform)")
    g.add_argument("--no-norm-last-layer", dest="norm_last_layer", action="store_false",
                   help="learn the prototypes' weight-norm gain")
    g.add_argument("--pool", choices=("mean", "cls"), default="mean", help="head input: mean of patch tokens or CLS (dino: CLS)")
    g.add_argument("--local-crops", type=int, default=4, help="(dino: 8)")
    g.add_argument("--local-size", type=int, default=0, help="local crop side (0 = image size / 2)")
    g.add_argument("--global-scale", type=float, nargs=2, default=(0.5, 1.0), help="crop area range (dino: 0.4 1)")
    g.add_argument("--local-scale", type=float, nargs=2, default=(0.1, 0.25), help="(dino: 0.05 0.4)")
    g.add_argument("--degrees", type=float, default=10.0, help="random rotation of every crop")
    g.add_argument("--inverted-blur", action="store_true",
                   help="dinov2's / dinov3's blur probabilities for the two global crops instead of dino's")
    g.add_argument("--student-temp", type=float, default=0.1)
    g.add_argument("--teacher-temp", type=float, default=0.03, help="τt after warm-up (dino: 0.04)")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.02, help="(dino: 0.04)")
    g.add_argument("--warmup-teacher-temp-epochs", type=int, default=30, help="linear τt warm-up (dino: 30)")
    g.add_argument("--center-momentum", type=float, default=0.9)
    g.add_argument("--teacher", choices=("center", "sinkhorn"), default="center",
                   help="teacher probabilities: DINO centering or DINOv2 Sinkhorn-Knopp")
    g.add_argument("--momentum-teacher", type=float, default=0.99, help="EMA start, cosine to 1 (dino: 0.996)")
    g.add_argument("--freeze-last-layer", type=int, default=1, help="epochs with the prototypes frozen")
    g.add_argument("--unfused-head", dest="fused_head", action="store_false",
                   help="materialise the prototype logits (head → loss); default: the fused prototype loss "
                        "(sslkern.prototype_loss, no (rows, K) logits; the Sinkhorn teacher always uses the logits)")


def check_distillation_arguments(a, error):
    for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
        if getattr(a, name) <= 0:
            error(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(a, name)}")
    if a.local_crops < 0:
        error(f"--local-crops expected >= 0, got {a.local_crops}")
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        if getattr(a, name) <= 0:
            error(f"--{name.replace('_', '-')} expected > 0, got {getattr(a, name)}")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(a, name)
        if not 0 < lo <= hi <= 1:
            error(f"--{name.replace('_', '-')} expected 0 < lo <= hi <= 1, got {lo} {hi}")
    if not 0 <= a.center_momentum <= 1 or not 0 <= a.momentum_teacher <= 1:
        error("--center-momentum/--momentum-teacher expected in [0, 1]")
    a.local_size = a.local_size or a.image_size // 2
    if a.local_size % a.patch_size:
        error(f"--local-size {a.local_size} expected a multiple of --patch-size {a.patch_size}")


def multicrop_views(a, data) -> list:
    """2 global crops at the image size + ``--local-crops`` at ``--local-size`` (DINO's colour
    pipeline for RGB data; ``--inverted-blur``: dinov2's blur probabilities)."""
    return views.multicrop(a, data, inverted_blur=a.inverted_blur)


def distillation_schedule(a, ctx, dino_loss) -> dict:
    """Teacher momentum (cosine ``--momentum-teacher`` → 1) and the DINO loss's teacher temperature."""
    return {"momentum": sslkern.schedules.cosine_schedule(ctx.step, ctx.total_steps, a.momentum_teacher, 1.0),
            "teacher_temp": float(dino_loss.teacher_temp_schedule[ctx.epoch])}
