"""CL + MIM: one ViT trained with (1 − λ)·SimMIM + λ·MoCo v3 (Park et al. 2023, arXiv:2305.00729).

    python recipes/cl_mim.py                          # digits, 16x16, a few minutes on one CPU core
    python recipes/cl_mim.py --cl-weight 1            # MoCo v3 alone; --cl-weight 0: SimMIM alone
    python recipes/cl_mim.py --preset paper --data PATH   # ViT-B/16, Park et al.'s ImageNet settings
    torchrun --nproc_per_node=2 recipes/cl_mim.py     # data-parallel; keys of every rank are negatives

Park et al.'s "simplest way to harmonize CL and MIM" (the authors' sketch in
github.com/naver-ai/cl-vs-mim/issues/4: one ViT encoder ``base`` shared by a SimMIM head and
MoCo's heads, a momentum encoder, ``loss = (1 − λ)·loss_mim + λ·loss_cl``; built on
microsoft/SimMIM). One step:
  1. views     three views of every image, rendered in one call (``ctx.views``): one for
               SimMIM (random resized crop, area 0.67–1, as SimMIM's ``SimMIMTransform``) and
               two for MoCo v3 (the MoCo recipe's, ``sslkern.train.views.two_views``)
  2. mask      SimMIM's ``MaskGenerator``: ``ceil(0.6·n)`` of the n mask patches chosen at
               random per image (``sslkern.masks.random_mask`` through ``ctx.per_sample``),
               each mask patch covering (mask patch / ViT patch)² tokens
  3. SimMIM    the ViT on the whole masked view: patch embeddings of masked patches replaced
               by a learned mask token (``x·(1 − w) + mask_token·w``), CLS, positions,
               blocks, norm; the patch tokens as a (D, h, w) map → 1x1 conv to p²·C channels
               → PixelShuffle(p): the image; L1 on the masked pixels, divided by the masked
               pixel count and the channels (``SimMIM.forward``)
  4. MoCo v3   the same ViT on both MoCo views → projector → predictor: q1, q2; the momentum
               encoder (EMA of ViT + projector): k1, k2; ``ctr(q1, k2) + ctr(q2, k1)`` with
               ctr = 2τ·InfoNCE (``sslkern.nn.InfoNCELoss`` → ``sslkern.info_nce_loss``)
  5. loss      (1 − λ)·SimMIM + λ·MoCo, λ = ``--cl-weight``
  6. step      AdamW, warm-up + cosine; momentum encoder ← EMA (m cosine 0.99 → 1)

Health: ``embedding_std`` (MoCo projector outputs, √D·per-dimension std of unit vectors: → 0
on collapse), ``mim_gain`` (1 − the masked L1 over the masked L1 of predicting the
training-set mean, i.e. 0 after normalisation: → 0 when the reconstruction ignores the visible
context), and per layer the mean attention distance of the first MoCo view's batch
(``attn_dist_<layer>``, pixels; cl-vs-mim ``self_attention_analysis.ipynb``: the attention-
weighted distance from each patch query to the patch keys, CLS left out, averaged over
queries, heads and images). Park et al. find CL's later layers attend globally (long
distances) and MIM's locally.

λ = 0.75 by default: the best kNN of a sweep over 0, 0.25, 0.5, 0.75, 1 on the digits
(docs/recipes/cl_mim.md). Deviations for the small default: ViT dim 96 / depth 4
/ 3 heads, patch 4 (16 tokens), mask patch 4 (SimMIM ViT-B: 32 at patch 16); MoCo MLP width 512
and output 128 (moco-v3: 4096 and 256), projector input the mean patch token; the patch
projection is trained (moco-v3 freezes it; SimMIM trains it); views with ±10° rotation and no
flips on digits; learned position embeddings.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.joint import (add_view_arguments, check_view_arguments, encoder, joint_health, mlp,
                                 positive_int_options, two_views)
from sslkern.masks import simmim_mask
from sslkern.train.health import AttentionDistance
from sslkern.train.views import single_view


class SimMIMHead(nn.Module):
    """SimMIM's decoder: patch tokens as a (D, h, w) map → 1x1 conv to p²·C → PixelShuffle(p)."""

    def __init__(self, dim: int, patch: int, in_chans: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, patch * patch * in_chans, 1)
        self.shuffle = nn.PixelShuffle(patch)

    def forward(self, tokens: torch.Tensor, grid: int) -> torch.Tensor:
        b, n, d = tokens.shape
        return self.shuffle(self.conv(tokens.transpose(1, 2).reshape(b, d, grid, grid)))


def masked_l1(images: torch.Tensor, rec: torch.Tensor, token_mask: torch.Tensor, patch: int) -> torch.Tensor:
    """SimMIM ``forward`` loss: |x − x_rec| summed over masked pixels, / (masked pixels + 1e-5) / C."""
    b, c, h, w = images.shape
    m = token_mask.view(b, 1, h // patch, 1, w // patch, 1).expand(b, 1, h // patch, patch, w // patch, patch)
    m = m.reshape(b, 1, h, w).to(images.dtype)
    return ((images - rec).abs() * m).sum() / (m.sum() + 1e-5) / c


class CLMIM(Method):
    """One ViT, two objectives: SimMIM on a masked view, MoCo v3 between two other views."""

    name, title = "cl_mim", "CL + MIM"
    defaults = dict(epochs=30, batch_size=128, lr=1e-3, weight_decay=0.1, warmup_epochs=5, eval_every=10)
    health = {"embedding_std": "low", "mim_gain": "low"}
    presets = {"paper": dict(
        model="vit_base_patch16_224", image_size=224, epochs=300, batch_size=4096, lr=2.4e-3, weight_decay=0.1,
        warmup_epochs=40, cl_weight=0.2, mask_ratio=0.6, mask_patch=32, mim_scale=(0.67, 1.0), hidden_dim=4096,
        out_dim=256, temperature=0.2, momentum_encoder=0.99, crop_scale=(0.08, 1.0), degrees=0.0, pool="cls",
        eval_every=20,
        _doc="Park et al. 2023 (ViT-B/16, L = (1 - λ)·SimMIM + λ·MoCo v3): MoCo v3's ViT-B schedule "
             "(moco-v3 CONFIG.md: 300 epochs, batch 4096, AdamW lr 1.5e-4 x 4096/256, wd 0.1, 40 warm-up epochs, "
             "τ 0.2, m 0.99 cosine, MLP 4096 / 256) with SimMIM's mask (simmim_pretrain__vit_base__img224__800ep.yaml: "
             "32-px mask patches, ratio 0.6, crop 0.67-1; its 800 epochs not used); λ 0.2, a low CL weight "
             "from the range of Park et al.'s Fig. 12 (no published config: set --cl-weight from the figure)")}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--cl-weight", type=float, default=0.75,
                       help="λ: loss = (1 − λ)·SimMIM + λ·MoCo v3 (0 = SimMIM alone, 1 = MoCo alone; the digits "
                            "sweep over 0, 0.25, 0.5, 0.75, 1 is in docs/recipes/cl_mim.md)")
        g.add_argument("--mask-ratio", type=float, default=0.6, help="share of mask patches masked (SimMIM: 0.6)")
        g.add_argument("--mask-patch", type=int, default=4,
                       help="mask patch size in pixels, a multiple of --patch-size (SimMIM ViT: 32 at patch 16)")
        g.add_argument("--mim-scale", type=float, nargs=2, default=(0.67, 1.0),
                       help="SimMIM view: random resized crop area range (SimMIM: 0.67 1)")
        g.add_argument("--hidden-dim", type=int, default=512, help="MoCo projector / predictor width (moco-v3: 4096)")
        g.add_argument("--out-dim", type=int, default=128, help="MoCo output width (moco-v3: 256)")
        g.add_argument("--temperature", type=float, default=0.2, help="MoCo τ (moco-v3 ViT: 0.2)")
        g.add_argument("--momentum-encoder", type=float, default=0.99, help="m0, cosine to 1 (moco-v3 ViT: 0.99)")
        add_view_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        positive_int_options(a, error, ("hidden_dim", "out_dim", "mask_patch"))
        if not 0 <= a.cl_weight <= 1:
            error(f"--cl-weight expected in [0, 1], got {a.cl_weight}")
        if not 0 < a.mask_ratio < 1:
            error(f"--mask-ratio expected in (0, 1), got {a.mask_ratio}")
        if a.mask_patch % a.patch_size or a.image_size % a.mask_patch:
            error(f"--mask-patch expected a multiple of --patch-size {a.patch_size} dividing --image-size "
                  f"{a.image_size}, got {a.mask_patch}")
        n = (a.image_size // a.mask_patch) ** 2
        if math.ceil(a.mask_ratio * n) >= n:
            error(f"--mask-ratio {a.mask_ratio} masks all {n} mask patches of {a.mask_patch} pixels")
        lo, hi = a.mim_scale
        if not 0 < lo <= hi <= 1:
            error(f"--mim-scale expected 0 < lo <= hi <= 1, got {lo} {hi}")
        if a.temperature <= 0:
            error(f"--temperature expected > 0, got {a.temperature}")
        if not 0 <= a.momentum_encoder <= 1:
            error(f"--momentum-encoder expected in [0, 1], got {a.momentum_encoder}")
        check_view_arguments(a, error)

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        vit = build_vit(a, data.channels)
        self.grid = vit.patch_embed.grid_size[0]
        self.mask_token = nn.Parameter(torch.zeros(a.dim))                     # SimMIM: trunc_normal(0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.mim_head = SimMIMHead(a.dim, a.patch_size, data.channels)
        self.base = encoder(vit, mlp(a.dim, a.hidden_dim, a.out_dim, 3, last_bn=True), a.pool)
        self.predictor = mlp(a.out_dim, a.hidden_dim, a.out_dim, 2, last_bn=True)
        self.momentum = sslkern.nn.EMATeacher(self.base)
        self.cl_loss = sslkern.nn.InfoNCELoss(a.temperature, gather_distributed=True, scale=2 * a.temperature)
        # the SimMIM crop (--mim-scale; single_view itself reads MoCo's --crop-scale), then MoCo's
        # two views: one render call
        mim_crop = [dataclasses.replace(s, scale=tuple(a.mim_scale)) for s in single_view(a, data)]
        self.view_specs = mim_crop + two_views(a, data)
        self.attention = AttentionDistance(vit)

    def schedule(self, ctx):
        return {"momentum": sslkern.schedules.cosine_schedule(ctx.step, ctx.total_steps, self.a.momentum_encoder, 1.0)}

    def ema_pairs(self):
        return [(self.momentum, self.base)]

    def encoders(self):
        return {"teacher": self.momentum.module.backbone, "student": self.base.backbone}

    def views(self, images, ctx):
        """(SimMIM view, its token mask, [MoCo view 1, MoCo view 2]) of this rank's images."""
        mim_view, *moco_views = ctx.views(images, self.view_specs)
        scale = self.a.mask_patch // self.a.patch_size
        mask = ctx.per_sample(simmim_mask, self.grid // scale, scale, self.a.mask_ratio)
        return mim_view, mask, moco_views

    def simmim(self, images, mask):
        """(L1 on masked pixels, the same L1 of predicting 0 = the training-set mean)."""
        vit = self.base.backbone
        x = vit.patch_embed(images)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w                      # SimMIM: mask tokens in the encoder
        x = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(x))))
        rec = self.mim_head(x[:, vit.num_prefix_tokens:], self.grid)
        loss = masked_l1(images, rec, mask, self.a.patch_size)
        with torch.no_grad():
            baseline = masked_l1(images, torch.zeros_like(images), mask, self.a.patch_size)
        return loss, baseline

    def forward(self, images, ctx):
        lam = self.a.cl_weight
        mim_view, mask, moco_views = self.views(images, ctx)                   # 1.+2. three views, mask
        loss_mim, baseline = self.simmim(mim_view, mask)                       # 3. SimMIM
        z = self.base(moco_views)                                              # 4. MoCo v3
        attn = self.attention.read(mim_view.shape[0])                          #    (first view's attention)
        q1, q2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum(moco_views).chunk(2)
        loss_cl = self.cl_loss(q1, k2) + self.cl_loss(q2, k1)
        loss = (1 - lam) * loss_mim + lam * loss_cl                            # 5. the linear combination
        return loss, {"loss_mim": loss_mim.detach(), "loss_cl": loss_cl.detach(),
                      "mim_gain": 1 - loss_mim.detach() / baseline.clamp_min(1e-12), **joint_health(z), **attn}

    def verdict(self, health):
        std, gain = health.get("embedding_std"), health.get("mim_gain")
        if std is None or gain is None:
            return False, "embedding_std / mim_gain not logged"
        parts, collapsed = [], False
        lam = self.a.cl_weight
        if lam == 0:
            parts.append("MoCo off (λ = 0)")
        elif std < 0.1:
            collapsed = True
            parts.append(f"MoCo embeddings collapsed (embedding std {std:.3f} < 0.1)")
        else:
            parts.append(f"MoCo not collapsed (embedding std {std:.3f} ≥ 0.1)")
        if lam == 1:
            parts.append("SimMIM off (λ = 1)")
        elif gain <= 0.05:
            collapsed = True
            parts.append(f"SimMIM not using the context (mim_gain {gain:.3f} ≤ 0.05)")
        else:
            parts.append(f"SimMIM reconstructs (mim_gain {gain:.3f})")
        return collapsed, "; ".join(parts)


def main(argv=None):
    return run(CLMIM, argv)


if __name__ == "__main__":
    main()
