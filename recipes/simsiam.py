"""SimSiam pretraining of a small ViT on sslkern ops (Chen & He 2021, arXiv:2011.10566).

    python recipes/simsiam.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/simsiam.py  # data-parallel; MLP BatchNorm over the global batch

One step, as in simsiam ``simsiam/builder.py``:
  1. views      two augmented views of every image
  2. encoder    backbone → projector MLP (3 layers, BatchNorm, BatchNorm without affine on the
                output) on both views: z1, z2
  3. predictor  bottleneck MLP (out → hidden/4 → out, BatchNorm + ReLU): p1, p2
  4. loss       symmetric negative cosine with a stop-gradient on the targets:
                −½·cos(p1, sg(z2)) − ½·cos(p2, sg(z1)), batch mean — no EMA, no negatives
  5. step       AdamW, warm-up + cosine lr

Deviations for the small default (1,257 digits of 16x16; see docs/recipes/simsiam.md for what
was tried): AdamW instead of SGD, and the predictor follows the lr schedule (SimSiam keeps
its lr fixed); projector 96 → 512 → 512 → 128, predictor 128 → 128 → 128 (SimSiam: 2048,
bottleneck 512); the projector input is the mean of the patch tokens; crops of area (0.3, 1)
with ±10° rotation and no flips (RGB data gets flips and the colour pipeline).
"""
from __future__ import annotations

import torch.nn.functional as F

from sslkern.train import Method, build_vit, run
from sslkern.train.joint import (add_view_arguments, check_view_arguments, encoder, joint_health,
                                 joint_verdict, mlp, positive_int_options, two_views)


def negative_cosine(p, z):
    """SimSiam's D(p, z) = −cos(p, sg(z)), batch mean."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


class SimSiam(Method):
    """SimSiam: a Siamese network whose one branch predicts the other, with stop-gradient."""

    name, title = "simsiam", "SimSiam"
    defaults = dict(epochs=80, lr=1e-3, weight_decay=0.05, warmup_epochs=5, eval_every=20)
    health = {"embedding_std": "low"}
    presets = {"paper": dict(
        _doc="SimSiam on a ViT-B/16 at 224: the optimizer is MoCo v3's ViT recipe (moco-v3 CONFIG.md: AdamW, lr "
             "1.5e-4 x batch / 256, weight decay 0.1, 40 warm-up of 300 epochs) at SimSiam's batch 512, the task is "
             "SimSiam's (Chen & He 2021, simsiam builder.py): 3-layer projector 2,048 wide with 2,048 outputs, "
             "predictor bottleneck 512, crop 0.2-1, CLS token. Not reproduced: SGD (lr 0.05 x batch / 256, weight "
             "decay 1e-4) on a ResNet-50 with the predictor's lr fixed, and MoCo v2's symmetric augmentations (the "
             "recipe renders BYOL's asymmetric ones)",
        model="vit_base_patch16_224", image_size=224, batch_size=512, epochs=300, lr=3e-4, min_lr=0.0,
        warmup_epochs=40, weight_decay=0.1, clip_grad=0.0, hidden_dim=2048, out_dim=2048, pred_dim=512,
        proj_layers=3, pool="cls", crop_scale=(0.2, 1.0), degrees=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--hidden-dim", type=int, default=512, help="projector MLP width (SimSiam: 2048)")
        g.add_argument("--out-dim", type=int, default=128, help="projection size (SimSiam: 2048)")
        g.add_argument("--pred-dim", type=int, default=128, help="predictor bottleneck (SimSiam: 512)")
        g.add_argument("--proj-layers", type=int, default=3, help="(SimSiam: 3)")
        add_view_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        positive_int_options(a, error, ("hidden_dim", "out_dim", "pred_dim", "proj_layers"))
        check_view_arguments(a, error)

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        projector = mlp(a.dim, a.hidden_dim, a.out_dim, a.proj_layers, last_bn=True)
        self.encoder = encoder(build_vit(a, data.channels), projector, a.pool)
        self.predictor = mlp(a.out_dim, a.pred_dim, a.out_dim)
        self.views = two_views(a, data)

    def encoders(self):
        return {"student": self.encoder.backbone}

    def forward(self, images, ctx):
        views = ctx.views(images, self.views)                                      # 1. two views
        z = self.encoder(views)                                                  # 2. encoder (2B, out)
        p1, p2 = self.predictor(z).chunk(2)                                      # 3. predictor
        z1, z2 = z.chunk(2)
        loss = 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)     # 4. stop-gradient loss
        return loss, joint_health(z)

    def verdict(self, health):
        return joint_verdict(health)


if __name__ == "__main__":
    run(SimSiam)
