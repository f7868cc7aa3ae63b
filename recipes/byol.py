"""BYOL pretraining of a small ViT on sslkern ops (Grill et al. 2020, arXiv:2006.07733).

    python recipes/byol.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/byol.py  # data-parallel; MLP BatchNorm over the global batch

One step, as in BYOL (deepmind-research ``byol/byol_experiment.py``):
  1. views      two augmented views of every image
  2. online     backbone → projector MLP → predictor MLP on both views: p1, p2
  3. target     the EMA target network (backbone + projector, no predictor): z1, z2, no gradient
  4. loss       symmetric negative cosine: (2 − 2·cos(p1, z2)) + (2 − 2·cos(p2, z1)), batch mean
  5. step       AdamW, warm-up + cosine lr
  6. EMA        target ← EMA of the online backbone + projector (``sslkern.nn.EMATeacher``),
                momentum cosine τ0 → 1 (BYOL: 1 − (1 − τ0)(cos(πk/K) + 1)/2, τ0 = 0.98 here)

Deviations for the small default (1,257 digits of 16x16; see docs/recipes/byol.md for what
was tried): AdamW instead of LARS; projector / predictor 96 → 512 → 128 (BYOL: 4096 → 256)
with BatchNorm + ReLU as BYOL; the projector input is the mean of the patch tokens (what the
evaluation uses); crops of area (0.3, 1) with ±10° rotation and no flips (digits are not
mirror-symmetric; RGB data gets flips and the colour pipeline of the loop's views).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.joint import (add_view_arguments, check_view_arguments, encoder, joint_health,
                                 joint_verdict, mlp, positive_int_options, two_views)


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's 2 − 2·cos(p, z) per row, batch mean (z is the target: no gradient)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class BYOL(Method):
    """BYOL: an online network predicts an EMA target network's projection of another view."""

    name, title = "byol", "BYOL"
    defaults = dict(epochs=45, lr=2e-3, weight_decay=0.05, warmup_epochs=5, eval_every=20)
    health = {"embedding_std": "low"}
    presets = {"paper": dict(
        _doc="BYOL on a ViT-B/16 at 224: the optimizer is MoCo v3's ViT recipe (moco-v3 CONFIG.md: AdamW, lr "
             "1.5e-4 x batch / 256, here for batch 4,096, weight decay 0.1, 40 warm-up of 300 epochs), the task is "
             "BYOL's (Grill et al. 2020): projector and predictor 4,096 wide with 256 outputs and BatchNorm, target "
             "EMA 0.996 -> 1, its asymmetric augmentations with crop 0.08-1, CLS token. Not reproduced: BYOL's LARS "
             "(lr 0.2 x batch / 256, weight decay 1.5e-6) on a ResNet-50",
        model="vit_base_patch16_224", image_size=224, batch_size=4096, epochs=300, lr=2.4e-3, min_lr=0.0,
        warmup_epochs=40, weight_decay=0.1, clip_grad=0.0, hidden_dim=4096, out_dim=256, bn=True,
        momentum_target=0.996, pool="cls", crop_scale=(0.08, 1.0), degrees=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--hidden-dim", type=int, default=512, help="projector / predictor MLP width (BYOL: 4096)")
        g.add_argument("--out-dim", type=int, default=128, help="projection size (BYOL: 256)")
        g.add_argument("--no-bn", dest="bn", action="store_false", help="no BatchNorm in the MLPs")
        g.add_argument("--momentum-target", type=float, default=0.98, help="EMA start τ0, cosine to 1 (BYOL: 0.996)")
        add_view_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        positive_int_options(a, error, ("hidden_dim", "out_dim"))
        if not 0 <= a.momentum_target <= 1:
            error(f"--momentum-target expected in [0, 1], got {a.momentum_target}")
        check_view_arguments(a, error)

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        projector = mlp(a.dim, a.hidden_dim, a.out_dim, bn=a.bn)
        self.online = encoder(build_vit(a, data.channels), projector, a.pool)
        self.predictor = mlp(a.out_dim, a.hidden_dim, a.out_dim, bn=a.bn)
        self.target = sslkern.nn.EMATeacher(self.online)  # backbone + projector, frozen, EMA weights
        self.views = two_views(a, data)

    def schedule(self, ctx):
        return {"momentum": sslkern.schedules.cosine_schedule(ctx.step, ctx.total_steps, self.a.momentum_target, 1.0)}

    def ema_pairs(self):
        return [(self.target, self.online)]

    def encoders(self):
        return {"teacher": self.target.module.backbone, "student": self.online.backbone}

    def forward(self, images, ctx):
        views = ctx.views(images, self.views)                                      # 1. two views
        z_online = self.online(views)                                            # 2. online (2B, out)
        p1, p2 = self.predictor(z_online).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target(views).chunk(2)                                 # 3. target
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)                 # 4. symmetric loss
        return loss, joint_health(z_online)

    def verdict(self, health):
        return joint_verdict(health)


if __name__ == "__main__":
    run(BYOL)
