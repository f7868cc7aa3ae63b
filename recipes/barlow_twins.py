"""Barlow Twins pretraining of a small ViT on sslkern ops (Zbontar et al. 2021, arXiv:2103.03230).

    python recipes/barlow_twins.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/barlow_twins.py  # data-parallel; exact gradients (see below)
    python recipes/barlow_twins.py --data IMAGENET --preset paper   # the paper's settings on a ViT-S/16

One step, as the paper's Algorithm 1 (facebookresearch/barlowtwins ``main.py``):
  1. views      y_a, y_b = two asymmetric augmentations of every image
  2. encoder    z_a, z_b = projector(backbone(y)), projector Linear-BN-ReLU ×2 → Linear (no biases)
  3. normalise  ẑ = (z − mean_batch) / std_batch per dimension (BatchNorm without affine)
  4. cross-corr C = ẑ_aᵀ ẑ_b / N                                   (D × D in the paper's code)
  5. loss       Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²
  6. step       AdamW, warm-up + cosine lr
Steps 3–5 are one call, ``sslkern.nn.BarlowTwinsLoss`` → ``sslkern.cross_correlation_loss``: the
same loss and gradients from (N × N) Gram matrices, no D × D matrix. Under torchrun the
statistics and C span the global batch (the paper's SyncBatchNorm + all-reduce) and the
gradients are exact; the paper's code gives 1/world of them (its all-reduce of C is not
differentiated).

Deviations for the small default (1,257 digits of 16x16; see docs/recipes/barlow_twins.md for
what was tried): AdamW instead of LARS; projector 96 → 512 → 512 → 512 (paper: 8192 ×3) with
the paper's λ = 0.0051; 35 epochs (315 steps); the projector input is the mean of the patch
tokens; crops of area (0.3, 1) with ±10° rotation and no flips (digits are not
mirror-symmetric). On RGB data the views get flips and the paper's asymmetric colour
pipeline (``sslkern.train.views.two_views``: view a blur p 1.0, no solarisation; view b blur
p 0.1, solarisation p 0.2); the grey digits get none of it.

``--preset paper``: the paper's ImageNet run (a ResNet-50) mapped onto a ViT-S/16 at 224
(``PRESETS``'s comment says which settings are the paper's and which are the ViT adaptation).
"""
from __future__ import annotations

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.joint import (add_view_arguments, check_view_arguments, encoder, joint_health,
                                 mlp, positive_int_options, redundancy_verdict, two_views)

# Zbontar et al. 2021, section 4 and facebookresearch/barlowtwins main.py. The paper's: 1000 epochs,
# batch 2048, λ = 0.0051, projector 8192-8192-8192 (Linear-BN-ReLU ×2, Linear, no biases),
# 10 warm-up epochs then cosine to 0.001× the peak, two 224-pixel views with crops (0.08, 1),
# flips and its asymmetric colour pipeline. Not reproducible here: LARS (lr 0.2 weights / 0.0048
# biases × batch/256, weight decay 1.5e-6 in the paper, 1e-6 in main.py, biases and norms excluded
# from decay and adaptation); the loop trains with AdamW. ViT adaptation: ResNet-50 → ViT-S/16
# (--model vit_small_patch16_224), its global average pool → the mean of the patch tokens, and
# AdamW at DINO's ViT-S rule lr 5e-4 × batch/256 with weight decay 0.04 → 0.4 (dino main_dino.py).
PRESETS = {
    "paper": {"model": "vit_small_patch16_224", "image_size": 224, "epochs": 1000, "batch_size": 2048,
              "lr": 5e-4 * 2048 / 256, "min_lr": 5e-4 * 2048 / 256 * 1e-3, "warmup_epochs": 10,
              "weight_decay": 0.04, "weight_decay_end": 0.4, "hidden_dim": 8192, "out_dim": 8192, "lambd": 0.0051,
              "crop_scale": (0.08, 1.0), "degrees": 0.0, "pool": "mean",
              "_doc": "Barlow Twins ImageNet (Zbontar et al. 2021 sec. 4, barlowtwins main.py: 1000 epochs, batch "
                      "2048, lambda 0.0051, projector 8192x3, 10 warm-up epochs) on ViT-S/16 with AdamW instead of "
                      "LARS (lr 0.2 / 0.0048 x B/256, wd 1.5e-6)"},
}


class BarlowTwins(Method):
    """Barlow Twins: make the cross-correlation of two views' embeddings the identity."""

    name, title = "barlow_twins", "Barlow Twins"
    defaults = dict(epochs=35, lr=1e-3, weight_decay=0.05, warmup_epochs=5, eval_every=20)
    health = {"embedding_std": "low", "mean_diag": "low", "off_diag_ratio": "high"}
    presets = PRESETS

    @staticmethod
    def add_arguments(g):
        g.add_argument("--hidden-dim", type=int, default=512, help="projector width (paper: 8192)")
        g.add_argument("--out-dim", type=int, default=512, help="D, projection size (paper: 8192)")
        g.add_argument("--lambd", type=float, default=0.0051, help="off-diagonal weight λ (paper: 0.0051)")
        g.add_argument("--statistics", choices=("global", "local"), default="global",
                       help="standardise over the global batch (paper) or each rank's rows (lightly)")
        add_view_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        positive_int_options(a, error, ("hidden_dim", "out_dim"))
        if a.lambd < 0:
            error(f"--lambd expected >= 0, got {a.lambd}")
        check_view_arguments(a, error)

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        backbone = build_vit(a, data.channels)
        projector = mlp(a.dim, a.hidden_dim, a.out_dim, 3, last_bias=False)   # Linear-BN-ReLU ×2, Linear
        self.encoder = encoder(backbone, projector, a.pool)
        self.loss = sslkern.nn.BarlowTwinsLoss(a.lambd, statistics=a.statistics)
        # the paper's Transform / Transform_prime on RGB data: view a blurred with p 1.0, view b
        # with p 0.1 and solarised with p 0.2
        self.views = two_views(a, data)

    def encoders(self):
        return {"student": self.encoder.backbone}

    def forward(self, images, ctx):
        y = ctx.views(images, self.views)                                       # 1. views
        z = self.encoder(y)                                                     # 2. encoder (2B, D)
        z_a, z_b = z.chunk(2)
        loss, stats = self.loss(z_a, z_b, return_stats=True)                   # 3-5. standardise, C, loss
        health = {**joint_health(z), "mean_diag": stats["mean_diag"], "off_diag": stats["off_diag"]}
        if float(stats["off_diag_floor"]) > 0:  # the rank floor exists while D > N − 1
            health["off_diag_ratio"] = stats["off_diag"] / stats["off_diag_floor"]
        return loss, health

    def verdict(self, health):
        return redundancy_verdict(health)


if __name__ == "__main__":
    run(BarlowTwins)
