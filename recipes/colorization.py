"""Colorization as a pretext task on a small ViT (Zhang, Isola & Efros 2016, arXiv:1603.08511).

    python recipes/colorization.py                       # digits coloured by stroke orientation, 16x16
    python recipes/colorization.py --data PATH           # colour ImageFolder / shards / CIFAR-10 (grey refused)
    python recipes/colorization.py --data IMAGENET --preset paper
    torchrun --nproc_per_node=2 recipes/colorization.py

One step, as richzhang/colorization ``models/colorization_train_val_v2.prototxt`` with
``resources/caffe_traininglayers.py``:
  1. view      one random resized crop (``--crop-scale``), rendered by ``ctx.views``; no rotation and
               no flip by default (on the orientation-coloured digits either would turn a stroke but keep
               its colour); ``--flip-p 0.5`` for photos (the prototxt's ``mirror: true``)
  2. input     the CIE L channel only (skimage rgb2lab, centred by −50, /50): the encoder never sees
               colour (a forward pre-hook on its patch embedding computes L from the RGB batch,
               so the kNN and the probe feed it L too)
  3. targets   ``sslkern.colorization_targets``: ab sampled at stride s, the 10 nearest of the 313
               in-gamut bins with Gaussian weights (σ 5), the rebalancing weight of the nearest
               bin (γ 0.5, prior estimated at start from up to ``--prior-images`` training images,
               rendered as the evaluation's centre crops) times the grey mask
  4. predict   a linear head per patch token: (p/s)² pixels × 313 logits
  5. loss      soft cross-entropy; the rebalancing weight multiplies the gradient only
               (``sslkern.nn.rebalanced_soft_cross_entropy``): the logged loss is unweighted

Health: ``colour_gain`` = 1 − loss / prior_loss, where prior_loss is the same soft cross-entropy
of a predictor that ignores the image and outputs the training prior (> 0: the L channel is
used); ``colour_acc``, how often the arg-max bin is the target's nearest bin (rebalancing pulls
it away from the commonest, background bin, so it is not compared with that bin's share);
``feature_std`` (std across the batch of the pooled, L2-normalised features).

Deviations (docs/recipes/colorization.md): a ViT with a per-token linear head instead of the
VGG-style net with dilated convolutions and a deconvolution; stride 2 (the net: 4, at 1/4 of
the input resolution, like one 4-pixel patch); L scaled to [−1, 1].
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

import sslkern
from sslkern import views as V
from sslkern.data import DataError, open_dataset
from sslkern.reference.colorization_targets import rgb_to_lab
from sslkern.train import Method, build_vit, run
from sslkern.train.colour_data import orientation_coloured_digits
from sslkern.train.evaluate import render_images
from sslkern.train.health import batch_std

NUM_BINS = 313


class LightnessInput:
    """Forward pre-hook for the encoder's patch embedding: normalised RGB batch → centred L / 50."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, module, args):
        x = args[0]
        rgb = x * self.std.to(x.device, x.dtype) + self.mean.to(x.device, x.dtype)
        return ((rgb_to_lab(rgb)[:, :1] - 50.0) / 50.0).to(x.dtype),


def training_rgb(data, image_size: int, max_images: int) -> torch.Tensor:
    """Up to ``max_images`` training images (a seeded subset if there are more) as RGB in [0, 1]:
    the evaluation's centre crops at ``image_size``, un-normalised."""
    x = render_images(data, image_size, max_images, min_side=None if data.in_memory else 2 * image_size)
    mean = torch.tensor(data.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def require_colour(data, rgb: torch.Tensor | None = None, min_colour_frac: float = 0.05):
    """Refuse grey data: one channel, or (almost) no image of ``rgb`` (training images in [0, 1])
    with a colour (|a| or |b| > 5)."""
    if data.channels != 3:
        raise DataError(f"colorization needs colour images: dataset {data.name!r} has {data.channels} channel(s) "
                        "(grey data gives no signal at all; omit --data for the colour default)")
    if rgb is None:
        return
    nongray = torch.cat([sslkern.colorization_targets(rgb[i:i + 512], stride=1).nongray
                         for i in range(0, rgb.shape[0], 512)])
    frac = float(nongray.float().mean())
    if frac < min_colour_frac:
        raise DataError(f"colorization needs colour images: only {100 * frac:.1f} % of the training images of "
                        f"{data.name!r} have any colour (|a| or |b| > 5); grey data gives no signal")


class Colorization(Method):
    """Colorization: predict the ab colour distribution of each pixel from the L channel."""

    name, title = "colorization", "Colorization"
    defaults = dict(epochs=40, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=3)
    health = {"colour_gain": "low", "feature_std": "low"}
    presets = {"paper": dict(
        _doc="Zhang et al. 2016 on ImageNet (richzhang/colorization models/colorization_train_val_v2.prototxt: "
             "batch 40, crop 176 of 256 with mirror, targets at 1/4 resolution; the paper's solver: Adam "
             "beta (0.9, 0.99), weight decay 1e-3, lr 3e-5 dropped to 1e-5 and 3e-6 at 200k / 375k of 450k "
             "iterations = 14 epochs). A ViT-S/16 at 224 instead of the VGG-style net; a cosine from 3e-5 to "
             "3e-6 instead of the steps; Adam's L2 decay becomes AdamW's decoupled decay",
        model="vit_small_patch16_224", image_size=224, batch_size=40, epochs=14, lr=3e-5, min_lr=3e-6,
        warmup_epochs=0, weight_decay=1e-3, betas=(0.9, 0.99), target_stride=4, gamma=0.5, prior_sigma=5.0,
        crop_scale=(0.47, 0.47), flip_p=0.5, eval_every=0)}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--target-stride", type=int, default=2, help="ab sampled every s pixels (must divide the patch)")
        g.add_argument("--gamma", type=float, default=0.5, help="rebalancing: mix of the prior with uniform")
        g.add_argument("--prior-sigma", type=float, default=5.0, help="Gaussian smoothing of the prior (ab units)")
        g.add_argument("--prior-images", type=int, default=4096,
                       help="training images the prior (and the colour check) is estimated from")
        g.add_argument("--crop-scale", type=float, nargs=2, default=(0.5, 1.0), help="random resized crop area range")
        g.add_argument("--flip-p", type=float, default=0.0,
                       help="horizontal flips (0 on the orientation-coloured digits: a flip breaks their colouring)")
        g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")

    @staticmethod
    def check_arguments(a, error):
        if a.target_stride <= 0 or a.patch_size % a.target_stride:
            error(f"--target-stride expected a positive divisor of --patch-size {a.patch_size}, got {a.target_stride}")
        if not 0 <= a.gamma <= 1:
            error(f"--gamma expected in [0, 1], got {a.gamma}")
        if a.prior_sigma < 0:
            error(f"--prior-sigma expected >= 0, got {a.prior_sigma}")
        if a.prior_images < 1:
            error(f"--prior-images expected a positive integer, got {a.prior_images}")
        if not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1:
            error(f"--crop-scale expected 0 < min <= max <= 1, got {a.crop_scale}")
        if not 0 <= a.flip_p <= 1:
            error(f"--flip-p expected in [0, 1], got {a.flip_p}")
        if not all(0 <= b < 1 for b in a.betas):
            error(f"--betas expected two values in [0, 1), got {a.betas}")

    @staticmethod
    def load_data(a):
        """The orientation-coloured digits by default, else ``--data``; grey data is refused."""
        data = orientation_coloured_digits() if a.data is None else open_dataset(a.data)
        require_colour(data)
        return data

    def __init__(self, a, data):
        super().__init__()
        self.a, self.betas = a, tuple(a.betas)
        self.mean = torch.tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.encoder = build_vit(a, 1)
        self.encoder.patch_embed.register_forward_pre_hook(LightnessInput(data.mean, data.std))
        self.u = a.patch_size // a.target_stride
        self.head = nn.Linear(a.dim, self.u * self.u * NUM_BINS)
        self.view = [V.ViewSpec(a.image_size, scale=tuple(a.crop_scale), integer_boxes=not data.in_memory,
                                flip_p=a.flip_p)]
        rgb = training_rgb(data, a.image_size, a.prior_images)
        require_colour(data, rgb)
        prior = sslkern.colorization_prior(rgb, stride=a.target_stride, smooth_sigma=a.prior_sigma)
        self.register_buffer("factor", sslkern.rebalance_factor(prior, a.gamma))
        self.register_buffer("log_prior", prior.clamp_min(1e-12).log().float())
        self.export_extra = {"input": "CIE L of the RGB image, (L - 50) / 50, one channel"}

    def encoders(self):
        return {"encoder": self.encoder}

    def logits(self, tokens):
        """(B, N, D) patch tokens → (B, gh·u, gw·u, Q): the head's u x u pixels per token on the target grid."""
        b = tokens.shape[0]
        gh, gw = self.encoder.patch_embed.grid_size
        z = self.head(tokens).view(b, gh, gw, self.u, self.u, NUM_BINS)
        return z.permute(0, 1, 3, 2, 4, 5).reshape(b, gh * self.u, gw * self.u, NUM_BINS)

    def forward(self, images, ctx):
        a = self.a
        images, = ctx.views(images, self.view)                                                     # 1. view
        rgb = (images * self.std.to(images) + self.mean.to(images)).clamp(0, 1)
        t = sslkern.colorization_targets(rgb, self.factor, stride=a.target_stride)                    # 3. targets
        feats = self.encoder.forward_features(images)                                               # 2. L → ViT
        tokens = feats[:, self.encoder.num_prefix_tokens:]
        z = self.logits(tokens)                                                                     # 4. predict
        loss = sslkern.nn.rebalanced_soft_cross_entropy(z, t.bin_ids, t.weights, t.rebalance)     # 5. loss
        with torch.no_grad():
            colour_acc = (z.argmax(-1) == t.bin_ids[..., 0].long()).float().mean()
            prior_loss = -(t.weights * self.log_prior[t.bin_ids.long()]).sum(-1).mean()
            pooled = F.normalize(tokens.mean(1), dim=-1)
        return loss, {"colour_gain": 1.0 - loss.detach() / prior_loss, "prior_loss": prior_loss,
                      "colour_acc": colour_acc, "feature_std": batch_std(pooled),
                      "nongray_frac": t.nongray.float().mean()}

    def verdict(self, health):
        gain, std = health.get("colour_gain"), health.get("feature_std")
        if gain is None:
            return False, "colour_gain not logged"
        if std is not None and std < 0.01:
            return True, f"collapsed: feature_std {std:.4f} (every image gets the same feature)"
        if gain <= 0.02:
            return True, f"not learning: colour_gain {gain:.3f} (the loss is no lower than predicting the prior)"
        return False, f"not collapsed: loss {100 * gain:.0f} % below the prior's, feature_std {std:.3f}"


def main(argv=None):
    return run(Colorization, argv)


if __name__ == "__main__":
    main()
