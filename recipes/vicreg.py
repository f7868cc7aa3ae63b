"""VICReg pretraining of a small ViT on sslkern ops (Bardes et al. 2022, arXiv:2105.04906).

    python recipes/vicreg.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/vicreg.py  # data-parallel; variance / covariance over the global batch
    python recipes/vicreg.py --data IMAGENET --preset paper   # the paper's settings on a ViT-S/16

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
and the paper's asymmetric colour pipeline (``sslkern.train.views.two_views``: view x blur
p 1.0, no solarisation; view y blur p 0.1, solarisation p 0.2); the grey digits get none of it.

``--preset paper``: the paper's ImageNet run (a ResNet-50) mapped onto a ViT-S/16 at 224
(``PRESETS``'s comment says which settings are the paper's and which are the ViT adaptation).
"""
from __future__ import annotations

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.joint import (add_view_arguments, check_view_arguments, encoder, joint_health,
                                 mlp, positive_int_options, redundancy_verdict, two_views)

# Bardes et al. 2022, section 4.1 / appendix C and facebookresearch/vicreg main_vicreg.py. The
# paper's: 1000 epochs, batch 2048, coefficients 25 / 25 / 1, expander 8192-8192-8192
# (Linear-BN-ReLU ×2, Linear without bias), 10 warm-up epochs then cosine to 0.001× the peak,
# two 224-pixel views with crops (0.08, 1), flips and the asymmetric colour pipeline
# (augmentations.py TrainTransform). Not reproducible here: LARS (base lr 0.2 × batch/256,
# weight decay 1e-6, biases and norms excluded); the loop trains with AdamW. ViT adaptation:
# ResNet-50 → ViT-S/16 (--model vit_small_patch16_224), its global average pool → the mean of the
# patch tokens, AdamW at DINO's ViT-S rule lr 5e-4 × batch/256, weight decay 0.04 → 0.4 (dino main_dino.py).
PRESETS = {
    "paper": {"model": "vit_small_patch16_224", "image_size": 224, "epochs": 1000, "batch_size": 2048,
              "lr": 5e-4 * 2048 / 256, "min_lr": 5e-4 * 2048 / 256 * 1e-3, "warmup_epochs": 10,
              "weight_decay": 0.04, "weight_decay_end": 0.4, "hidden_dim": 8192, "out_dim": 8192,
              "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0, "crop_scale": (0.08, 1.0), "degrees": 0.0,
              "pool": "mean",
              "_doc": "VICReg ImageNet (Bardes et al. 2022 sec. 4.1, vicreg main_vicreg.py: 1000 epochs, batch 2048, "
                      "25/25/1, expander 8192x3, 10 warm-up epochs) on ViT-S/16 with AdamW instead of LARS (base lr "
                      "0.2 x B/256, wd 1e-6)"},
}


class VICReg(Method):
    """VICReg: invariance between views, variance kept above 1 and covariance driven to 0 per dimension."""

    name, title = "vicreg", "VICReg"
    defaults = dict(epochs=35, lr=1e-3, weight_decay=0.05, warmup_epochs=5, eval_every=20)
    health = {"embedding_std": "low", "mean_std": "low", "low_std_frac": "high", "cov_ratio": "high"}
    presets = PRESETS

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
        self.a = a
        backbone = build_vit(a, data.channels)
        expander = mlp(a.dim, a.hidden_dim, a.out_dim, 3, hidden_bias=True, last_bias=False)  # Linear-BN-ReLU ×2, Linear
        self.encoder = encoder(backbone, expander, a.pool)
        self.loss = sslkern.nn.VICRegLoss(a.sim_coeff, a.std_coeff, a.cov_coeff)
        # the paper's TrainTransform on RGB data: view x blurred with p 1.0, view y with p 0.1 and
        # solarised with p 0.2
        self.views = two_views(a, data)

    def encoders(self):
        return {"student": self.encoder.backbone}

    def forward(self, images, ctx):
        views = ctx.views(images, self.views)                                   # 1. views
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
