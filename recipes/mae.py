"""MAE pretraining of a small ViT on sslkern ops (He et al. 2021, arXiv:2111.06377).

    python recipes/mae.py                            # digits, 16x16, ~1-2 min on 2 CPU cores
    torchrun --nproc_per_node=2 recipes/mae.py       # data-parallel (gloo on CPU, nccl on GPU)

One step, as in mae ``models_mae.py`` (``forward_encoder`` / ``forward_decoder`` /
``forward_loss``) and ``main_pretrain.py``:
  1. view      random resized crop + small rotation (``sslkern.train.views.single_view``)
  2. mask      random masking at 0.75 (``sslkern.masks.random_mask``: argsort of uniform noise)
  3. encoder   the visible patches only, the fixed sin-cos position add fused into the gather
               (``sslkern.patch.forward_masked`` → ``sslkern.gather_tokens``), CLS + blocks + norm
  4. decoder   a narrow ViT: linear to the decoder width, the encoder output put back on the grid
               with the learned mask token in the removed slots and the decoder's sin-cos
               positions added in the same pass (``sslkern.nn.DecoderInput`` →
               ``sslkern.restore_tokens``), blocks, norm, linear to pixels
  5. loss      per-patch normalised pixels (``norm_pix_loss``), mean squared error per patch,
               averaged over the removed patches (``sslkern.masked_regression_loss``)
  6. step      AdamW (β 0.9 / 0.95, wd 0.05), warm-up then cosine

No teacher: the encoder is evaluated against itself at random init.

Deviations for the small default (16x16 digits, patch 4 → 4x4 = 16 tokens, 4 visible):
encoder dim 96 / depth 4 / 3 heads, decoder dim 64 / depth 2 / 2 heads (mae: 512 / 8 / 16);
lr 2e-3 at batch 128 (mae: blr 1.5e-4 × 256-scaled, i.e. 7.5e-5 at this batch, far too slow
for 1,000 steps); crop scale 0.5-1 and ±10° rotation instead of mae's scale 0.2-1 and flips
(digits are not flip-invariant).
"""
from __future__ import annotations

from functools import partial

from torch import nn

import sslkern
from sslkern.train import Method, build_vit, run, sincos_pos_embed, use_sincos_pos_embed
from sslkern.train.tokenizer import patchify
from sslkern.train.views import add_crop_arguments, check_crop_arguments, single_view


def mae_init_(module: nn.Module) -> None:
    """mae ``initialize_weights``: xavier-uniform linears (and the patch projection as a linear), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):  # patch embedding
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))


class Decoder(nn.Module):
    """mae ``forward_decoder``: embed → restore with mask token (+ sin-cos positions) → blocks → norm → pixels."""

    def __init__(self, embed_dim, grid_hw, out_dim, dim=64, depth=2, heads=2):
        from timm.models.vision_transformer import Block

        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.input = sslkern.nn.DecoderInput(dim, num_prefix_tokens=1, mode="mask_token",
                                             pos_embed=sincos_pos_embed(dim, grid_hw, num_prefix_tokens=1))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                                            norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, latent, ids_restore):
        x = self.input(self.embed(latent), ids_restore)    # (B, 1 + N, dim): visible + mask tokens, positions added
        return self.pred(self.norm(self.blocks(x)))[:, 1:]  # (B, N, p·p·C), CLS dropped


class MAE(Method):
    """MAE: reconstruct the normalised pixels of randomly masked patches from the visible ones."""

    name, title = "mae", "MAE"
    defaults = dict(epochs=200, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=5)
    betas = (0.9, 0.95)
    presets = {"paper": dict(
        _doc="MAE ViT-B/16 on ImageNet (mae PRETRAIN.md and main_pretrain.py; the 512-wide, 8-block, 16-head "
             "decoder of models_mae.py): AdamW (0.9, 0.95), lr 1.5e-4 x batch / 256 (here for batch 4,096; scale it "
             "with --batch-size), 40 warm-up of 800 epochs, crop 0.2-1 + flip, normalised-pixel targets. Not "
             "reproduced: weight decay on the CLS and mask tokens (mae's add_weight_decay decays them; here they "
             "are excluded)",
        model="vit_base_patch16_224", image_size=224, batch_size=4096, epochs=800, lr=2.4e-3, min_lr=0.0,
        warmup_epochs=40, weight_decay=0.05, clip_grad=0.0, mask_ratio=0.75, decoder_dim=512, decoder_depth=8,
        decoder_heads=16, norm_pix_loss=True, crop_scale=(0.2, 1.0), degrees=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--mask-ratio", type=float, default=0.75)
        g.add_argument("--decoder-dim", type=int, default=64)
        g.add_argument("--decoder-depth", type=int, default=2)
        g.add_argument("--decoder-heads", type=int, default=2)
        g.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                       help="regress raw pixels instead of per-patch normalised ones")
        add_crop_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        check_crop_arguments(a, error)
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(a, name) <= 0:
                error(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(a, name)}")
        if not 0 < a.mask_ratio < 1:
            error(f"--mask-ratio expected in (0, 1), got {a.mask_ratio}")
        n = (a.image_size // a.patch_size) ** 2
        if int(n * (1 - a.mask_ratio)) < 1:
            error(f"--mask-ratio {a.mask_ratio} keeps no patch of the {n}")
        if a.decoder_dim % a.decoder_heads:
            error(f"--decoder-dim {a.decoder_dim} expected a multiple of --decoder-heads {a.decoder_heads}")
        for name in ("dim", "decoder_dim"):
            if getattr(a, name) % 4:
                error(f"--{name.replace('_', '-')} expected a multiple of 4 (2-D sin-cos positions), got {getattr(a, name)}")

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        self.encoder = build_vit(a, data.channels)
        self.grid = tuple(self.encoder.patch_embed.grid_size)
        self.decoder = Decoder(a.dim, self.grid, a.patch_size ** 2 * data.channels, a.decoder_dim, a.decoder_depth,
                               a.decoder_heads)
        mae_init_(self)
        use_sincos_pos_embed(self.encoder)  # fixed, not trained
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.decoder.input.mask_token, std=0.02)
        self.view = single_view(a, data)

    def encoders(self):
        return {"encoder": self.encoder}

    def target(self, images):
        """mae ``forward_loss`` targets: patchified pixels, normalised per patch with ``norm_pix_loss``."""
        t = patchify(images, self.a.patch_size)
        if self.a.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        return t

    def forward(self, images, ctx):
        a = self.a
        images, = ctx.views(images, self.view)                                          # 1. view
        masks = ctx.per_sample(sslkern.masks.random_mask, self.grid[0] * self.grid[1], a.mask_ratio)  # 2. mask
        ids_keep, ids_restore, mask = masks.ids_keep, masks.ids_restore, masks.mask
        latent = sslkern.patch.forward_masked(self.encoder, images, ids_keep)            # 3. encoder (B, 1+Nk, D)
        pred = self.decoder(latent, ids_restore)                                         # 4. decoder (B, N, p·p·C)
        target = self.target(images)                                                     # 5. loss: per-patch MSE,
        loss = sslkern.masked_regression_loss(pred, target, mask, scale=1.0 / pred.shape[-1],  # mean over removed
                                              reduction="mean")                          # patches
        return loss, {}


def main(argv=None):
    return run(MAE, argv)


if __name__ == "__main__":
    main()
