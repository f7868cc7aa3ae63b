"""RelViT: spatial-relation pretext tasks on shuffled patches (Camporese et al. 2021, arXiv:2107.00103).

    python recipes/relvit.py                         # digits, 16x16, 30 epochs (270 steps; 400-680 s measured
                                                     # with --threads 1 on a heavily loaded 2-core machine)
    torchrun --nproc_per_node=2 recipes/relvit.py    # data-parallel (gloo on CPU, nccl on GPU)

One step, as in relvit ``datasets/dataset_creation/shuffle_dataset.py`` (``ShuffleDataset``)
and ``models/relvit.py`` (``RelViT.forward`` / ``training_step``, upstream task):
  1. view      random resized crop + small rotation (``sslkern.train.views.single_view``)
  2. shuffle   the image's patches permuted at random, per image (``idx_shuffle = randperm``,
               ``x = x[:, idx_shuffle]``): token t of the shuffled image is original patch
               ``perm[t]``; the ViT (with its position embedding, ``--use_positional_embeddings``)
               sees the shuffled image
  3. encoder   ViT, patch tokens after the final norm (``z_patches``, CLS dropped)
  4. losses    all four upstream tasks, summed with weight 1 as RelViT does:
               * relations: for every pair (i, j) of tokens, where patch i lay relative to
                 patch j (9 classes, LU … RD), scored by 9 query/key heads
                 (``MultiHeadAttentionScores(D, 9)``), cross-entropy
               * distances and angles: one-head scores regressed (MSE) onto RelViT's
                 distance / angle matrices of the original cells
               all three in ``sslkern.relation_loss`` (labels and targets from the cells inside
               the kernel; no (B, 9, N, N) scores kept)
               * absolute positions: a linear head per token over the N cells, cross-entropy
                 (``abs_pos_head``; a per-token classifier, plain ``F.cross_entropy``)
  5. step      AdamW, warm-up then cosine

Health: the relation accuracy (``rel_acc``) against the best accuracy of a content-blind
predictor (the most frequent relation class of the grid: features that no longer depend on
the patch give at most that), and ``token_std`` (batch std of the patch tokens).

Deviations for the small default (16x16 digits, patch 4 → 4x4 = 16 tokens): ViT dim 96 /
depth 4 / 3 heads (relvit: ViT-S), relation heads of width 96 // 9 = 10 (RelViT: D // 9);
lr 1e-3 at batch 128 (relvit: 5e-4 at 256); RelViT's per-patch crop / colour jitter /
grayscale (``patch_transforms.py``) replaced by the image-level crop + rotation (4x4-pixel
grayscale patches); features evaluated on unshuffled images (the mean patch token).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sslkern
from sslkern.reference.relation_loss import relation_labels
from sslkern.train import Method, build_vit, run
from sslkern.train.views import add_crop_arguments, check_crop_arguments, single_view
from sslkern.train.health import batch_std


def shuffle_patches(images: torch.Tensor, perm: torch.Tensor, p: int) -> torch.Tensor:
    """``ShuffleDataset``: image b's patch slot t gets original patch ``perm[b, t]`` (row-major)."""
    b, c, h, w = images.shape
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
    x = x[torch.arange(b, device=images.device)[:, None], perm]
    return x.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def majority_rate(side: int) -> float:
    """Accuracy of always predicting the grid's most frequent relation class (content-blind)."""
    y = relation_labels(torch.arange(side * side)[None], side)
    return float(torch.bincount(y.flatten(), minlength=9).max()) / y.numel()


class Scores(nn.Module):
    """RelViT ``MultiHeadAttentionScores(D, heads)``: per-head bias-free query / key weights (heads, D // heads, D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        w = lambda: nn.Parameter(torch.empty(heads, dim // heads, dim).uniform_(-dim ** -0.5, dim ** -0.5))  # nn.Linear init
        self.wq, self.wk = w(), w()


class RelViT(Method):
    """RelViT: predict the spatial relations, distances, angles and positions of shuffled patches."""

    name, title = "relvit", "RelViT"
    defaults = dict(epochs=30, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=3)
    health = {"rel_acc": "low", "token_std": "low"}
    presets = {"paper": dict(
        _doc="RelViT ViT-S/32 on ImageNet-100 at 224 (relvit scripts/upstream.sh, config.py, models/relvit.py): "
             "AdamW at a constant lr 5e-4 for batch 256 (no schedule; scale it linearly with --batch-size), no "
             "weight decay, clip 1, 100 epochs, the relation and absolute-position tasks only, crop 0.08-1 + flip. "
             "Not reproduced: dropout 0.1, the per-patch colour jitter 0.8 and grayscale 0.2, and upstream.sh "
             "training without position embeddings (the ViT here keeps its learned ones)",
        model="vit_small_patch32_224", image_size=224, batch_size=256, epochs=100, lr=5e-4, min_lr=5e-4,
        warmup_epochs=0, weight_decay=0.0, clip_grad=1.0, distances=False, angles=False, abs_positions=True,
        smooth_rel=0.0, crop_scale=(0.08, 1.0), degrees=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--no-distances", dest="distances", action="store_false", help="drop the distance regression")
        g.add_argument("--no-angles", dest="angles", action="store_false", help="drop the angle regression")
        g.add_argument("--no-abs-positions", dest="abs_positions", action="store_false",
                       help="drop the absolute-position classifier")
        g.add_argument("--smooth-rel", type=float, default=0.0, help="label smoothing of the relation loss (relvit)")
        g.add_argument("--collapse-margin", type=float, default=0.02,
                       help="verdict: collapsed if rel_acc <= the majority-class rate + this")
        add_crop_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        check_crop_arguments(a, error)
        if a.dim < 9:
            error(f"--dim expected >= 9 (9 relation heads of width dim // 9), got {a.dim}")
        if a.image_size // a.patch_size < 2:
            error(f"expected a grid of at least 2x2 patches, got {a.image_size // a.patch_size}x"
                  f"{a.image_size // a.patch_size}")
        if not 0 <= a.smooth_rel < 1:
            error(f"--smooth-rel expected in [0, 1), got {a.smooth_rel}")

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        self.encoder = build_vit(a, data.channels)
        self.side = a.image_size // a.patch_size
        n = self.side ** 2
        self.rel_head = Scores(a.dim, 9)
        self.dist_head = Scores(a.dim, 1) if a.distances else None
        self.angle_head = Scores(a.dim, 1) if a.angles else None
        self.abs_pos_head = nn.Linear(a.dim, n) if a.abs_positions else None
        self.chance = majority_rate(self.side)
        self.view = single_view(a, data)

    def encoders(self):
        return {"encoder": self.encoder}

    def forward(self, images, ctx):
        a = self.a
        images, = ctx.views(images, self.view)                                                 # 1. view
        perm = ctx.rand(self.side ** 2).argsort(1)
        x = shuffle_patches(images, perm, a.patch_size)                                        # 2. shuffle
        z = self.encoder.forward_features(x)                                                   # 3. (B, 1 + N, D)
        pair = lambda h: None if h is None else (h.wq, h.wk)  # noqa: E731
        r = sslkern.relation_loss(z, self.rel_head.wq, self.rel_head.wk, perm,                # 4. pair losses
                                  distance=pair(self.dist_head), angle=pair(self.angle_head),
                                  label_smoothing=a.smooth_rel, num_prefix_tokens=self.encoder.num_prefix_tokens)
        loss, metrics = r.loss, {"rel_loss": r.relation.detach(), "rel_acc": r.accuracy}
        if r.distance is not None:
            metrics["dist_loss"] = r.distance.detach()
        if r.angle is not None:
            metrics["angle_loss"] = r.angle.detach()
        patches = z[:, self.encoder.num_prefix_tokens:]
        if self.abs_pos_head is not None:                                                      # absolute positions
            abs_loss = F.cross_entropy(self.abs_pos_head(patches).transpose(1, 2), perm)
            loss = loss + abs_loss
            metrics["abs_loss"] = abs_loss.detach()
        metrics["token_std"] = batch_std(patches.detach())
        return loss, metrics

    def verdict(self, health):
        acc, std = health.get("rel_acc"), health.get("token_std")
        if acc is None:
            return False, "rel_acc not logged"
        line = f"rel_acc {acc:.3f} vs content-blind {self.chance:.3f}"
        if std is not None:
            line += f", token_std {std:.3f}"
        if acc <= self.chance + self.a.collapse_margin or (std is not None and std <= 0.01):
            return True, f"collapsed: {line} (the relations are no better than guessing from the grid alone)"
        return False, f"not collapsed: {line}"


def main(argv=None):
    return run(RelViT, argv)


if __name__ == "__main__":
    main()
