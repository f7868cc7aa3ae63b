"""Context encoders: inpainting as a pretext task on a small ViT (Pathak et al. 2016, arXiv:1604.07379).

    python recipes/context_encoder.py                      # digits 16x16, centre hole
    python recipes/context_encoder.py --region random      # random regions of 20-30 % of the area
    python recipes/context_encoder.py --adversarial        # + the adversarial term (0.001)
    python recipes/context_encoder.py --data IMAGENET --preset paper
    torchrun --nproc_per_node=2 recipes/context_encoder.py

One step, as pathak22/context-encoder ``train.lua`` (``fDx`` / ``fGx``):
  1. view      random resized crop + small rotation (``sslkern.train.views.single_view``)
  2. region    the predicted region R: the centre square of half the side, or a random region
               (smooth noise thresholded at a per-image quantile, 20-30 % of the area, drawn per sample
               through ``ctx.per_sample``); the HOLE is R
               shrunk by ``--overlap`` pixels (``overlapPred``): the band R \\ hole stays visible
  3. fill      the hole set to the dataset mean in pixel space (0 after the loop's per-channel
               normalisation); the encoder sees the whole filled image: no mask tokens, no dropping
  4. decode    a small transformer on the encoder's tokens, a linear layer to each patch's pixels
  5. loss      L2 on R (mean over its pixels): the logged value is the plain mean; in the gradient
               the band counts ×10 (``wtl2Matrix``), through ``masked_regression_loss(weight=...)``
  6. adversarial (``--adversarial``): a small conv discriminator on (real | prediction pasted into
               R) with BCE; generator loss ``(1 − 0.999)·adv + 0.999·L2`` (``wtl2``), discriminator lr
               = generator lr / 10 (the generator's is 10× the discriminator's, as ``optimStateG``)

The single optimizer of the loop takes both nets: the discriminator is its own parameter group
(lr scale 0.1), and one backward gives each its own gradient: the discriminator's loss sees the
prediction detached, the generator's adversarial term goes through the discriminator with its
parameters detached (``torch.func.functional_call``), so neither loss moves the other net.

Health: ``hole_gain`` = 1 − L2(prediction, R) / L2(mean fill, R) (> 0: the context is used) and
``feature_std`` (std across the batch of the pooled, L2-normalised encoder features).

Deviations (docs/recipes/context_encoder.md): a ViT encoder and a small transformer decoder
instead of AlexNet-style conv nets with a channel-wise fully-connected bottleneck; D and G updated
from the same step's prediction (train.lua updates D first, then G through the updated D).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import sslkern
from sslkern.masks import center_region, random_region
from sslkern.train import Method, build_vit, run
from sslkern.train.health import batch_std
from sslkern.train.tokenizer import patchify
from sslkern.train.views import single_view

REGIONS = ("center", "random")


class Decoder(nn.Module):
    """Tokens → a few transformer blocks → each patch's pixels."""

    def __init__(self, embed_dim, out_dim, dim=64, depth=2, heads=2):
        from timm.models.vision_transformer import Block

        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                                            norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, tokens):
        return self.pred(self.norm(self.blocks(self.embed(tokens))))


def discriminator(in_chans: int, width: int = 32) -> nn.Sequential:
    """train.lua netD, scaled to 16x16: 4x4 stride-2 convs, LeakyReLU 0.2, BatchNorm after the first; a logit."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1))


class ContextEncoder(Method):
    """Context encoder: reconstruct a removed region from the filled-in image around it."""

    name, title = "context-encoder", "Context encoder"
    defaults = dict(epochs=50, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=5)
    health = {"hole_gain": "low", "feature_std": "low"}
    presets = {"paper": dict(
        _doc="Pathak et al. 2016, pathak22/context-encoder train.lua with the README's ImageNet command "
             "(wtl2 0.999, overlapPred 4, batch 64, 25 epochs, Adam lr 2e-4 with beta1 0.5, the generator's lr 10x "
             "the discriminator's, constant, no weight decay), at 224 instead of 128 (overlap 4 -> 7 px); a "
             "ViT-S/16 encoder and MAE's decoder size instead of the conv encoder / decoder",
        model="vit_small_patch16_224", image_size=224, batch_size=64, epochs=25, lr=2e-3, min_lr=2e-3,
        warmup_epochs=0, weight_decay=0.0, betas=(0.5, 0.999), region="center", overlap=7, overlap_weight=10.0,
        adversarial=True, l2_weight=0.999, decoder_dim=512, decoder_depth=8, decoder_heads=16, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--region", choices=REGIONS, default="center", help="centre square or random regions")
        g.add_argument("--overlap", type=int, default=1, help="visible band of R around the hole (overlapPred), px")
        g.add_argument("--overlap-weight", type=float, default=10.0, help="gradient weight of the band (10)")
        g.add_argument("--adversarial", action="store_true", help="add the adversarial term")
        g.add_argument("--l2-weight", type=float, default=0.999, help="wtl2 with --adversarial")
        g.add_argument("--decoder-dim", type=int, default=64)
        g.add_argument("--decoder-depth", type=int, default=2)
        g.add_argument("--decoder-heads", type=int, default=2)
        g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas")

    @staticmethod
    def check_arguments(a, error):
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(a, name) <= 0:
                error(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(a, name)}")
        if a.decoder_dim % a.decoder_heads:
            error(f"--decoder-dim {a.decoder_dim} expected a multiple of --decoder-heads {a.decoder_heads}")
        if a.overlap < 0 or 2 * a.overlap >= a.image_size // 2:
            error(f"--overlap expected in [0, {a.image_size // 4 - 1}] (the hole must keep a pixel), got {a.overlap}")
        if a.overlap_weight <= 0:
            error(f"--overlap-weight expected > 0, got {a.overlap_weight}")
        if not 0 < a.l2_weight <= 1:
            error(f"--l2-weight expected in (0, 1], got {a.l2_weight}")
        if not all(0 <= b < 1 for b in a.betas):
            error(f"--betas expected two values in [0, 1), got {a.betas}")

    def __init__(self, a, data):
        super().__init__()
        self.a, self.betas = a, tuple(a.betas)
        self.encoder = build_vit(a, data.channels)
        p = a.patch_size
        self.decoder = Decoder(a.dim, p * p * data.channels, a.decoder_dim, a.decoder_depth, a.decoder_heads)
        self.discriminator = discriminator(data.channels) if a.adversarial else None
        self.view = single_view(a, data)

    def encoders(self):
        return {"encoder": self.encoder}

    def param_groups(self):
        groups = super().param_groups()
        if self.discriminator is None:
            return groups
        d_params = {id(q) for q in self.discriminator.parameters()}
        out = []
        for g in groups:   # generator lr = 10x the discriminator's (train.lua optimStateG / optimStateD)
            gen = [q for q in g["params"] if id(q) not in d_params]
            dis = [q for q in g["params"] if id(q) in d_params]
            out += [dict(g, params=gen)] if gen else []
            out += [dict(g, params=dis, lr_scale=0.1)] if dis else []
        return out

    def regions(self, ctx, rows: int, device):
        """R and the hole of this step's rows: the centre square, or random regions drawn per sample."""
        a = self.a
        if a.region == "center":
            return center_region(rows, a.image_size, a.overlap, device=device)
        return ctx.per_sample(random_region, a.image_size, a.overlap)

    def forward(self, images, ctx):
        a, p = self.a, self.a.patch_size
        images, = ctx.views(images, self.view)                                                # 1. view
        region, hole = self.regions(ctx, images.shape[0], images.device)                      # 2. region
        filled = images.masked_fill(hole, 0.0)                                                # 3. fill: the mean
        tokens = self.encoder.forward_features(filled)[:, self.encoder.num_prefix_tokens:]
        pred = self.decoder(tokens)                                                           # 4. (B, N, p·p·C)
        target = patchify(images, p)
        c = images.shape[1]
        in_r = patchify(region.expand(-1, c, -1, -1).float(), p)                             # 5. weights on R
        band = patchify((region & ~hole).expand(-1, c, -1, -1).float(), p)
        n_r = in_r.sum().clamp_min(1.0)
        weighted = sslkern.masked_regression_loss(pred, target, weight=in_r + (a.overlap_weight - 1) * band,
                                                  scale=1.0) / n_r
        plain = sslkern.masked_regression_loss(pred, target, weight=in_r, scale=1.0) / n_r     # the logged L2
        with torch.no_grad():
            fill_l2 = ((target * in_r) ** 2).sum() / n_r                                     # the mean fill's L2
            pooled = F.normalize(tokens.mean(1), dim=-1)
        metrics = {"l2_region": plain.detach(), "hole_gain": 1.0 - plain.detach() / fill_l2,
                   "feature_std": batch_std(pooled)}
        grad_loss, logged = weighted, plain.detach()
        if self.discriminator is not None:                                                    # 6. adversarial
            d_loss, g_adv, d_acc = self.adversarial(images, pred, region)
            w = a.l2_weight
            grad_loss = w * weighted + (1 - w) * g_adv + d_loss
            logged = w * plain.detach() + (1 - w) * g_adv.detach()
            metrics.update(d_loss=d_loss.detach(), g_adv=g_adv.detach(), d_acc=d_acc)
        # value = the plain loss (train.lua's errG_total), gradient = the weighted one
        return grad_loss - grad_loss.detach() + logged, metrics

    def adversarial(self, images, pred, region):
        """(D's BCE on real vs pasted prediction, G's BCE towards "real" through a frozen D, D's accuracy)."""
        from torch.func import functional_call

        p = self.a.patch_size
        b, c, h, w = images.shape
        pred_img = pred.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        fake = torch.where(region, pred_img, images)
        ones, zeros = torch.ones(b, 1, device=images.device), torch.zeros(b, 1, device=images.device)
        real_logit = self.discriminator(images)
        fake_logit = self.discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(real_logit, ones) + \
            F.binary_cross_entropy_with_logits(fake_logit, zeros)
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        buffers = dict(self.discriminator.named_buffers())
        g_logit = functional_call(self.discriminator, {**frozen, **buffers}, (fake,))
        g_adv = F.binary_cross_entropy_with_logits(g_logit, ones)
        d_acc = ((real_logit > 0).float().mean() + (fake_logit < 0).float().mean()) / 2
        return d_loss, g_adv, d_acc.detach()

    def verdict(self, health):
        gain, std = health.get("hole_gain"), health.get("feature_std")
        if gain is None:
            return False, "hole_gain not logged"
        if std is not None and std < 0.01:
            return True, f"collapsed: feature_std {std:.4f} (every image gets the same feature)"
        if gain <= 0.05:
            return True, f"not learning: hole_gain {gain:.3f} (no better than the mean fill)"
        return False, f"not collapsed: L2 on the region {100 * gain:.0f} % below the mean fill's, feature_std {std:.3f}"


def main(argv=None):
    return run(ContextEncoder, argv)


if __name__ == "__main__":
    main()
