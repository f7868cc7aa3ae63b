"""data2vec (v1) vision pretraining of a small ViT on sslkern ops (Baevski et al. 2022, arXiv:2202.03555).

    python recipes/data2vec.py                        # digits, 16x16, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/data2vec.py   # data-parallel (gloo on CPU, nccl on GPU)

One step, as fairseq ``examples/data2vec/models/data2vec_vision.py`` (BEiT-style masking):
  1. view      random resized crop + small rotation (``sslkern.train.views.single_view``)
  2. mask      BEiT block masking of ~60 % of the patches (``sslkern.masks.block_mask``)
  3. targets   the EMA teacher encodes the unmasked image; the outputs of its top K blocks
               (end of block, CLS dropped) are each layer-normalised without parameters and
               averaged (``sslkern.layer_average_targets(..., layer_norm="layer")``)
  4. student   the full sequence with a learned mask token in place of the masked patch
               embeddings, blocks, norm, a linear regression head
  5. loss      smooth-L1 (β = 2) × 1/√D at the masked positions, summed and divided by the
               global masked count (``sslkern.masked_regression_loss``)
  6. step      AdamW (β 0.9 / 0.999, wd 0.05, clip 3), warm-up then cosine
  7. EMA       teacher ← EMA of the student encoder, momentum annealed linearly
               (``sslkern.nn.EMATeacher``, ``sslkern.schedules.linear_anneal``)
Collapse signal: ``target_std``, the std across the batch of the targets (→ 0 when the
teacher stops depending on the image), logged every step and judged in the verdict.

Deviations for the small default (16x16 digits, patch 4 → 4x4 = 16 tokens), see
docs/recipes/data2vec.md: EMA 0.99 → 0.997 (fairseq 0.999 → 0.9998 over 375k updates: a
teacher that slow barely moves in ~600 steps); the average of all 4 blocks (fairseq: top 6
of 12); blocks of at least 2 patches (fairseq 16 of 196) and no per-block cap, so a 4x4 grid
gets 1-3 blocks for its 9 masked patches; learned absolute positions of timm's ViT instead
of BEiT's shared relative position bias; the teacher is an EMA of the whole encoder
including its patch embedding (fairseq: transformer only, ``ema_transformer_only``).
"""
from __future__ import annotations

import torch
from torch import nn

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.views import add_crop_arguments, check_crop_arguments, single_view
from sslkern.train.health import batch_std, std_verdict

NORMS = ("layer", "instance", "none")


class MaskedStudent(nn.Module):
    """ViT whose masked patch embeddings are replaced by a learned token, plus the regression head."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(vit.embed_dim, vit.embed_dim)  # fairseq final_proj

    def forward(self, images, mask):
        """images (B, C, H, W), mask (B, N) True = masked → predictions (B, N, D) for every patch."""
        x = sslkern.nn.encode_with_mask_token(self.vit, images, mask, self.mask_token)
        return self.head(x[:, self.vit.num_prefix_tokens:])


class Data2Vec(Method):
    """data2vec v1: a masked student regresses the EMA teacher's averaged, normalised top layers."""

    name, title = "data2vec", "data2vec (v1)"
    defaults = dict(epochs=70, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=5, clip_grad=3.0)
    betas = (0.9, 0.999)
    health = {"target_std": "low"}
    presets = {"paper": dict(
        _doc="data2vec ViT-B/16 on ImageNet, 800 epochs (data2vec_vision beit/README.md and run_cyclical.py): "
             "AdamW, lr 2e-3 at batch 2,048 (not scaled by the code; scale it linearly with --batch-size), 10 "
             "warm-up epochs, min lr 1e-5, constant EMA 0.9998, 120 of 196 patches masked in blocks of >= 16, top "
             "6 blocks each layer-normed, averaged and layer-normed again, smooth-L1 beta 2, stochastic depth 0.25, "
             "layer scale 1e-4, crop 0.08-1 + flip; clip 83.1 is its 3.0 times sqrt(768), since this recipe's loss "
             "(fairseq's 1/sqrt(D) per token) is sqrt(D) times its mean over features. Not reproduced: BEiT's shared "
             "relative position bias (learned absolute positions here), attention dropout 0.05, colour jitter 0.4",
        model="vit_base_patch16_224", drop_path=0.25, layer_scale=1e-4, image_size=224, batch_size=2048, epochs=800,
        lr=2e-3, min_lr=1e-5, warmup_epochs=10, weight_decay=0.05, clip_grad=83.1, mask_ratio=0.6123,
        min_block_patches=16, top_k=6, layer_norm="layer", final_norm="layer", loss_beta=2.0, ema_start=0.9998,
        ema_end=0.9998, crop_scale=(0.08, 1.0), degrees=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--mask-ratio", type=float, default=0.6, help="share of patches masked per image")
        g.add_argument("--min-block-patches", type=int, default=2, help="smallest masking block (fairseq 16 of 196)")
        g.add_argument("--top-k", type=int, default=4, help="teacher blocks averaged into the targets")
        g.add_argument("--layer-norm", choices=NORMS, default="layer", help="norm of each teacher block output")
        g.add_argument("--final-norm", choices=NORMS, default="none", help="norm of the averaged targets")
        g.add_argument("--loss-beta", type=float, default=2.0, help="smooth-L1 beta (0 = L2)")
        g.add_argument("--ema-start", type=float, default=0.99)
        g.add_argument("--ema-end", type=float, default=0.997)
        g.add_argument("--layer-scale", type=float, default=0.0,
                       help="layer-scale init of the ViT blocks (data2vec_vision ViT-B: 1e-4; 0 = none)")
        g.add_argument("--collapse-std", type=float, default=0.05, help="verdict: collapsed if target_std <= this (or <= 1/4 of its step-1 value)")
        add_crop_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        check_crop_arguments(a, error)
        n = (a.image_size // a.patch_size) ** 2
        if not 0 < a.mask_ratio < 1:
            error(f"--mask-ratio expected in (0, 1), got {a.mask_ratio}")
        if not 1 <= a.min_block_patches <= int(n * a.mask_ratio):
            error(f"--min-block-patches expected in [1, {int(n * a.mask_ratio)}] (the masked count), "
                  f"got {a.min_block_patches}")
        if not 1 <= a.top_k <= a.depth:
            error(f"--top-k expected in [1, --depth {a.depth}], got {a.top_k}")
        if a.loss_beta < 0:
            error(f"--loss-beta expected >= 0, got {a.loss_beta}")
        if a.layer_scale < 0:
            error(f"--layer-scale expected >= 0 (0 = none), got {a.layer_scale}")
        for name in ("ema_start", "ema_end"):
            if not 0 <= getattr(a, name) <= 1:
                error(f"--{name.replace('_', '-')} expected in [0, 1], got {getattr(a, name)}")

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        vit = build_vit(a, data.channels, **({"init_values": a.layer_scale} if a.layer_scale else {}))
        self.grid = tuple(vit.patch_embed.grid_size)
        self.student = MaskedStudent(vit)
        self.teacher = sslkern.nn.EMATeacher(vit)  # frozen deep copy of the encoder (no head, no mask token)
        self.register_buffer("initial_target_std", torch.zeros(()))  # step 1's value, for the verdict
        self.view = single_view(a, data)

    def schedule(self, ctx):
        return {"momentum": sslkern.schedules.linear_anneal(ctx.step, ctx.total_steps, self.a.ema_start, self.a.ema_end)}

    def ema_pairs(self):
        return [(self.teacher, self.student.vit)]

    def encoders(self):
        return {"teacher": self.teacher.module, "student": self.student.vit}

    def make_masks(self, ctx):
        """(B, N) bool block masks (fairseq ``make_mask``, BEiT ``MaskingGenerator``)."""
        n = self.grid[0] * self.grid[1]
        return ctx.per_sample(sslkern.masks.block_mask, self.grid, self.a.mask_ratio,
                              min_num_patches=self.a.min_block_patches, max_num_patches=n).mask

    def forward(self, images, ctx):
        a = self.a
        images, = ctx.views(images, self.view)                                           # 1. view
        mask = self.make_masks(ctx)                                                      # 2. mask (B, N)
        with torch.no_grad():                                                            # 3. targets (B, N, D)
            layers = sslkern.nn.block_outputs(self.teacher.module, images, a.top_k)
            targets = sslkern.layer_average_targets(layers, layer_norm=a.layer_norm, final_norm=a.final_norm)
        pred = self.student(images, mask)                                                # 4. student (B, N, D)
        loss = sslkern.masked_regression_loss(pred, targets, mask, beta=a.loss_beta,    # 5. smooth-L1, mean over
                                              reduction="mean")                          #    masked tokens
        std = batch_std(targets)
        if ctx.step == 0:
            self.initial_target_std.fill_(std)
        return loss, {"target_std": std, "pred_std": batch_std(pred.detach()), "masked_share": mask.float().mean()}

    def verdict(self, health):
        return std_verdict(health, "target_std", self.a.collapse_std, initial=float(self.initial_target_std) or None)


def main(argv=None):
    return run(Data2Vec, argv)


if __name__ == "__main__":
    main()
