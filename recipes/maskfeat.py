"""MaskFeat pretraining of a small ViT on sslkern ops (Wei et al. 2022, arXiv:2112.09133).

    python recipes/maskfeat.py                        # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/maskfeat.py   # data-parallel (gloo on CPU, nccl on GPU)

One step, as SlowFast ``slowfast/models/masked.py: MaskMViT._maskfeat_forward`` (image path,
``PRED_HOG``) with ``operators.py: HOGLayerC`` and ``losses.py: MultipleMSELoss``:
  1. view      random resized crop + small rotation (``sslkern.train.views.single_view``)
  2. mask      BEiT block masking of 40 % of the patches (SlowFast's ``MaskingGenerator`` from
               the loader, ``sslkern.masks.block_mask``), or ``--masking random`` (MAE-style)
  3. targets   HOG of the (augmented, normalised) image: Sobel gradients per channel, 9
               unsigned orientation bins per cell, each cell's histogram L2-normalised, the
               cells of a patch concatenated (``sslkern.hog_targets``); no teacher
  4. encoder   the full sequence with a learned mask token in place of the masked patch
               embeddings (``x·(1 − m) + mask_token·m``), CLS, positions, blocks
  5. head      LayerNorm + one linear layer to the HOG features (``MSSeparateHead``)
  6. loss      mean squared error over the masked patches and features
               (``sslkern.masked_regression_loss``, ``reduction="mean"``, scale 1/F)
  7. step      AdamW (β 0.9 / 0.999, wd 0.05), warm-up then cosine
Collapse signal: ``pred_std_ratio``, the std across masked patches of the predictions over
that of the targets (mean over features): → 0 when the head predicts the same histogram
for every patch (the mean HOG), judged in the verdict.

Deviations for the small default (16x16 digits, one channel, patch 4 → 4x4 = 16 tokens),
see docs/recipes/maskfeat.md: HOG cells of 2x2 pixels (``--hog-pool 2``: 2x2 cells per
4-pixel patch, as MaskFeat's 8-pixel cells in 16-pixel patches), so one patch's target is
1·4·9 = 36 features; ViT dim 96 / depth 4 / 3 heads with timm's learned absolute positions
(MaskFeat: ViT-B); lr 2e-3 at batch 128 (MaskFeat: 2e-4 at 256 over 300 epochs, far too slow
for a few hundred steps), no gradient clipping at 0.02; crop scale 0.5-1 and ±10° rotation
(digits are not flip-invariant).
"""
from __future__ import annotations

import torch
from torch import nn

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.views import add_crop_arguments, check_crop_arguments, single_view
from sslkern.ops.hog_targets import num_features
from sslkern.train.health import batch_std


class MaskedEncoder(nn.Module):
    """ViT whose masked patch embeddings are replaced by a learned token, plus MaskFeat's linear head."""

    def __init__(self, vit, out_dim):
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(vit.embed_dim, out_dim)  # after the ViT's final LayerNorm (MSSeparateHead)
        nn.init.trunc_normal_(self.head.weight, std=0.02), nn.init.zeros_(self.head.bias)

    def forward(self, images, mask):
        """images (B, C, H, W), mask (B, N) True = masked → HOG predictions (B, N, F) for every patch."""
        x = sslkern.nn.encode_with_mask_token(self.vit, images, mask, self.mask_token)
        return self.head(x[:, self.vit.num_prefix_tokens:])


class MaskFeat(Method):
    """MaskFeat: predict the HOG features of masked patches from the rest of the image."""

    name, title = "maskfeat", "MaskFeat"
    defaults = dict(epochs=60, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=5)
    health = {"pred_std_ratio": "low"}
    presets = {"paper": dict(
        _doc="MaskFeat ViT-B/16 on ImageNet, 300 epochs (SlowFast configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml): "
             "AdamW, lr 2e-4 at batch 256 (SlowFast scales it with the number of 256-image shards; scale it "
             "linearly with --batch-size), 30 warm-up epochs, min lr 1e-6, clip 0.02, block masks of 0.4, HOG of "
             "8-pixel cells with 9 bins, crop 0.5-1 + flip. Not reproduced: weight decay on the position embedding "
             "and CLS token (SlowFast decays them; here they are excluded)",
        model="vit_base_patch16_224", image_size=224, batch_size=256, epochs=300, lr=2e-4, min_lr=1e-6,
        warmup_epochs=30, weight_decay=0.05, clip_grad=0.02, masking="block", mask_ratio=0.4, hog_pool=8, hog_bins=9,
        crop_scale=(0.5, 1.0), degrees=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--masking", choices=("block", "random"), default="block")
        g.add_argument("--mask-ratio", type=float, default=0.4, help="share of patches masked (MaskFeat: 0.4)")
        g.add_argument("--hog-pool", type=int, default=2, help="HOG cell size in pixels (divides --patch-size)")
        g.add_argument("--hog-bins", type=int, default=9)
        g.add_argument("--collapse-ratio", type=float, default=0.1,
                       help="verdict: collapsed if pred_std_ratio <= this (the head predicts one histogram)")
        add_crop_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        check_crop_arguments(a, error)
        n = (a.image_size // a.patch_size) ** 2
        if not 0 < a.mask_ratio < 1:
            error(f"--mask-ratio expected in (0, 1), got {a.mask_ratio}")
        if round(n * a.mask_ratio) < 1:
            error(f"--mask-ratio {a.mask_ratio} masks no patch of the {n}")
        if a.hog_pool < 1 or a.patch_size % a.hog_pool:
            error(f"--hog-pool expected a positive divisor of --patch-size {a.patch_size}, got {a.hog_pool}")
        if not 1 <= a.hog_bins <= 256:
            error(f"--hog-bins expected in [1, 256], got {a.hog_bins}")

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        vit = build_vit(a, data.channels)
        self.grid = tuple(vit.patch_embed.grid_size)
        self.num_features = num_features(data.channels, a.patch_size, a.hog_pool, a.hog_bins)
        self.student = MaskedEncoder(vit, self.num_features)
        self.view = single_view(a, data)

    def encoders(self):
        return {"encoder": self.student.vit}

    def make_masks(self, ctx):
        """(B, N) bool: SlowFast's MaskingGenerator (``round(N·ratio)`` patches, blocks of at
        least a fifth of that) or MAE random masking."""
        n = self.grid[0] * self.grid[1]
        if self.a.masking == "random":
            return ctx.per_sample(sslkern.masks.random_mask, n, self.a.mask_ratio).mask
        num_mask = round(n * self.a.mask_ratio)
        return ctx.per_sample(sslkern.masks.block_mask, self.grid, num_mask / n + 1e-9,
                              min_num_patches=max(1, num_mask // 5), max_num_patches=n).mask

    def forward(self, images, ctx):
        a = self.a
        images, = ctx.views(images, self.view)                                           # 1. view
        mask = self.make_masks(ctx)                                                      # 2. mask (B, N)
        targets = sslkern.hog_targets(images, a.patch_size, pool=a.hog_pool, nbins=a.hog_bins)  # 3. (B, N, F)
        pred = self.student(images, mask)                                                # 4.+5. (B, N, F)
        loss = sslkern.masked_regression_loss(pred, targets, mask, scale=1.0 / self.num_features,  # 6. MSE over
                                              reduction="mean")                          # masked patches
        pred_std, target_std = batch_std(pred.detach()[mask]), batch_std(targets[mask])
        return loss, {"pred_std_ratio": pred_std / max(target_std, 1e-12), "target_std": target_std,
                      "masked_share": mask.float().mean()}

    def verdict(self, health):
        v = health.get("pred_std_ratio")
        if v is None:
            return False, "pred_std_ratio not logged"
        if v <= self.a.collapse_ratio:
            return True, (f"collapsed: pred_std_ratio {v:.3f} <= {self.a.collapse_ratio} (the head predicts the same "
                          f"HOG for every masked patch)")
        return False, f"not collapsed: pred_std_ratio {v:.3f} > {self.a.collapse_ratio} (predictions vary across patches)"


def main(argv=None):
    return run(MaskFeat, argv)


if __name__ == "__main__":
    main()
