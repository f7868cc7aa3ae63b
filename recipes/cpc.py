"""CPC v2 pretraining of a small ViT on sslkern ops (Hénaff et al. 2019, arXiv:1905.09272).

    python recipes/cpc.py                         # digits, 16x16, a few minutes on one CPU core
    python recipes/cpc.py --preset paper --data PATH   # the paper's patch grid on a ViT-S/16 (docs/recipes/cpc.md)
    torchrun --nproc_per_node=2 recipes/cpc.py    # data-parallel; targets of every rank are negatives

One step, as the paper's appendix A.2 pseudo-code (``CPC`` and ``pixelCNN``; there is no
official code):
  1. view      random resized crop + small rotation of the image (``sslkern.train.views.single_view``)
  2. patches   a grid of overlapping patches (8x8 pixels at stride 4: 3x3 patches on 16x16)
  3. latents   every patch encoded on its own by the ViT (one sequence per patch: no patch
               sees another), its tokens after the final LayerNorm averaged: z (B, D, G, G)
  4. context   a masked-convolution network that looks only upward: five (here
               ``--context-blocks``) residual blocks of 1x1 conv, ReLU, 1x3 conv, one row of
               zero padding on top and a 2x1 conv, ReLU, 1x1 conv; ReLU on the sum. The
               context of row r sees the latents of rows <= r only
  5. targets   a 1x1 convolution of the LATENTS to 64 dimensions (no context)
  6. loss      for each row offset k (``--offsets``): a 1x1 convolution of the context
               (one per k) × 0.1 predicts, from row r, the target of row r + k in the same
               column; InfoNCE against every target of every image of the global batch, the
               label of the prediction at (image b, row r, column c) being
               ``b·G·G + (r + k)·G + c`` (``sslkern.nn.CPCLoss``: the targets of every rank
               gathered, ``sslkern.info_nce_loss(pos=..., normalize=False)``, tiled: no (rows,
               targets) logits tensor); the offsets' losses are summed
  7. step      AdamW, warm-up then cosine

Layer norm, not batch norm, as CPC v2: the ViT's own LayerNorms (the context network has no
normalisation, as the pseudo-code). Evaluation and export: the encoder is a timm ViT for one
patch; on a whole image it encodes the grid of patches one by one and returns all their
tokens (:class:`PatchGridViT`), so the kNN reads the mean over every patch's tokens — the
features CPC v2 evaluates (the latent grid), pooled.

Health: top-1 accuracy of the InfoNCE task (``cpc_acc``) against chance (1 / number of
targets), the wrong guesses split into ones that picked another patch of the same image
(``wrong_same_image``) and ones that picked a patch of another image
(``wrong_other_image``), and ``latent_std`` (batch std of the L2-normalised pooled latents:
→ 0 when every image gets one latent).

Deviations for the small default (16x16 digits; docs/recipes/cpc.md): a ViT (dim 96 / depth
4 / 3 heads, patch 4, so 2x2 tokens per 8x8 patch) instead of a ResNet-161; a 3x3 grid
(paper: 7x7 of 64-pixel patches at stride 32); offset 2 only, the first one whose patch does
not overlap the context row (paper: offset 3 on its 7x7 grid); context width 128 and 2
blocks (paper: 256 and 5); no per-patch augmentation (paper: colour dropping, flips, jitter
per patch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import sslkern
from sslkern.train import Method, run
from sslkern.train.health import batch_std
from sslkern.train.views import add_crop_arguments, check_crop_arguments, single_view


def grid_size(image_size: int, patch: int, stride: int) -> int:
    return (image_size - patch) // stride + 1


def patch_grid(images: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) → (B, G, G, C, patch, patch): the patches at ``stride``, row-major."""
    x = images.unfold(2, patch, stride).unfold(3, patch, stride)        # (B, C, G, G, p, p)
    return x.permute(0, 2, 3, 1, 4, 5)


class PatchGridViT(VisionTransformer):
    """A timm ``VisionTransformer`` for one ``patch``×``patch`` patch (no class token, so every
    token is a patch token). On an image of the patch size it is the plain ViT; on a larger
    image ``forward_features`` cuts the grid of patches at ``stride``, encodes each patch as
    its own sequence and returns the tokens of all patches side by side, (B, G·G·T, D), so no
    token attends across patches. The state dict is the plain ViT's (export rebuilds it)."""

    def __init__(self, patch: int, stride: int, **kwargs):
        super().__init__(**kwargs)
        self.grid_patch, self.grid_stride = patch, stride
        self._sslkern_timm_kwargs = kwargs

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, G, G, T, D): every patch's tokens after the final norm."""
        b = images.shape[0]
        patches = patch_grid(images, self.grid_patch, self.grid_stride)
        g = patches.shape[1]
        tokens = super().forward_features(patches.reshape(b * g * g, *patches.shape[3:]))
        return tokens.reshape(b, g, g, *tokens.shape[1:])

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(self.patch_embed.img_size):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        t = self.patch_tokens(x)
        return t.reshape(t.shape[0], -1, t.shape[-1])


class UpwardContext(nn.Module):
    """CPC v2's ``pixelCNN``: residual blocks whose output at row r depends on rows <= r only.

    Block: 1x1 conv → ReLU → 1x3 conv (columns, zero-padded) → one zero row on top and a 2x1
    conv (rows r − 1 and r) → ReLU → 1x1 conv back to the input width, added to the input;
    ReLU after the last block."""

    def __init__(self, dim: int, hidden: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1)),
            nn.ZeroPad2d((0, 0, 1, 0)), nn.Conv2d(hidden, hidden, (2, 1)), nn.ReLU(),
            nn.Conv2d(hidden, dim, 1)) for _ in range(blocks))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            z = z + block(z)
        return F.relu(z)


def cpc_labels(batch: int, grid: int, offset: int, device) -> torch.Tensor:
    """Row of the target of each prediction (image b, row r < G − offset, column c), rows
    image-major then row-major: ``b·G·G + (r + offset)·G + c`` (the pseudo-code's ``labels``)."""
    rows = grid - offset
    i = torch.arange(batch * rows * grid, device=device)
    b, rest = i // (rows * grid), i % (rows * grid)
    return b * grid * grid + offset * grid + rest


class CPC(Method):
    """CPC v2: predict the latents of patches below from a context that sees only the rows above."""

    name, title = "cpc", "CPC v2"
    defaults = dict(epochs=50, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=5)
    health = {"cpc_acc": "low", "latent_std": "low"}
    presets = {"paper": dict(
        model="vit_small_patch16_224", image_size=256, cpc_patch=64, cpc_stride=32, offsets=[3], target_dim=64,
        context_dim=256, context_blocks=5, pred_scale=0.1, epochs=200, batch_size=512, lr=3e-4, weight_decay=0.05,
        warmup_epochs=10, crop_scale=(0.73, 0.73), degrees=0.0, eval_every=20,
        _doc="CPC v2 (Henaff et al. 2019, appendix A.2 pseudo-code) on a ViT-S/16 per patch: 7x7 grid of 64-px "
             "patches at stride 32 (256 px), offset 3, targets 64-d, context 5 blocks of 256, predictions x 0.1, "
             "200 epochs at batch 512; the ViT, AdamW lr 3e-4 (1.5e-4 x 512/256), wd 0.05 and 10 warm-up epochs "
             "are sslkern's (paper: ResNet-161); per-patch augmentation not reproduced (docs/recipes/cpc.md)")}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--cpc-patch", type=int, default=8, help="pixels per side of one patch (paper: 64)")
        g.add_argument("--cpc-stride", type=int, default=4, help="stride of the patch grid (paper: 32, half a patch)")
        g.add_argument("--offsets", type=int, nargs="+", default=[2],
                       help="row offsets predicted: row r predicts row r + k (paper: 3 on 7x7; here 2, the first "
                            "patch that does not overlap the context's row)")
        g.add_argument("--target-dim", type=int, default=64, help="width of targets and predictions (paper: 64)")
        g.add_argument("--context-dim", type=int, default=128, help="hidden width of the context blocks (paper: 256)")
        g.add_argument("--context-blocks", type=int, default=2, help="residual blocks of the context network (paper: 5)")
        g.add_argument("--pred-scale", type=float, default=0.1, help="predictions × this (paper: emb_scale 0.1)")
        add_crop_arguments(g, scale=(0.5, 1.0), degrees=10.0)

    @staticmethod
    def check_arguments(a, error):
        for name in ("cpc_patch", "cpc_stride", "target_dim", "context_dim", "context_blocks"):
            if getattr(a, name) <= 0:
                error(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(a, name)}")
        if a.cpc_patch > a.image_size or a.cpc_patch % a.patch_size:
            error(f"--cpc-patch expected a multiple of --patch-size {a.patch_size} no larger than --image-size "
                  f"{a.image_size}, got {a.cpc_patch}")
        if (a.image_size - a.cpc_patch) % a.cpc_stride:
            error(f"--cpc-stride {a.cpc_stride} expected to tile --image-size {a.image_size} with patches of "
                  f"{a.cpc_patch} (image − patch a multiple of the stride)")
        g = grid_size(a.image_size, a.cpc_patch, a.cpc_stride)
        bad = [k for k in a.offsets if not 1 <= k < g]
        if bad or len(set(a.offsets)) != len(a.offsets):
            error(f"--offsets expected distinct row offsets in [1, {g - 1}] (a {g}x{g} patch grid), got "
                  f"{' '.join(map(str, a.offsets))}")
        if a.pred_scale <= 0:
            error(f"--pred-scale expected > 0, got {a.pred_scale}")
        check_crop_arguments(a, error)

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        self.grid = grid_size(a.image_size, a.cpc_patch, a.cpc_stride)
        self.encoder = PatchGridViT(a.cpc_patch, a.cpc_stride, img_size=a.cpc_patch, patch_size=a.patch_size,
                                    in_chans=data.channels, embed_dim=a.dim, depth=a.depth, num_heads=a.heads,
                                    num_classes=0, class_token=False, global_pool="avg",
                                    **({"drop_path_rate": a.drop_path} if a.drop_path else {}))
        self.context = UpwardContext(a.dim, a.context_dim, a.context_blocks)
        self.target = nn.Conv2d(a.dim, a.target_dim, 1)
        self.predict = nn.ModuleList(nn.Conv2d(a.dim, a.target_dim, 1) for _ in a.offsets)
        self.loss = sslkern.nn.CPCLoss(self.grid ** 2)      # every target of the global batch, τ = 1
        self.view = single_view(a, data)                    # --crop-scale, --degrees, --flip-p
        self.export_extra = {"cpc_patch": a.cpc_patch, "cpc_stride": a.cpc_stride}

    def encoders(self):
        return {"encoder": self.encoder}

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, D, G, G): each patch encoded alone, its tokens averaged."""
        return self.encoder.patch_tokens(images).mean(3).permute(0, 3, 1, 2)

    def forward(self, images, ctx):
        a, g = self.a, self.grid
        images, = ctx.views(images, self.view)                                             # 1. view
        b = images.shape[0]
        z = self.latents(images)                                                           # 2.+3. (B, D, G, G)
        c = self.context(z)                                                                # 4. upward context
        targets = self.target(z).permute(0, 2, 3, 1).reshape(b * g * g, -1)               # 5. (B·G·G, 64)
        preds = [(head(c)[:, :, :g - k] * a.pred_scale).permute(0, 2, 3, 1).reshape(-1, a.target_dim)
                 for k, head in zip(a.offsets, self.predict)]                              # 6. per offset
        labels = [cpc_labels(b, g, k, images.device) for k in a.offsets]
        loss, stats = self.loss(preds, targets, labels)                                    #    InfoNCE, summed
        pooled = F.normalize(z.detach().mean((2, 3)), dim=-1)
        return loss, {"cpc_acc": stats["accuracy"], "cpc_chance": stats["chance"],
                      "wrong_same_image": stats["wrong_same_image"], "wrong_other_image": stats["wrong_other_image"],
                      "latent_std": batch_std(pooled)}

    def verdict(self, health):
        acc, std = health.get("cpc_acc"), health.get("latent_std")
        if acc is None or std is None:
            return False, "cpc_acc / latent_std not logged"
        chance = 1.0 / (self.a.batch_size * self.grid ** 2)
        if std < 0.01:
            return True, f"collapsed: latent_std {std:.4f} (every image gets the same latent)"
        if acc <= 2 * chance:
            return True, f"not learning: InfoNCE accuracy {acc:.4f} at chance {chance:.4f}"
        return False, (f"not collapsed: InfoNCE accuracy {acc:.3f} (chance {chance:.4f}), "
                       f"latent_std {std:.3f}")


def main(argv=None):
    return run(CPC, argv)


if __name__ == "__main__":
    main()
