"""Barlow Twins pretraining of a small ViT on sslkern ops (Zbontar et al. 2021, arXiv:2103.03230).

    python recipes/barlow_twins.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/barlow_twins.py  # data-parallel; exact gradients (see below)

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
pipeline (view a: blur p 1.0, no solarisation; view b: blur p 0.1, solarisation p 0.2); the
grey digits get none of it.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sslkern  # noqa: E402
from sslkern.train import Method, build_vit, run  # noqa: E402
from sslkern.train.joint import (add_view_arguments, check_view_arguments, encoder, joint_health,  # noqa: E402
                                 mlp, positive_int_options, redundancy_verdict, two_views)


class BarlowTwins(Method):
    """Barlow Twins: make the cross-correlation of two views' embeddings the identity."""

    name, title = "barlow_twins", "Barlow Twins"
    defaults = dict(epochs=35, lr=1e-3, weight_decay=0.05, warmup_epochs=5, eval_every=20)
    health = {"embedding_std": "low", "mean_diag": "low", "off_diag_ratio": "high"}

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
        self.a, self.mean, self.std = a, data.mean, data.std
        backbone = build_vit(a, data.in_chans)
        projector = mlp(a.dim, a.hidden_dim, a.out_dim, 3, last_bias=False)   # Linear-BN-ReLU ×2, Linear
        self.encoder = encoder(backbone, projector, a.pool)
        self.loss = sslkern.nn.BarlowTwinsLoss(a.lambd, statistics=a.statistics)
        self.augment = two_views(a)

    def encoders(self):
        return {"student": self.encoder.backbone}

    def views(self, images, ctx):
        """The two asymmetric views of every image (colour ops on RGB data only: view a blurred
        with p 1.0, view b with p 0.1 and solarised with p 0.2 — the paper's ``Transform``)."""
        (y_a, y_b), _ = self.augment(images, ctx.generator, mean=self.mean, std=self.std,
                                     rows=(ctx.rank, ctx.world_size))
        return [y_a, y_b]

    def forward(self, images, ctx):
        y = self.views(images, ctx)                                             # 1. views
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
