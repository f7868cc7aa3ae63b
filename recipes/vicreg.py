"""VICReg pretraining of a small ViT on sslkern ops (Bardes et al. 2022, arXiv:2105.04906).

    python recipes/vicreg.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/vicreg.py  # data-parallel; variance / covariance over the global batch

One step, as the paper's Algorithm 1 (facebookresearch/vicreg ``main_vicreg.py``):
  1. views       x, y = two asymmetric augmentations of every image
  2. expander    z_a, z_b = expander(backbone(x)), expander Linear-BN-ReLU ×2 → Linear
  3. invariance  sim = MSE(z_a, z_b)
  4. variance    std = √(var + 1e-4) per dimension, std_loss = mean(relu(1 − std_a))/2 + mean(relu(1 − std_b))/2
  5. covariance  cov = Zᵀ Z / (N − 1) of the centred z, cov_loss = Σ_{i≠j} cov_a²/D + Σ_{i≠j} cov_b²/D
  6. loss        25·sim + 25·std_loss + 1·cov_loss
  7. step        AdamW, warm-up + cosine lr
Steps 3–6 are one call, ``sslkern.nn.VICRegLoss`` → ``sslkern.vicreg_loss``: the same loss and
gradients with the covariance terms from (N × N) Gram matrices, no D × D matrix. Under
torchrun the invariance is each rank's own rows and the variance / covariance span the
gathered global batch (the paper's ``FullGatherLayer``), with exact gradients.

Deviations for the small default (1,257 digits of 16x16; see docs/recipes/vicreg.md for what
was tried): AdamW instead of LARS; expander 96 → 512 → 512 → 512 (paper: 8192 ×3); 35 epochs
(315 steps); the expander input is the mean of the patch tokens; crops of area (0.3, 1) with
±10° rotation and no flips (digits are not mirror-symmetric). On RGB data the views get flips
and the paper's asymmetric colour pipeline (view x: blur p 1.0, no solarisation; view y: blur
p 0.1, solarisation p 0.2); the grey digits get none of it.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sslkern  # noqa: E402
from sslkern.train import Method, build_vit, run  # noqa: E402
from sslkern.train.joint import (add_view_arguments, check_view_arguments, encoder, joint_health,  # noqa: E402
                                 mlp, positive_int_options, redundancy_verdict, two_views)


class VICReg(Method):
    """VICReg: invariance between views, variance kept above 1 and covariance driven to 0 per dimension."""

    name, title = "vicreg", "VICReg"
    defaults = dict(epochs=35, lr=1e-3, weight_decay=0.05, warmup_epochs=5, eval_every=20)
    health = {"embedding_std": "low", "mean_std": "low", "low_std_frac": "high", "cov_ratio": "high"}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--hidden-dim", type=int, default=512, help="expander width (paper: 8192)")
        g.add_argument("--out-dim", type=int, default=512, help="D, embedding size (paper: 8192)")
        g.add_argument("--sim-coeff", type=float, default=25.0, help="invariance weight (paper: 25)")
        g.add_argument("--std-coeff", type=float, default=25.0, help="variance weight (paper: 25)")
        g.add_argument("--cov-coeff", type=float, default=1.0, help="covariance weight (paper: 1)")
        add_view_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        positive_int_options(a, error, ("hidden_dim", "out_dim"))
        for name in ("sim_coeff", "std_coeff", "cov_coeff"):
            if getattr(a, name) < 0:
                error(f"--{name.replace('_', '-')} expected >= 0, got {getattr(a, name)}")
        check_view_arguments(a, error)

    def __init__(self, a, data):
        super().__init__()
        self.a, self.mean, self.std = a, data.mean, data.std
        backbone = build_vit(a, data.in_chans)
        expander = mlp(a.dim, a.hidden_dim, a.out_dim, 3, hidden_bias=True, last_bias=False)  # Linear-BN-ReLU ×2, Linear
        self.encoder = encoder(backbone, expander, a.pool)
        self.loss = sslkern.nn.VICRegLoss(a.sim_coeff, a.std_coeff, a.cov_coeff)
        self.augment = two_views(a)

    def encoders(self):
        return {"student": self.encoder.backbone}

    def views(self, images, ctx):
        """The two asymmetric views of every image (colour ops on RGB data only: view x blurred
        with p 1.0, view y with p 0.1 and solarised with p 0.2 — the paper's ``TrainTransform``)."""
        (x, y), _ = self.augment(images, ctx.generator, mean=self.mean, std=self.std, rows=(ctx.rank, ctx.world_size))
        return [x, y]

    def forward(self, images, ctx):
        views = self.views(images, ctx)                                         # 1. views
        z = self.encoder(views)                                                 # 2. expander (2B, D)
        z_a, z_b = z.chunk(2)
        loss, stats = self.loss(z_a, z_b, return_stats=True)                   # 3-6. sim, std, cov, sum
        health = {**joint_health(z), "invariance": stats["invariance"], "mean_std": stats["mean_std"],
                  "low_std_frac": stats["low_std_frac"], "covariance": stats["covariance"]}
        if float(stats["covariance_floor"]) > 0:  # the rank floor exists while D > N − 1
            health["cov_ratio"] = stats["covariance"] / stats["covariance_floor"]
        return loss, health

    def verdict(self, health):
        return redundancy_verdict(health)


if __name__ == "__main__":
    run(VICReg)
