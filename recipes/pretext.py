"""Classic pretext tasks on a small ViT, as baselines: rotation and jigsaw, on the shared loop.

    python recipes/pretext.py --task rotation        # Gidaris et al. 2018 (arXiv:1803.07728)
    python recipes/pretext.py --task jigsaw          # Noroozi & Favaro 2016 (arXiv:1603.09246)
    torchrun --nproc_per_node=2 recipes/pretext.py --task jigsaw

Each task is its own method (run names ``pretext-rotation`` / ``pretext-jigsaw``, so their
run directories and summaries do not clash).

Rotation (RotNet): every image of the batch is shown at 0°, 90°, 180° and 270° (all four
copies in the batch, as Gidaris et al.); the ViT's pooled features go through a small MLP
head that classifies the rotation (4-way cross-entropy).

Jigsaw (context-free network): the image is cut into a grid of tiles (2x2 of 8x8 pixels on
the default 16x16 data), each tile normalised on its own (mean / std, against low-level
shortcuts), the tiles shuffled by one of P permutations; one shared ViT encodes every tile
separately (a siamese tower, no attention across tiles), the tile features are concatenated
in the shuffled order and an MLP classifies which permutation was applied (P-way).

Both: the view is the loop's random resized crop + ±10° rotation; the pooled feature is the
mean of the patch tokens after the final norm (what the kNN evaluates). Health:
``pretext_acc`` against chance (1/4, 1/P) and ``feature_std`` (std across the batch of the
pooled features: → 0 when every image gets the same feature).

Deviations (docs/recipes/pretext.md): a ViT instead of AlexNet / NIN; jigsaw with 2x2 tiles and
all 24 permutations (Noroozi: 3x3 tiles, 1,000 permutations of maximal Hamming distance), no
gap between tiles (8x8 tiles leave no room for one at patch size 4), tiles encoded at 8x8 with
the position table resampled (timm ``dynamic_img_size``).
"""
from __future__ import annotations

import argparse
import itertools
import torch
import torch.nn.functional as F
from torch import nn

from sslkern.train import Method, build_vit, run
from sslkern.train.views import add_crop_arguments, check_crop_arguments, single_view
from sslkern.train.health import batch_std

TASKS = ("rotation", "jigsaw")


def pooled(vit, x):
    """Mean of the patch tokens after the final norm (the evaluation's feature), (B, D)."""
    return vit.forward_features(x)[:, vit.num_prefix_tokens:].mean(1)


def mlp(d_in, d_hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def rotate4(images):
    """(B, C, H, W) → (4B, C, H, W) image-major: each image at 0, 90, 180, 270° (counter-clockwise), labels 0..3."""
    x = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)], dim=1)
    labels = torch.arange(4, device=images.device).repeat(images.shape[0])
    return x.flatten(0, 1), labels


def tiles(images, grid):
    """(B, C, H, W) → (B, grid², C, H/grid, W/grid), tiles row-major."""
    b, c, h, w = images.shape
    t = images.reshape(b, c, grid, h // grid, grid, w // grid)
    return t.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, h // grid, w // grid)


def normalise_tiles(t, eps=1e-5):
    """Each tile to zero mean and unit std on its own (Noroozi: against low-level shortcuts)."""
    mean = t.mean(dim=(2, 3, 4), keepdim=True)
    std = t.var(dim=(2, 3, 4), keepdim=True, unbiased=False).add(eps).sqrt()
    return (t - mean) / std


class Pretext(Method):
    """Shared parts of the pretext tasks: the ViT, the options, the health judgement."""

    task = "?"
    defaults = dict(epochs=70, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=5, clip_grad=3.0)
    health = {"pretext_acc": "low", "feature_std": "low"}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--task", choices=TASKS, default="rotation", help="which pretext task")
        g.add_argument("--head-dim", type=int, default=256, help="hidden width of the classification MLP")
        g.add_argument("--jigsaw-grid", type=int, default=2, help="jigsaw: tiles per side")
        add_crop_arguments(g)

    @staticmethod
    def check_arguments(a, error):
        check_crop_arguments(a, error)
        if a.head_dim <= 0:
            error(f"--head-dim expected a positive integer, got {a.head_dim}")
        if a.task == "jigsaw":
            if a.jigsaw_grid not in (2, 3):
                error(f"--jigsaw-grid expected 2 or 3, got {a.jigsaw_grid}")
            tile = a.image_size // a.jigsaw_grid
            if a.image_size % a.jigsaw_grid or tile % a.patch_size:
                error(f"--jigsaw-grid {a.jigsaw_grid}: tiles of --image-size {a.image_size} / {a.jigsaw_grid} expected "
                      f"a whole multiple of --patch-size {a.patch_size}")

    def encoders(self):
        return {"encoder": self.encoder}

    @property
    def chance(self) -> float:
        raise NotImplementedError

    def verdict(self, health):
        acc, std = health.get("pretext_acc"), health.get("feature_std")
        if acc is None:
            return False, "pretext_acc not logged"
        if std is not None and std < 0.01:
            return True, f"collapsed: feature_std {std:.4f} (every image gets the same feature)"
        if acc <= self.chance + 0.05:
            return True, f"not learning: pretext accuracy {acc:.3f} at chance {self.chance:.3f}"
        return False, f"not collapsed: pretext accuracy {acc:.3f} (chance {self.chance:.3f}), feature_std {std:.3f}"


class Rotation(Pretext):
    """RotNet: classify which of 4 rotations was applied."""

    name, title, task = "pretext-rotation", "Pretext: rotation", "rotation"
    defaults = {**Pretext.defaults, "epochs": 30, "warmup_epochs": 3}  # every step sees 4 copies of each image
    presets = {"paper": dict(
        _doc="RotNet on a ViT-S/16 at 224: the optimizer is MoCo v3's 1-node ViT-S recipe (moco-v3 CONFIG.md: "
             "AdamW, lr 1.5e-4 x batch / 256, here for batch 1,024, weight decay 0.1, 40 warm-up of 300 epochs, no "
             "clipping), the task is RotNet's (Gidaris et al. 2018, FeatureLearningRotNet ImageNet config and "
             "dataloader): the 4 rotations of every image in the batch, crop 0.08-1 + flip. Not reproduced: SGD "
             "(Nesterov, momentum 0.9, lr 0.01 divided by 10 at epochs 15, 30 and 45, weight decay 5e-4, 50 "
             "epochs of batch 192; config/ImageNet_RotNet_AlexNet.py) on AlexNet",
        model="vit_small_patch16_224", image_size=224, batch_size=1024, epochs=300, lr=6e-4, min_lr=0.0,
        warmup_epochs=40, weight_decay=0.1, clip_grad=0.0, crop_scale=(0.08, 1.0), degrees=0.0, eval_every=0)}
    chance = 0.25

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        self.encoder = build_vit(a, data.channels)
        self.head = mlp(a.dim, a.head_dim, 4)
        self.view = single_view(a, data)

    def forward(self, images, ctx):
        images, = ctx.views(images, self.view)                                     # view
        x, labels = rotate4(images)                                                # 4 rotations of each
        feats = pooled(self.encoder, x)                                            # (4B, D)
        logits = self.head(feats)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return loss, {"pretext_acc": acc, "feature_std": batch_std(F.normalize(feats.detach(), dim=-1))}


class Jigsaw(Pretext):
    """Context-free network: classify which tile permutation was applied."""

    name, title, task = "pretext-jigsaw", "Pretext: jigsaw", "jigsaw"
    presets = {"paper": dict(
        _doc="Jigsaw on a ViT-S/16: the optimizer is MoCo v3's 1-node ViT-S recipe (moco-v3 CONFIG.md: AdamW, lr "
             "1.5e-4 x batch / 256, here for batch 1,024, weight decay 0.1, 40 warm-up of 300 epochs, no clipping), "
             "the task is Noroozi & Favaro's: 3x3 tiles normalised each on its own, a 4,096-wide classifier on the "
             "concatenated tile features, a random crop of 0.77 of the image area (their 225 pixels of 256); the "
             "crop is 192 pixels so that each tile is their 64 pixels (4x4 patches). Not reproduced: 1,000 "
             "permutations (the recipe draws from 100 of maximal Hamming distance), the gap between tiles, the "
             "per-channel colour jitter, SGD on AlexNet. Applies with --task jigsaw",
        model="vit_small_patch16_224", image_size=192, jigsaw_grid=3, head_dim=4096, batch_size=1024, epochs=300,
        lr=6e-4, min_lr=0.0, warmup_epochs=40, weight_decay=0.1, clip_grad=0.0, crop_scale=(0.77, 0.77),
        degrees=0.0, eval_every=0)}

    def __init__(self, a, data):
        super().__init__()
        self.a = a
        self.encoder = build_vit(a, data.channels, dynamic_img_size=True)   # tiles are smaller than images
        n = a.jigsaw_grid ** 2
        self.register_buffer("perms", permutation_set(n), persistent=False)
        self.head = mlp(n * a.dim, a.head_dim, self.perms.shape[0])
        self.view = single_view(a, data)

    @property
    def chance(self) -> float:
        return 1.0 / self.perms.shape[0]

    def forward(self, images, ctx):
        images, = ctx.views(images, self.view)                                     # view
        b, n = images.shape[0], self.a.jigsaw_grid ** 2
        labels = ctx.randint(self.perms.shape[0])
        t = normalise_tiles(tiles(images, self.a.jigsaw_grid))                      # (B, n, C, t, t)
        t = t.gather(1, self.perms[labels].view(b, n, 1, 1, 1).expand_as(t))       # slot j ← tile perm[j]
        feats = pooled(self.encoder, t.flatten(0, 1))                              # one tower per tile (B·n, D)
        logits = self.head(feats.reshape(b, n * feats.shape[-1]))                  # concatenated in slot order
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return loss, {"pretext_acc": acc, "feature_std": batch_std(F.normalize(feats.detach(), dim=-1))}


def permutation_set(n, size=100):
    """All n! permutations for n <= 4; for n = 9, ``size`` permutations chosen greedily for maximal
    minimum Hamming distance (Noroozi & Favaro's selection), starting from the identity."""
    if n <= 4:
        return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int64)
    allp = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int8)
    chosen = [0]
    dmin = (allp != allp[0]).sum(1)
    for _ in range(size - 1):
        j = int(dmin.argmax())
        chosen.append(j)
        dmin = torch.minimum(dmin, (allp != allp[j]).sum(1))
    return allp[chosen].long()


METHODS = {"rotation": Rotation, "jigsaw": Jigsaw}


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="rotation")
    task = pre.parse_known_args(argv)[0].task
    return run(METHODS.get(task, Rotation), argv)  # an unknown --task is rejected by the full parser


if __name__ == "__main__":
    main()
