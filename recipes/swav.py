"""SwAV pretraining of a small ViT on sslkern ops (Caron et al. 2020, arXiv:2006.09882).

    python recipes/swav.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/swav.py  # data-parallel; codes over the global batch

One step, as facebookresearch/swav ``main_swav.py: train``:
  1. prototypes  C ← C / ‖C‖ (rows), in place, no gradient
  2. views       multi-crop: 2 crops at the image size + N small crops
  3. embeddings  z = normalize(head(backbone(crop))) for every crop; scores s = z Cᵀ
  4. codes       per assigned crop (the two large ones), no gradient: Sinkhorn-Knopp over the
                 global batch (and, once full, a queue of earlier embeddings scored against
                 the current prototypes): q = equipartitioned exp(s/ε), 3 iterations
  5. loss        swapped prediction: for each assigned crop, the mean over the other crops of
                 −Σ q·log softmax(s_v/τ), τ = 0.1; averaged over the assigned crops
  6. step        AdamW, warm-up + cosine lr; the prototypes' gradient dropped in the first epoch
Steps 4–5 are ``sslkern.nn.SwAVLoss``: ``sslkern.sinkhorn_knopp_teacher`` per crop (log domain,
the batch's codes only) and the fused multi-crop cross-entropy of ``sslkern.dino_loss`` with
the codes as teacher probabilities.

Deviations for the small default (1,257 digits of 16x16; see docs/recipes/swav.md for what
was tried): AdamW instead of LARS; head 96 → 512 → 128 (swav: 2048 → 128) and K = 128
prototypes (swav: 3,000); sharper codes, ε = 0.02 (swav: 0.05), for a short (270-step) run;
no queue (swav: 3,840 rows from epoch 15; here a queue from epoch 3 slowed learning); crops
(0.4, 1) at 16 px and 4 × (0.1, 0.4) at 8 px (swav: 2 × 224 + 6 × 96, scales (0.14, 1) /
(0.05, 0.14)) with ±10° rotation, no flips on digits; the head input is the mean of the patch
tokens. On RGB data the crops get flips and DINO's colour pipeline (swav: colour distortion +
blur p 0.5, no solarisation).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sslkern  # noqa: E402
from sslkern.train import Method, build_vit, run  # noqa: E402
from sslkern.train.health import embedding_std  # noqa: E402
from sslkern.train.joint import mlp, positive_int_options  # noqa: E402
from sslkern.train.views import MultiCrop  # noqa: E402


def swav_verdict(health: dict, *, loss_frac: float = 0.95, entropy: float = 0.95, std: float = 0.1):
    """Collapsed when the predictions are uniform (loss ≥ 0.95·ln K: every prototype equally
    likely), the codes are (mean code entropy ≥ 0.95·ln K: every embedding alike, so the
    equipartition spreads each one over all prototypes), or the embeddings share one direction
    (embedding std < 0.1)."""
    lf, ce, es = health.get("loss_frac"), health.get("code_entropy"), health.get("embedding_std")
    if lf is None or ce is None:
        return False, "no health figures logged"
    figures = f"loss {lf:.2f}·ln K, code entropy {ce:.2f}·ln K" + (f", embedding std {es:.3f}" if es is not None else "")
    if lf >= loss_frac or ce >= entropy or (es is not None and es < std):
        return True, f"collapsed ({figures})"
    return False, f"not collapsed ({figures})"


class SwAV(Method):
    """SwAV: predict the Sinkhorn cluster assignment (code) of one crop from the other crops."""

    name, title = "swav", "SwAV"
    defaults = dict(epochs=30, lr=1e-3, weight_decay=0.05, warmup_epochs=5, eval_every=20)
    health = {"loss_frac": "high", "code_entropy": "high", "embedding_std": "low"}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--hidden-dim", type=int, default=512, help="projection head width (swav: 2048)")
        g.add_argument("--feat-dim", type=int, default=128, help="embedding size (swav: 128)")
        g.add_argument("--n-prototypes", type=int, default=128, help="K (swav: 3000)")
        g.add_argument("--temperature", type=float, default=0.1, help="τ of the predictions (swav: 0.1)")
        g.add_argument("--epsilon", type=float, default=0.02, help="ε of the Sinkhorn codes (swav: 0.05)")
        g.add_argument("--sinkhorn-iterations", type=int, default=3, help="(swav: 3)")
        g.add_argument("--queue-length", type=int, default=0, help="queue of past embeddings, global (0 = none; swav: 3840)")
        g.add_argument("--epoch-queue-starts", type=int, default=15, help="(swav: 15)")
        g.add_argument("--freeze-prototypes-epochs", type=int, default=1,
                       help="epochs with the prototypes' gradient dropped (swav: 313 iterations, one epoch)")
        g.add_argument("--pool", choices=("mean", "cls"), default="mean", help="head input: mean of patch tokens or CLS")
        g.add_argument("--local-crops", type=int, default=4, help="(swav: 6)")
        g.add_argument("--local-size", type=int, default=0, help="small crop side (0 = image size / 2)")
        g.add_argument("--global-scale", type=float, nargs=2, default=(0.4, 1.0), help="(swav: 0.14 1)")
        g.add_argument("--local-scale", type=float, nargs=2, default=(0.1, 0.4), help="(swav: 0.05 0.14)")
        g.add_argument("--degrees", type=float, default=10.0, help="random rotation of every crop (swav: none)")

    @staticmethod
    def check_arguments(a, error):
        positive_int_options(a, error, ("hidden_dim", "feat_dim", "n_prototypes", "sinkhorn_iterations"))
        for name in ("temperature", "epsilon"):
            if getattr(a, name) <= 0:
                error(f"--{name.replace('_', '-')} expected > 0, got {getattr(a, name)}")
        for name in ("queue_length", "epoch_queue_starts", "freeze_prototypes_epochs", "local_crops"):
            if getattr(a, name) < 0:
                error(f"--{name.replace('_', '-')} expected >= 0, got {getattr(a, name)}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if a.parallel == "fsdp" and world > 1:
            error("--fsdp is not supported by swav: its prototypes are renormalised in place at the start of the "
                  "forward, which under FSDP2 would change the gathered copy, not the shards (use DDP)")
        if a.queue_length % (a.batch_size):
            error(f"--queue-length expected a multiple of --batch-size {a.batch_size} (swav rounds it down), "
                  f"got {a.queue_length}")
        if a.queue_length % world:
            error(f"--queue-length expected a multiple of the number of processes ({world})")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(a, name)
            if not 0 < lo <= hi <= 1:
                error(f"--{name.replace('_', '-')} expected 0 < lo <= hi <= 1, got {lo} {hi}")
        a.local_size = a.local_size or a.image_size // 2
        if a.local_size % a.patch_size:
            error(f"--local-size {a.local_size} expected a multiple of --patch-size {a.patch_size}")

    def __init__(self, a, data):
        super().__init__()
        self.a, self.mean, self.std = a, data.mean, data.std
        backbone = build_vit(a, data.in_chans, dynamic_img_size=True)       # large and small crops
        head = mlp(a.dim, a.hidden_dim, a.feat_dim, 2)                        # Linear-BN-ReLU-Linear
        self.encoder = sslkern.nn.MultiCropWrapper(backbone, head, a.pool)
        self.prototypes = sslkern.nn.SwAVPrototypes(a.feat_dim, a.n_prototypes)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.loss = sslkern.nn.SwAVLoss(2 + a.local_crops, a.feat_dim, temperature=a.temperature, epsilon=a.epsilon,
                                        sinkhorn_iterations=a.sinkhorn_iterations,
                                        queue_length=a.queue_length // world)
        self.augment = MultiCrop(a.image_size, a.local_size, n_local=a.local_crops, global_scale=tuple(a.global_scale),
                                 local_scale=tuple(a.local_scale), degrees=a.degrees)

    def encoders(self):
        return {"student": self.encoder.backbone}

    def frozen(self):
        return {"prototypes.": self.a.freeze_prototypes_epochs}

    def views(self, images, ctx):
        """Multi-crop: 2 large crops (assigned codes) then the small ones (DINO's colour ops on RGB data)."""
        large, small = self.augment(images, ctx.generator, mean=self.mean, std=self.std,
                                    rows=(ctx.rank, ctx.world_size))
        return large + small

    def forward(self, images, ctx):
        self.prototypes.normalize_()                                            # 1. unit prototypes
        crops = self.views(images, ctx)                                         # 2. multi-crop
        z = F.normalize(self.encoder(crops), dim=1)                             # 3. embeddings (V·B, d)
        use_queue = self.a.queue_length > 0 and ctx.epoch >= self.a.epoch_queue_starts
        loss, stats = self.loss(z, self.prototypes, use_queue=use_queue, return_stats=True)  # 4-5. codes, loss
        with torch.no_grad():
            std = embedding_std(z)
        return loss, {"loss_frac": stats["loss_frac"], "code_entropy": stats["code_entropy"], "embedding_std": std,
                      "queue": float(self.loss.queue_full() and use_queue)}

    def verdict(self, health):
        return swav_verdict(health)


if __name__ == "__main__":
    run(SwAV)
