"""SwAV pretraining of a small ViT on sslkern ops (Caron et al. 2020, arXiv:2006.09882).

    python recipes/swav.py                       # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/swav.py  # data-parallel; codes over the global batch
    python recipes/swav.py --data IMAGENET --preset paper   # swav_800ep_pretrain.sh's settings on a ViT-S/16

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
no queue (swav: 3,840 rows from epoch 15 at batch 256, none at batch 4,096; here a queue from
epoch 3 slowed learning); crops (0.4, 1) at 16 px and 4 × (0.1, 0.4) at 8 px (swav: 2 × 224 +
6 × 96, scales (0.14, 1) / (0.05, 0.14)) with ±10° rotation, no flips on digits; the head input
is the mean of the patch tokens. On RGB data the crops get flips and swav's colour distortion
and blur (``sslkern.train.views.swav_multicrop``: jitter 0.8 / 0.8 / 0.8 / 0.2 with p 0.8, grey
p 0.2, blur p 0.5, no solarisation).

``--preset paper`` / ``--preset paper_bs256``: swav's ImageNet scripts (a ResNet-50) mapped onto
a ViT-S/16 at 224 (``PRESETS``'s comment says which settings are swav's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.health import embedding_std
from sslkern.train.joint import mlp, positive_int_options
from sslkern.train.views import swav_multicrop

# Caron et al. 2020 and facebookresearch/swav scripts/swav_800ep_pretrain.sh (batch 4096, no queue)
# and swav_400ep_bs256_pretrain.sh (batch 256, a queue of 3840 rows from epoch 15). swav's: the
# multi-crop 2 × 224 (0.14, 1) + 6 × 96 (0.05, 0.14) with its colour distortion and blur, head
# 2048 → 128, K = 3000 prototypes, ε = 0.05, τ = 0.1, 3 Sinkhorn iterations, the codes of the two
# large crops, prototypes frozen for the first epoch (313 / 5005 iterations), epochs, batch,
# queue, warm-up (10 epochs from 0.3 / none) and a cosine to 0.001× the peak. Not reproducible
# here: LARS (lr 4.8 at batch 4096, 0.6 at batch 256; weight decay 1e-6), the warm-up's start
# at 0.3 (the loop warms up from 0); the loop trains with AdamW. ViT adaptation: ResNet-50 →
# ViT-S/16 (--model vit_small_patch16_224), its global average pool → the mean of the patch
# tokens, AdamW at DINO's ViT-S rule lr 5e-4 × batch/256, weight decay 0.04 → 0.4 (dino main_dino.py).
_SWAV = {"model": "vit_small_patch16_224", "image_size": 224, "local_size": 96, "local_crops": 6,
         "global_scale": (0.14, 1.0), "local_scale": (0.05, 0.14), "degrees": 0.0, "pool": "mean", "hidden_dim": 2048,
         "feat_dim": 128, "n_prototypes": 3000, "epsilon": 0.05, "temperature": 0.1, "sinkhorn_iterations": 3,
         "freeze_prototypes_epochs": 1, "weight_decay": 0.04, "weight_decay_end": 0.4}
PRESETS = {
    "paper": {**_SWAV, "epochs": 800, "batch_size": 4096, "lr": 5e-4 * 4096 / 256, "min_lr": 5e-4 * 4096 / 256 * 1e-3,
              "warmup_epochs": 10, "queue_length": 0,
              "_doc": "SwAV ImageNet 800 epochs (swav scripts/swav_800ep_pretrain.sh: batch 4096, 2x224 + 6x96, "
                      "eps 0.05, tau 0.1, K 3000, no queue) on ViT-S/16 with AdamW instead of LARS (lr 4.8, wd 1e-6)"},
    "paper_bs256": {**_SWAV, "epochs": 400, "batch_size": 256, "lr": 5e-4, "min_lr": 5e-4 * 1e-3, "warmup_epochs": 0,
                    "queue_length": 3840, "epoch_queue_starts": 15,
                    "_doc": "SwAV ImageNet at batch 256 (swav scripts/swav_400ep_bs256_pretrain.sh: 400 epochs, queue "
                            "3840 from epoch 15) on ViT-S/16 with AdamW instead of LARS (lr 0.6, wd 1e-6)"},
}


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
    presets = PRESETS

    @staticmethod
    def add_arguments(g):
        g.add_argument("--hidden-dim", type=int, default=512, help="projection head width (swav: 2048)")
        g.add_argument("--feat-dim", type=int, default=128, help="embedding size (swav: 128)")
        g.add_argument("--n-prototypes", type=int, default=128, help="K (swav: 3000)")
        g.add_argument("--temperature", type=float, default=0.1, help="τ of the predictions (swav: 0.1)")
        g.add_argument("--epsilon", type=float, default=0.02, help="ε of the Sinkhorn codes (swav: 0.05)")
        g.add_argument("--sinkhorn-iterations", type=int, default=3, help="(swav: 3)")
        g.add_argument("--queue-length", type=int, default=0,
                       help="queue of past embeddings per assigned crop, over all processes (0 = none; swav: 3840 "
                            "at batch 256)")
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
        if a.parallel == "fsdp":
            error("--fsdp is not supported by swav: its prototypes are renormalised in place at the start of the "
                  "forward, which under FSDP2 would change the gathered copy, not the shards (use DDP)")
        if a.queue_length % a.batch_size:
            error(f"--queue-length expected a multiple of --batch-size {a.batch_size} (swav rounds it down), "
                  f"got {a.queue_length}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(a, name)
            if not 0 < lo <= hi <= 1:
                error(f"--{name.replace('_', '-')} expected 0 < lo <= hi <= 1, got {lo} {hi}")
        a.local_size = a.local_size or a.image_size // 2
        if a.local_size % a.patch_size:
            error(f"--local-size {a.local_size} expected a multiple of --patch-size {a.patch_size}")

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        backbone = build_vit(a, data.channels, dynamic_img_size=True)       # large and small crops
        head = mlp(a.dim, a.hidden_dim, a.feat_dim, 2)                        # Linear-BN-ReLU-Linear
        self.encoder = sslkern.nn.MultiCropWrapper(backbone, head, a.pool)
        self.prototypes = sslkern.nn.SwAVPrototypes(a.feat_dim, a.n_prototypes)
        self.loss = sslkern.nn.SwAVLoss(2 + a.local_crops, a.feat_dim, temperature=a.temperature, epsilon=a.epsilon,
                                        sinkhorn_iterations=a.sinkhorn_iterations, queue_length=a.queue_length)
        self.views = swav_multicrop(a, data)                                 # 2 large crops, then the small ones

    def encoders(self):
        return {"student": self.encoder.backbone}

    def frozen(self):
        return {"prototypes.": self.a.freeze_prototypes_epochs}

    def forward(self, images, ctx):
        self.prototypes.normalize_()                                            # 1. unit prototypes
        crops = ctx.views(images, self.views)                                   # 2. multi-crop
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
