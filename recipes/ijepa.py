"""I-JEPA pretraining of a small ViT on sslkern ops (Assran et al. 2023, arXiv:2301.08243).

    python recipes/ijepa.py                           # digits, 16x16 with patch 4, a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/ijepa.py      # data-parallel (gloo on CPU, nccl on GPU)

One step, as ijepa ``src/train.py`` with ``src/masks/multiblock.py`` and the predictor of
``src/models/vision_transformer.py``:
  1. masks     multi-block masks for the global batch (``sslkern.masks.multiblock_masks``): one
               target block size per batch, 2 target blocks per image (ijepa 4), one context
               block (scale 0.85-1) minus the targets
  2. targets   the EMA target encoder on the full image, parameter-free layer norm over
               features (``sslkern.layer_average_targets([h], layer_norm="layer")``)
  3. context   the context encoder on the context tokens only, sin-cos positions added in the
               gather (``sslkern.patch.forward_masked`` → ``sslkern.gather_tokens``)
  4. predictor a narrow ViT on the context tokens plus one mask token per target patch carrying
               its position (``sslkern.gather_tokens(mask_token, ids, pos_embed=...)``)
  5. loss      smooth-L1 (β = 1) against the targets at the target blocks, mean over tokens and
               features = ``F.smooth_l1_loss(z, h)`` (``sslkern.masked_regression_loss(ids=...)``,
               the targets are never gathered or repeated)
  6. step      AdamW, warm-up then cosine lr, weight decay cosine 0.04 → 0.4
  7. EMA       target encoder ← EMA of the context encoder, momentum linear 0.999 (ijepa 0.996) → 1
Collapse signal: ``target_std``, the std across the batch of the layer-normalised target
features (→ 0 when they no longer depend on the image), logged and judged in the verdict.

Default: patch 4 (a 4x4 grid), two 2x2 targets (scale 0.2-0.3), ``min_keep`` 2, batch 64,
lr 5e-4, EMA 0.999 -> 1, 100 epochs. ijepa's proportions (patch 2 on the 8x8 grid, 4 targets,
EMA from 0.996) collapsed slowly here: the sin-cos position dominates a one-pixel token's target
features, which the predictor then reads off the mask tokens' positions (kNN +9.6).
Other deviations (docs/recipes/ijepa.md): encoder dim 96 / depth 4, predictor dim 64 / depth 2
(ijepa ViT-H: 384 / 12); crop scale 0.5-1 and ±10° rotation (ijepa: crop 0.3-1 only).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

import sslkern
from sslkern.train import Method, build_vit, run, sincos_pos_embed, use_sincos_pos_embed
from sslkern.train.health import batch_std, std_verdict
from sslkern.train.views import add_crop_arguments, check_crop_arguments, single_view


def rescale_blocks_(blocks) -> None:
    """ijepa ``fix_init_weight``: block i's attention and MLP output projections ÷ √(2·i)."""
    for i, blk in enumerate(blocks, start=1):
        blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
        blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))


def _block_hw(u, g, scale, aspect):
    """Block (h, w) for one uniform draw u on a g x g grid (ijepa ``_sample_block_size``)."""
    n = int(g * g * (scale[0] + u * (scale[1] - scale[0])))
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    return min(int(round(math.sqrt(n * ar))), g - 1), min(int(round(math.sqrt(n / ar))), g - 1)


class Predictor(nn.Module):
    """ijepa ``VisionTransformerPredictor`` on image-major rows (image b, target block m → row b·T + m)."""

    def __init__(self, embed_dim, grid_hw, dim=64, depth=2, heads=2):
        from timm.models.vision_transformer import Block

        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid_hw), persistent=False)  # (1, N, dim), fixed
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                                            norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, embed_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        rescale_blocks_(self.blocks)

    def forward(self, z, ctx_ids, tgt_ids):
        """z (B, Kc, D) context features at ctx_ids (B, Kc); tgt_ids (B, T, Kt) → (B·T, Kt, D)."""
        b, t, kt = tgt_ids.shape
        n, dim = self.pos_embed.shape[1:]
        x = self.embed(z) + self.pos_embed[0][ctx_ids]                                # context + its positions
        queries = sslkern.gather_tokens(self.mask_token.expand(b, n, dim), tgt_ids, pos_embed=self.pos_embed)
        x = torch.cat([x.repeat_interleave(t, dim=0), queries], dim=1)                # (B·T, Kc + Kt, dim)
        return self.proj(self.norm(self.blocks(x))[:, -kt:])


class IJEPA(Method):
    """I-JEPA: predict the target encoder's features of target blocks from a context block."""

    name, title = "ijepa", "I-JEPA"
    defaults = dict(epochs=100, batch_size=64, lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, warmup_epochs=5,
                    patch_size=4)
    health = {"target_std": "low"}
    presets = {"paper": dict(
        _doc="I-JEPA ViT-H/14 on ImageNet, 300 epochs (ijepa configs/in1k_vith14_ep300.yaml): AdamW, lr 1e-3 at "
             "batch 2,048 (not scaled by the code; scale it linearly with --batch-size), 40 warm-up epochs, weight "
             "decay 0.04 -> 0.4, EMA 0.996 -> 1, predictor 384 wide and 12 deep, 4 targets of scale 0.15-0.2, "
             "context 0.85-1, crop 0.3-1 without flips, no clipping. Not reproduced: the warm-up starting at lr 2e-4 "
             "(here at 0)",
        model="vit_huge_patch14_224", image_size=224, batch_size=2048, epochs=300, lr=1e-3, min_lr=1e-6,
        warmup_epochs=40, weight_decay=0.04, weight_decay_end=0.4, clip_grad=0.0, pred_dim=384, pred_depth=12,
        pred_heads=16, num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0),
        min_keep=10, ema_start=0.996, ema_end=1.0, crop_scale=(0.3, 1.0), degrees=0.0, flip_p=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--pred-dim", type=int, default=64, help="predictor width")
        g.add_argument("--pred-depth", type=int, default=2)
        g.add_argument("--pred-heads", type=int, default=2)
        g.add_argument("--num-targets", type=int, default=2, help="target blocks per image (ijepa 4)")
        g.add_argument("--target-scale", type=float, nargs=2, default=(0.2, 0.3), help="(ijepa 0.15 0.2)")
        g.add_argument("--target-aspect", type=float, nargs=2, default=(0.75, 1.5))
        g.add_argument("--context-scale", type=float, nargs=2, default=(0.85, 1.0))
        g.add_argument("--min-keep", type=int, default=2, help="fewest tokens of a context or target block (ijepa 10)")
        g.add_argument("--ema-start", type=float, default=0.999, help="(ijepa 0.996)")
        g.add_argument("--ema-end", type=float, default=1.0)
        g.add_argument("--collapse-std", type=float, default=0.05, help="verdict: collapsed if target_std <= this (or <= 1/4 of its step-1 value)")
        add_crop_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        check_crop_arguments(a, error)
        for name in ("pred_dim", "pred_depth", "pred_heads", "num_targets"):
            if getattr(a, name) <= 0:
                error(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(a, name)}")
        if a.pred_dim % a.pred_heads:
            error(f"--pred-dim {a.pred_dim} expected a multiple of --pred-heads {a.pred_heads}")
        for name in ("dim", "pred_dim"):
            if getattr(a, name) % 4:
                error(f"--{name.replace('_', '-')} expected a multiple of 4 (2-D sin-cos positions), got {getattr(a, name)}")
        for name in ("target_scale", "context_scale"):
            lo, hi = getattr(a, name)
            if not 0 < lo <= hi <= 1:
                error(f"--{name.replace('_', '-')} expected 0 < lo <= hi <= 1, got {lo} {hi}")
        if not 0 < a.target_aspect[0] <= a.target_aspect[1]:
            error(f"--target-aspect expected 0 < lo <= hi, got {a.target_aspect[0]} {a.target_aspect[1]}")
        g = a.image_size // a.patch_size
        if g < 4:
            error(f"--image-size / --patch-size expected a grid of at least 4x4 for multi-block masks, got {g}x{g}")
        # every target block size ijepa's _sample_block_size can draw must hold more than min_keep tokens
        h, w = min((_block_hw(u / 100, g, a.target_scale, a.target_aspect) for u in range(101)),
                   key=lambda hw: hw[0] * hw[1])
        if a.min_keep < 0 or h * w <= a.min_keep:
            error(f"--target-scale {a.target_scale[0]} {a.target_scale[1]} gives target blocks as small as {h}x{w} on "
                  f"the {g}x{g} grid, not more than --min-keep {a.min_keep} tokens: raise the scale, lower --min-keep "
                  f"or use a finer grid")
        for name in ("ema_start", "ema_end"):
            if not 0 <= getattr(a, name) <= 1:
                error(f"--{name.replace('_', '-')} expected in [0, 1], got {getattr(a, name)}")

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        self.encoder = build_vit(a, data.channels, class_token=False, global_pool="avg")  # no CLS in I-JEPA
        rescale_blocks_(self.encoder.blocks)
        use_sincos_pos_embed(self.encoder)
        self.grid = tuple(self.encoder.patch_embed.grid_size)
        self.predictor = Predictor(a.dim, self.grid, a.pred_dim, a.pred_depth, a.pred_heads)
        self.target_encoder = sslkern.nn.EMATeacher(self.encoder)
        self.register_buffer("initial_target_std", torch.zeros(()))  # step 1's value, for the verdict
        self.view = single_view(a, data)

    def schedule(self, ctx):
        return {"momentum": sslkern.schedules.linear_anneal(ctx.step, ctx.total_steps, self.a.ema_start, self.a.ema_end)}

    def ema_pairs(self):
        return [(self.target_encoder, self.encoder)]

    def encoders(self):
        return {"teacher": self.target_encoder.module, "student": self.encoder}

    def make_masks(self, ctx):
        """I-JEPA multiblock masks, cut to the minimum length over the global batch (as ijepa's collator)."""
        a = self.a
        return ctx.per_sample(sslkern.masks.multiblock_masks, self.grid, num_targets=a.num_targets,
                              target_scale=tuple(a.target_scale), target_aspect=tuple(a.target_aspect),
                              context_scale=tuple(a.context_scale), min_keep=a.min_keep)

    def forward(self, images, ctx):
        images, = ctx.views(images, self.view)
        masks = self.make_masks(ctx)                                                     # 1. masks
        ctx_ids, tgt_ids = masks.context[:, 0], masks.targets                            # (B, Kc), (B, T, Kt)
        with torch.no_grad():                                                            # 2. targets (B, N, D)
            h = self.target_encoder.module.forward_features(images)
            h = sslkern.layer_average_targets([h], layer_norm="layer", final_norm="none")
        z = sslkern.patch.forward_masked(self.encoder, images, ctx_ids)                   # 3. context (B, Kc, D)
        pred = self.predictor(z, ctx_ids, tgt_ids)                                       # 4. predictor (B·T, Kt, D)
        loss = sslkern.masked_regression_loss(pred, h, ids=tgt_ids.flatten(0, 1), beta=1.0,  # 5. smooth-L1 mean
                                              scale=1.0 / h.shape[-1], reduction="mean")
        std = batch_std(h)
        if ctx.step == 0:
            self.initial_target_std.fill_(std)
        return loss, {"target_std": std, "context_tokens": float(ctx_ids.shape[1]),
                      "target_tokens": float(tgt_ids.shape[2])}

    def verdict(self, health):
        return std_verdict(health, "target_std", self.a.collapse_std, initial=float(self.initial_target_std) or None)


def main(argv=None):
    return run(IJEPA, argv)


if __name__ == "__main__":
    main()
