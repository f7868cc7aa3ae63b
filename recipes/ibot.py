"""iBOT / DINOv2-style pretraining of a small ViT on sslkern ops (Zhou et al. 2022, arXiv:2111.07832;
Oquab et al. 2023, arXiv:2304.07193), following dinov2 ``dinov2/train/ssl_meta_arch.py``.

    python recipes/ibot.py                          # digits, 16x16, a few minutes on 2 CPU cores
    python recipes/ibot.py --teacher sinkhorn       # DINOv2's Sinkhorn-Knopp teacher
    torchrun --nproc_per_node=2 recipes/ibot.py

One step:
  1. views     2 global + N local crops (multi-crop, as DINO)
  2. masks     block masks (``sslkern.masks.block_mask``) on a fraction of the global crops
               (dinov2 collate: probability 0.5, ratios spread over (0.1, 0.5))
  3. teacher   the EMA teacher encodes the unmasked global crops: image head on the pooled
               tokens, patch head on the patch tokens at the masked positions
  4. student   global crops with a learned mask token at masked patches, and the local crops
  5. loss      DINO loss on the image head (``sslkern.nn.DINOLoss``) + iBOT masked patch loss
               (``sslkern.nn.IBOTPatchLoss``, per-image weights) + KoLeo on the student's
               global-crop features (``sslkern.koleo_loss``, weight 0.1); both losses fused with
               the heads' prototype layers (the losses given the layers; ``--unfused-head``: logits)
  6. step, EMA as DINO (cosine momentum)

Deviations for the small default (see docs/recipes/ibot.md): the DINO settings of
recipes/dino.py (mean-pooled image-head input, BatchNorm in the heads, K = 4,096, τt 0.02 →
0.03, m0 = 0.99); separate image and patch heads (dinov2's ``ibot.separate_head``) so each
head's BatchNorm sees one kind of input; the DINO term is DINO's average over all cross-view
pairs (dinov2 weighs global and local pairs separately). On the 4x4 token grid a block
covers 4-8 of 16 patches.
"""
from __future__ import annotations

import torch
from torch import nn

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.distillation import (add_distillation_arguments, check_distillation_arguments,
                                        distillation_schedule, multicrop_views)
from sslkern.train.health import distillation_health, distillation_verdict


class MaskedStudent(nn.Module):
    """Backbone + image head + patch head; ``mask_token`` replaces the embeddings of masked patches."""

    def __init__(self, backbone, head, patch_head, pool):
        super().__init__()
        self.image = sslkern.nn.MultiCropWrapper(backbone, head, pool)
        self.patch_head = patch_head
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))

    def tokens(self, images, masks=None):
        """dinov2 ``prepare_tokens_with_masks`` + blocks: (B, 1+N, D) after the final norm."""
        return sslkern.nn.encode_with_mask_token(self.image.backbone, images, masks, self.mask_token)


def block_masks(a, grid, ctx):
    """Masks of the two global crops of every image: (2·B, N) bool, crop-major like the crops."""
    def two_per_image(batch, generator):
        m = sslkern.masks.block_mask(2 * batch, grid, tuple(a.mask_ratio), mask_probability=a.mask_probability,
                                     generator=generator).mask
        return m.view(batch, 2, -1)
    return ctx.per_sample(two_per_image).transpose(0, 1).flatten(0, 1)


class IBOT(Method):
    """iBOT / DINOv2: DINO's image-level self-distillation plus masked patch-token distillation."""

    name, title = "ibot", "iBOT"
    defaults = dict(epochs=25, lr=1e-3, weight_decay=0.04, weight_decay_end=0.2, warmup_epochs=5, clip_grad=3.0,
                    clip_mode="per-param", eval_every=20, warmup_teacher_temp_epochs=9)  # τt warm-up: 3/8 of the run
    health = {"teacher_entropy_frac": "high", "batch_entropy_frac": "low", "kl": "low",
              "patch_teacher_entropy_frac": "high", "patch_batch_entropy_frac": "low", "patch_kl": "low"}
    presets = {"paper": dict(
        _doc="iBOT ViT-S/16 on ImageNet, 800 epochs (ibot README.md ViT-S/16 command, main_ibot.py): AdamW, lr "
             "5e-4 x batch / 256 (here for batch 1,024; scale it with --batch-size), 10 warm-up epochs, weight decay "
             "0.04 -> 0.4, 8,192 prototypes without BatchNorm or weight-norm gain fixing, teacher temperature 0.04 "
             "-> 0.07 over 30 epochs for both heads, 10 local crops, half of the global crops block-masked at "
             "0.1-0.5, no KoLeo. Not reproduced: the head shared by the CLS and patch tokens (separate heads here)",
        model="vit_small_patch16_224", drop_path=0.1, image_size=224, batch_size=1024, epochs=800, lr=0.002,
        min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, clip_mode="per-param",
        out_dim=8192, hidden_dim=2048, bottleneck_dim=256, head_layers=3, bn_in_head=False, norm_last_layer=False,
        pool="cls", local_crops=10, local_size=96, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), degrees=0.0,
        student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30,
        center_momentum=0.9, momentum_teacher=0.996, freeze_last_layer=1, mask_probability=0.5,
        mask_ratio=(0.1, 0.5), ibot_weight=1.0, koleo_weight=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        add_distillation_arguments(g)
        g.add_argument("--mask-probability", type=float, default=0.5, help="share of global crops masked")
        g.add_argument("--mask-ratio", type=float, nargs=2, default=(0.1, 0.5), help="masked share range")
        g.add_argument("--ibot-weight", type=float, default=1.0)
        g.add_argument("--koleo-weight", type=float, default=0.1)

    @staticmethod
    def check_arguments(a, error):
        check_distillation_arguments(a, error)
        if not 0 < a.mask_probability <= 1:
            error(f"--mask-probability expected in (0, 1], got {a.mask_probability}")
        if not 0 <= a.mask_ratio[0] <= a.mask_ratio[1] < 1:
            error(f"--mask-ratio expected 0 <= lo <= hi < 1, got {a.mask_ratio[0]} {a.mask_ratio[1]}")

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        backbone = build_vit(a, data.channels, dynamic_img_size=True)
        self.grid = tuple(backbone.patch_embed.grid_size)
        heads = [sslkern.nn.DINOHead(a.dim, a.out_dim, use_bn=a.bn_in_head, norm_last_layer=a.norm_last_layer,
                                     nlayers=a.head_layers, hidden_dim=a.hidden_dim, bottleneck_dim=a.bottleneck_dim)
                 for _ in range(2)]
        self.student = MaskedStudent(backbone, *heads, a.pool)
        self.teacher = sslkern.nn.EMATeacher(self.student)
        self.dino_loss = sslkern.nn.DINOLoss(a.out_dim, 2 + a.local_crops, a.warmup_teacher_temp, a.teacher_temp,
                                             min(a.warmup_teacher_temp_epochs, a.epochs), a.epochs, a.student_temp,
                                             a.center_momentum, teacher_mode=a.teacher)
        self.ibot_loss = sslkern.nn.IBOTPatchLoss(a.out_dim, a.student_temp, a.teacher_temp, a.center_momentum,
                                                  teacher_mode=a.teacher)
        self.views = multicrop_views(a, data)

    def schedule(self, ctx):
        return distillation_schedule(self.a, ctx, self.dino_loss)

    def frozen(self):
        return {"student.image.head.last_layer.": self.a.freeze_last_layer,
                "student.patch_head.last_layer.": self.a.freeze_last_layer}

    def ema_pairs(self):
        return [(self.teacher, self.student)]

    def encoders(self):
        return {"teacher": self.teacher.module.image.backbone, "student": self.student.image.backbone}

    def forward(self, images, ctx):
        a, tt = self.a, ctx.teacher_temp
        crops = ctx.views(images, self.views)                                                # 1. views
        global_crops, local_crops = crops[:2], crops[2:]
        masks = block_masks(a, self.grid, ctx)                                               # 2. masks (2B, N)
        g = torch.cat(global_crops)
        with torch.no_grad():                                                                # 3. teacher
            t_tok = self.teacher.module.tokens(g)
            zt_img = self.teacher.module.image.head.bottleneck(self.teacher.module.image.pooled(t_tok))
            zt_patch = self.teacher.module.patch_head.bottleneck(t_tok[:, 1:][masks])
        s_tok = self.student.tokens(g, masks)                                                # 4. student
        zs_img = self.student.image.head.bottleneck(torch.cat([self.student.image.pooled(s_tok),
                                                               self.student.image.features(local_crops)]))
        zs_patch = self.student.patch_head.bottleneck(s_tok[:, 1:][masks])
        centers = self.dino_loss.center.clone(), self.ibot_loss.center.clone()
        layers = (self.student.image.head.last_layer, self.teacher.module.image.head.last_layer,
                  self.student.patch_head.last_layer, self.teacher.module.patch_head.last_layer)
        if a.fused_head and a.teacher == "center":                                           # 5. losses, fused
            dino = self.dino_loss(zs_img, zt_img, ctx.epoch, layers[0], layers[1])           # with the
            ibot = self.ibot_loss(zs_patch, zt_patch, masks, teacher_temp=tt,                # prototypes
                                  student_layer=layers[2], teacher_layer=layers[3])
        else:
            dino = self.dino_loss(layers[0](zs_img), layers[1](zt_img), ctx.epoch)
            ibot = self.ibot_loss(layers[2](zs_patch), layers[3](zt_patch), masks, teacher_temp=tt)
        with torch.no_grad():                                                                # health only
            t_img, t_patch = layers[1](zt_img), layers[3](zt_patch)
        koleo = sum(sslkern.koleo_loss(f) for f in self.student.image.pooled(s_tok).chunk(2))
        loss = dino + a.ibot_weight * ibot + a.koleo_weight * koleo
        n = masks.sum(1)
        w = torch.repeat_interleave(1.0 / n.clamp(min=1).float(), n)                         # iBOT's token weights
        return loss, {"dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo": koleo.detach(),
                      "masked_share": masks.float().mean(),
                      **distillation_health(t_img, centers[0], tt, dino, mode=a.teacher),
                      **distillation_health(t_patch, centers[1], tt, ibot * masks.shape[0] / w.sum(), mode=a.teacher,
                                            weights=w, prefix="patch_")}

    def verdict(self, health):
        return distillation_verdict(health, ("", "patch_"))


if __name__ == "__main__":
    run(IBOT)
