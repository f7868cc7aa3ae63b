"""BEiT pretraining of a small ViT (Bao et al. 2021, arXiv:2106.08254), on the shared loop.

    python recipes/beit.py                           # digits, 16x16, a few minutes on 2 CPU cores
    python recipes/beit.py --tokenizer PATH          # another tokenizer file (PatchKMeansTokenizer.save)
    torchrun --nproc_per_node=2 recipes/beit.py      # data-parallel (gloo on CPU, nccl on GPU)

One step, as unilm ``beit/engine_for_pretraining.py`` with ``modeling_pretrain.py`` and
``masking_generator.py``:
  1. view      random resized crop + small rotation (``sslkern.train.views.single_view``); the
               tokenizer sees the same view (BEiT: the same crop at the dVAE's resolution)
  2. tokens    one visual token per patch from the frozen tokenizer (BEiT: DALL-E dVAE
               ``get_codebook_indices``; here k-means on the pixels of the 3x3-patch window around each patch)
  3. mask      blockwise masking of ~40 % of the patches (``sslkern.masks.block_mask``: blocks
               of area U(min, remaining), log-uniform aspect 0.3-3.3, as ``MaskingGenerator``)
  4. encoder   patch embeddings of masked patches replaced by a learned mask token
               (``x·(1−w) + mask_token·w``), CLS, positions, blocks, norm
  5. loss      ``lm_head`` (linear to the vocabulary) on the masked patches only, cross-entropy
               against their visual tokens (plain ``F.cross_entropy``: no sslkern op computes a
               hard-label softmax cross-entropy; the rows are picked by boolean indexing as BEiT)
  6. step      AdamW (β 0.9 / 0.999, wd 0.05, clip 3), warm-up then cosine
Health: ``mlm_gain`` (masked-token accuracy minus the accuracy of always predicting the
batch's most common token), ``pred_perplexity`` (how many distinct tokens the argmax
predictions use) and ``token_perplexity`` (codebook usage of the targets).

Deviations (docs/recipes/beit.md): the tokenizer is fitted on the training set before the
run (k-means, ``--vocab-size`` 64 codes, ``--tokenizer-context`` 1 patch of neighbourhood per
side, cached as OUT/tokenizer.safetensors) because DALL-E's
dVAE cannot be downloaded here; 16x16 digits, patch 4 → 16 tokens, 6 masked, blocks of at
least 2 patches (BEiT: 75 of 196, blocks ≥ 16); learned absolute positions of timm's ViT and
no layer scale by default (``--layer-scale``; BEiT: relative position bias, layer scale 0.1).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import sslkern
from sslkern.train import Method, build_vit, run
from sslkern.train.evaluate import render_images
from sslkern.train.tokenizer import PatchKMeansTokenizer, perplexity
from sslkern.train.views import add_crop_arguments, check_crop_arguments, single_view

TOKENIZER_FIT_IMAGES = 20_000  # a seeded subset of the training set on large datasets (the digits: all)


def beit_init_(model: nn.Module, blocks, std: float = 0.02) -> None:
    """modeling_pretrain ``_init_weights`` + ``fix_init_weight``: truncated-normal (±std) linears and
    patch projection, zero biases, unit LayerNorms, then block l's output projections / √(2l)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-std, b=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer_id, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_((2.0 * layer_id) ** 0.5)
            blk.mlp.fc2.weight.div_((2.0 * layer_id) ** 0.5)


class MaskedImageModel(nn.Module):
    """modeling_pretrain ``VisionTransformerForMaskedImageModeling`` on a timm ViT."""

    def __init__(self, vit, vocab_size):
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        self.lm_head = nn.Linear(vit.embed_dim, vocab_size)
        beit_init_(self, vit.blocks)
        for t in (vit.pos_embed, vit.cls_token, self.mask_token):
            nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)

    def forward(self, images, bool_masked_pos):
        """images (B, C, H, W), bool_masked_pos (B, N) → logits (M, vocab) of the M masked patches."""
        vit = self.vit
        x = vit.patch_embed(images)                                        # (B, N, D)
        w = bool_masked_pos.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token * w                              # masked patches → mask token
        x = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(x))))           # CLS + positions, blocks, norm
        return self.lm_head(x[:, vit.num_prefix_tokens:][bool_masked_pos])


class BEiT(Method):
    """BEiT: predict the visual tokens of blockwise-masked patches."""

    name, title = "beit", "BEiT"
    defaults = dict(epochs=140, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=5, clip_grad=3.0)
    betas = (0.9, 0.999)
    health = {"mlm_gain": "low", "pred_perplexity": "low", "token_perplexity": "low"}
    presets = {"paper": dict(
        _doc="BEiT ViT-B/16 on ImageNet-1k, 800 epochs (Bao et al. 2021, appendix table of pre-training "
             "hyperparameters; unilm beit/run_beit_pretraining.py): AdamW (0.9, 0.999), lr "
             "1.5e-3 at batch 2,048 (not scaled by the code; scale it linearly with --batch-size), 10 warm-up "
             "epochs, min lr 1e-5, clip 3, stochastic depth 0.1, layer scale 0.1, 75 of 196 patches masked in blocks "
             "of >= 16, 8,192 visual tokens, crop 0.08-1 + flip. Not reproduced: the DALL-E dVAE tokenizer at 112 "
             "pixels (a k-means tokenizer of 8,192 codes on the same view stands in), the shared relative position "
             "bias, colour jitter 0.4",
        model="vit_base_patch16_224", drop_path=0.1, layer_scale=0.1, image_size=224, batch_size=2048, epochs=800,
        lr=1.5e-3, min_lr=1e-5, warmup_epochs=10, weight_decay=0.05, clip_grad=3.0, mask_ratio=0.3827,
        min_block_patches=16, vocab_size=8192, crop_scale=(0.08, 1.0), degrees=0.0, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--mask-ratio", type=float, default=0.4, help="share of patches masked per image (BEiT 75/196)")
        g.add_argument("--min-block-patches", type=int, default=2, help="smallest masking block (BEiT 16 of 196)")
        g.add_argument("--vocab-size", type=int, default=64, help="tokenizer codes (k-means centroids)")
        g.add_argument("--kmeans-iters", type=int, default=30)
        g.add_argument("--tokenizer-context", type=int, default=1,
                       help="patches of neighbourhood per side each token sees (1: the 3x3-patch window; 0: the patch only)")
        g.add_argument("--layer-scale", type=float, default=0.0, help="layer-scale init (BEiT pretraining 0.1; 0 = none)")
        g.add_argument("--tokenizer", default=None,
                       help="load this tokenizer file instead of fitting one (default: fit, cached as OUT/tokenizer.safetensors)")
        add_crop_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        check_crop_arguments(a, error)
        n = (a.image_size // a.patch_size) ** 2
        if not 0 < a.mask_ratio < 1:
            error(f"--mask-ratio expected in (0, 1), got {a.mask_ratio}")
        if int(n * a.mask_ratio) < 1:
            error(f"--mask-ratio {a.mask_ratio} masks no patch of the {n}")
        if not 1 <= a.min_block_patches <= int(n * a.mask_ratio):
            error(f"--min-block-patches expected in [1, {int(n * a.mask_ratio)}] (the masked count), got {a.min_block_patches}")
        if a.vocab_size < 2:
            error(f"--vocab-size expected >= 2, got {a.vocab_size}")
        if a.tokenizer_context < 0:
            error(f"--tokenizer-context expected >= 0, got {a.tokenizer_context}")
        if a.layer_scale < 0:
            error(f"--layer-scale expected >= 0 (0 = none), got {a.layer_scale}")
        if a.kmeans_iters < 1:
            error(f"--kmeans-iters expected a positive integer, got {a.kmeans_iters}")
        if a.tokenizer is not None and not os.path.isfile(a.tokenizer):
            error(f"--tokenizer {a.tokenizer!r} does not exist")

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        vit = build_vit(a, data.channels, init_values=a.layer_scale or None)
        self.grid = tuple(vit.patch_embed.grid_size)
        self.tokenizer = self.make_tokenizer(a, data)
        self.model = MaskedImageModel(vit, self.tokenizer.num_codes)
        self.view = single_view(a, data)

    @staticmethod
    def make_tokenizer(a, data):
        """--tokenizer PATH, or the cached OUT/tokenizer.safetensors fitted with these settings, or a new fit."""
        if a.tokenizer is not None:
            tok, meta = PatchKMeansTokenizer.load(a.tokenizer)
            if (tok.patch_size, tok.in_chans) != (a.patch_size, data.channels):
                raise ValueError(f"--tokenizer {a.tokenizer!r} has patch size {tok.patch_size} and {tok.in_chans} "
                                 f"channels; the model has {a.patch_size} and {data.channels}")
            return tok
        images = render_images(data, a.image_size, max_images=TOKENIZER_FIT_IMAGES, seed=a.seed)
        fit = {"dataset": data.name, "train_images": int(images.shape[0]), "seed": a.seed,
               "iters": a.kmeans_iters, "image_size": a.image_size}
        path = os.path.join(a.out, "tokenizer.safetensors")
        tok = PatchKMeansTokenizer(a.vocab_size, a.patch_size, data.channels, a.tokenizer_context)
        if os.path.exists(path):
            cached, meta = PatchKMeansTokenizer.load(path)
            if cached.settings == tok.settings and all(meta.get(k) == v for k, v in fit.items()):
                return cached
        info = tok.fit(images, torch.Generator().manual_seed(a.seed), iters=a.kmeans_iters)
        tok.save(path, **fit, **info)
        return tok

    def encoders(self):
        return {"encoder": self.model.vit}

    def forward(self, images, ctx):
        a = self.a
        images, = ctx.views(images, self.view)                                              # 1. view
        input_ids = self.tokenizer(images)                                                  # 2. tokens (B, N)
        n = self.grid[0] * self.grid[1]
        mask = ctx.per_sample(sslkern.masks.block_mask, self.grid, a.mask_ratio,            # 3. mask (B, N)
                              min_num_patches=a.min_block_patches, max_num_patches=int(n * a.mask_ratio)).mask
        logits = self.model(images, mask)                                                   # 4. encoder + lm_head
        labels = input_ids[mask]
        loss = F.cross_entropy(logits.float(), labels)                                      # 5. loss
        return loss, self.health_metrics(logits.detach(), labels, mask)

    def health_metrics(self, logits, labels, mask):
        k = self.tokenizer.num_codes
        pred = logits.argmax(-1)
        acc = (pred == labels).float().mean()
        majority = torch.bincount(labels, minlength=k).max().double() / max(labels.numel(), 1)
        p = logits.float().softmax(-1)
        entropy = -(p * p.clamp(min=1e-30).log()).sum(-1).mean() / torch.log(torch.tensor(float(k)))
        return {"mlm_acc": acc, "mlm_gain": acc - majority, "pred_entropy_frac": entropy,
                "pred_perplexity": perplexity(pred, k), "token_perplexity": perplexity(labels, k),
                "masked_share": mask.float().mean()}

    def verdict(self, health):
        gain, used, codes = health.get("mlm_gain"), health.get("pred_perplexity"), health.get("token_perplexity")
        if gain is None:
            return False, "mlm_gain not logged"
        tail = f"; tokenizer codebook usage {codes:.0f} of {self.tokenizer.num_codes} codes" if codes else ""
        if used is not None and used < 2:
            return True, f"collapsed: the predictions use {used:.2f} tokens (one token for every patch){tail}"
        if gain <= 0.02:
            return True, (f"collapsed: masked-token accuracy only {gain:+.3f} above always predicting the most common "
                          f"token{tail}")
        return False, f"not collapsed: masked-token accuracy {gain:+.3f} above the most common token, predictions use {used:.0f} tokens{tail}"


def main(argv=None):
    return run(BEiT, argv)


if __name__ == "__main__":
    main()
