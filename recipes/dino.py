"""DINO pretraining of a small ViT on sslkern ops (Caron et al. 2021, arXiv:2104.14294).

    python recipes/dino.py                      # digits, 16x16, ~2-3 min on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/dino.py # data-parallel; head BatchNorm over the global batch

One step, as in dino ``main_dino.py``:
  1. views     2 global crops at the image size + N local crops at half of it (multi-crop)
  2. teacher   the EMA teacher (backbone + head) encodes the global crops
  3. student   the student encodes every crop (one backbone pass per resolution) → DINO head:
               MLP → L2-normalised bottleneck → weight-normalised prototypes (gain fixed)
  4. loss      cross-entropy between the centred, sharpened teacher and the student over all
               cross-view pairs, fused with the center update (``sslkern.nn.DINOLoss``) and with
               the heads' prototype layers (``DINOLoss`` given the layers: no (rows, K) logits are stored;
               ``--unfused-head`` materialises them)
  5. step      AdamW, warm-up + cosine lr, cosine weight decay, per-parameter clipping,
               the last layer frozen during the first epoch
  6. EMA       teacher ← EMA of the student, momentum cosine m0 → 1

Deviations for the small default (1,257 digits of 16x16; see docs/recipes/dino.md for what
was tried): the head input is the mean of the patch tokens (+9 kNN points over CLS here),
BatchNorm in the head MLP (without it the teacher goes uniform within ~20 steps), K = 4,096
prototypes, a sharper teacher (τt 0.02 → 0.03) and a faster EMA start (m0 = 0.99) for a short
(270-step) run; crop scales (0.5, 1) / (0.1, 0.25) instead of (0.4, 1) / (0.05, 0.4) since a
5 % crop of a 16-pixel digit is ~3 pixels wide; ±10° rotation and no flips (digits are not
mirror-symmetric; RGB data gets flips and DINO's colour ops).
"""
from __future__ import annotations

import torch

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.distillation import (add_distillation_arguments, check_distillation_arguments,
                                        distillation_schedule, multicrop_views)
from sslkern.train.health import distillation_health, distillation_verdict


class DINO(Method):
    """DINO: self-distillation with no labels — a student matches an EMA teacher across crops."""

    name, title = "dino", "DINO"
    defaults = dict(epochs=30, lr=1e-3, weight_decay=0.04, weight_decay_end=0.2, warmup_epochs=5, clip_grad=3.0,
                    clip_mode="per-param", eval_every=20, warmup_teacher_temp_epochs=11)  # τt warm-up: 3/8 of the run
    health = {"teacher_entropy_frac": "high", "batch_entropy_frac": "low", "kl": "low"}
    presets = {"paper": dict(
        _doc="DINO ViT-S/16 on ImageNet (Caron et al. 2021, dino main_dino.py and README): AdamW, lr 0.0005 x "
             "batch / 256 (here for batch 1,024; scale it with --batch-size), 10 warm-up epochs to a cosine, "
             "stochastic depth 0.1",
        model="vit_small_patch16_224", drop_path=0.1, image_size=224, batch_size=1024, epochs=100, lr=0.002, min_lr=1e-6,
        warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, clip_mode="per-param",
        out_dim=65536, hidden_dim=2048, bottleneck_dim=256, head_layers=3, bn_in_head=False, pool="cls",
        local_crops=10, local_size=96, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), degrees=0.0,
        student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30,
        center_momentum=0.9, momentum_teacher=0.996, freeze_last_layer=1, eval_every=0)}

    add_arguments = staticmethod(add_distillation_arguments)
    check_arguments = staticmethod(check_distillation_arguments)

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        backbone = build_vit(a, data.channels, dynamic_img_size=True)  # global and local crop sizes
        head = sslkern.nn.DINOHead(a.dim, a.out_dim, use_bn=a.bn_in_head, norm_last_layer=a.norm_last_layer,
                                   nlayers=a.head_layers, hidden_dim=a.hidden_dim, bottleneck_dim=a.bottleneck_dim)
        self.student = sslkern.nn.MultiCropWrapper(backbone, head, a.pool)
        self.teacher = sslkern.nn.EMATeacher(self.student)  # same architecture, frozen, EMA weights
        self.loss = sslkern.nn.DINOLoss(a.out_dim, 2 + a.local_crops, a.warmup_teacher_temp, a.teacher_temp,
                                        min(a.warmup_teacher_temp_epochs, a.epochs), a.epochs, a.student_temp,
                                        a.center_momentum, teacher_mode=a.teacher)
        self.views = multicrop_views(a, data)

    def schedule(self, ctx):
        return distillation_schedule(self.a, ctx, self.loss)

    def frozen(self):
        return {"student.head.last_layer.": self.a.freeze_last_layer}

    def ema_pairs(self):
        return [(self.teacher, self.student)]

    def encoders(self):
        return {"teacher": self.teacher.module.backbone, "student": self.student.backbone}

    def forward(self, images, ctx):
        crops = ctx.views(images, self.views)                                                # 1. views
        global_crops, local_crops = crops[:2], crops[2:]
        head, t_head, center = self.student.head, self.teacher.module.head, self.loss.center.clone()
        with torch.no_grad():
            zt = t_head.bottleneck(self.teacher.module.features(global_crops))              # 2. teacher (2B, Db)
        zs = head.bottleneck(self.student.features(global_crops + local_crops))              # 3. student (V·B, Db)
        if self.a.fused_head and self.a.teacher == "center":                                 # 4. loss + center:
            loss = self.loss(zs, zt, ctx.epoch, head.last_layer, t_head.last_layer)      # no (V·B, K)
        else:
            loss = self.loss(head.last_layer(zs), t_head.last_layer(zt), ctx.epoch)
        with torch.no_grad():
            teacher_out = t_head.last_layer(zt)                                              # (2B, K): health only
        return loss, distillation_health(teacher_out, center, ctx.teacher_temp, loss, mode=self.a.teacher)

    def verdict(self, health):
        return distillation_verdict(health)


if __name__ == "__main__":
    run(DINO)
