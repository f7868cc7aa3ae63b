"""Augmented views for the recipes: random resized crops (any output size), flips and, for
RGB data, DINO's colour pipeline — vectorised over the batch, drawn from a seeded generator.

Every random number is drawn for the *global* batch and each rank keeps its rows
(``rows=(rank, world_size)``), so a run on any number of ranks sees the same views.

DINO ``main_dino.py: DataAugmentationDINO`` per crop: RandomResizedCrop (global scale
(0.4, 1) at 224, local (0.05, 0.4) at 96), horizontal flip p=0.5, colour jitter
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) p=0.8, grayscale p=0.2, Gaussian
blur (σ ∈ (0.1, 2) at 224 px; p = 1.0 / 0.1 for the two global crops, 0.5 for locals) and
solarisation p=0.2 on the second global crop. Here the jitter ops run in a fixed order
(torchvision shuffles it), hue is a rotation of the YIQ chroma plane, and σ scales with the
crop size (σ·size/224), so the blur is the same fraction of the image at any resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _draw(generator: torch.Generator, rows: tuple[int, int], batch: int, n: int, device) -> torch.Tensor:
    rank, world = rows
    return torch.rand(batch * world, n, generator=generator, device=generator.device)[rank::world].to(device)


def random_resized_crop(images: torch.Tensor, generator: torch.Generator, *, size: int | None = None,
                        scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), degrees: float = 0.0, flip_p: float = 0.0,
                        rows: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """One affine warp per image: a crop of ``scale`` of the area and aspect ``ratio``
    (log-uniform), placed uniformly inside the image, rotated by U(−degrees, degrees),
    mirrored with probability ``flip_p``, resampled bilinearly to ``size`` (default: the
    input size)."""
    b, c, h_in, w_in = images.shape
    size = size or h_in
    u = _draw(generator, rows, b, 5, images.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = logr.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # crop width / image width
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # crop centre in [-1, 1] coordinates, crop inside the image
    cy = (1 - h) * (2 * u[:, 3] - 1)
    angle = (2 * u[:, 4] - 1) * math.radians(degrees)
    cos, sin = angle.cos(), angle.sin()
    if flip_p > 0:  # mirror the output: negate the x column of the sampling transform
        flip = torch.where(_draw(generator, rows, b, 1, images.device)[:, 0] < flip_p, -1.0, 1.0)
    else:
        flip = torch.ones_like(cos)
    theta = torch.stack([torch.stack([flip * w * cos, -h * sin, cx], -1),
                         torch.stack([flip * w * sin, h * cos, cy], -1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), [b, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------
# Colour (RGB in [0, 1])
# ---------------------------------------------------------------------------------------
_GREY = (0.299, 0.587, 0.114)


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (b + t.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       dtype=x.dtype, device=x.device)
    v = torch.einsum("ij,bjhw->bihw", yiq, x)
    ang = 2 * math.pi * turns.view(-1, 1, 1)
    i, q = v[:, 1], v[:, 2]
    v = torch.stack([v[:, 0], i * ang.cos() - q * ang.sin(), i * ang.sin() + q * ang.cos()], 1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(yiq), v).clamp(0, 1)


def color_jitter(x: torch.Tensor, u: torch.Tensor, *, p: float = 0.8, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1) -> torch.Tensor:
    """torchvision ``ColorJitter`` factors drawn from ``u`` (B, 5) uniforms; applied with probability p."""
    on = (u[:, 0] < p).to(x.dtype)
    span = lambda v, k: 1 + on * v * (2 * u[:, k] - 1)  # noqa: E731  factor in [1-v, 1+v], 1 when off
    x = (x * span(brightness, 1).view(-1, 1, 1, 1)).clamp(0, 1)
    x = _blend(x, _grey(x).mean((2, 3), keepdim=True).expand_as(x), span(contrast, 2))
    x = _blend(x, _grey(x).expand_as(x), span(saturation, 3))
    return _rotate_hue(x, on * hue * (2 * u[:, 4] - 1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (σ in pixels, (B,)); σ = 0 leaves the image unchanged."""
    b, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3).view(-1, 1)) ** 2)
    k = k / k.sum(1, keepdim=True)                                            # (B, 2r+1)
    k = k.repeat_interleave(c, 0)                                             # one kernel per (image, channel)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect" if min(h, w) > radius else "replicate")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def dino_color(x: torch.Tensor, generator: torch.Generator, rows, *, blur_p: float, solarize_p: float) -> torch.Tensor:
    """DINO's colour ops on RGB images in [0, 1]: jitter (p 0.8), grey (p 0.2), blur, solarize."""
    b, _, size, _ = x.shape
    u = _draw(generator, rows, b, 9, x.device)
    x = color_jitter(x, u[:, :5])
    x = torch.where((u[:, 5] < 0.2).view(-1, 1, 1, 1), _grey(x).expand_as(x), x)
    sigma = (0.1 + 1.9 * u[:, 6]) * size / 224
    x = torch.where((u[:, 7] < blur_p).view(-1, 1, 1, 1), gaussian_blur(x, sigma), x)
    return torch.where((u[:, 8] < solarize_p).view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)


# ---------------------------------------------------------------------------------------
# Multi-crop
# ---------------------------------------------------------------------------------------
@dataclass
class MultiCrop:
    """``n_global`` crops at ``global_size`` and ``n_local`` at ``local_size`` (DINO's multi-crop).

    ``flip_p`` and ``color`` default to DINO's for RGB data and to off for single-channel
    data (digits are not mirror-symmetric, and the colour ops need colour).
    """

    global_size: int
    local_size: int
    n_global: int = 2
    n_local: int = 4
    global_scale: tuple = (0.4, 1.0)
    local_scale: tuple = (0.05, 0.4)
    ratio: tuple = (3 / 4, 4 / 3)
    degrees: float = 0.0
    flip_p: float | None = None
    color: bool | None = None

    def __call__(self, images: torch.Tensor, generator: torch.Generator, *, mean=None, std=None,
                 rows: tuple[int, int] = (0, 1)) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(global crops, local crops): lists of (B, C, S, S) normalised images."""
        rgb = images.shape[1] == 3
        flip_p = (0.5 if rgb else 0.0) if self.flip_p is None else self.flip_p
        color = rgb if self.color is None else self.color
        if color and (mean is None or std is None):
            raise ValueError("MultiCrop: colour augmentation needs the dataset's mean and std")
        out = []
        for i in range(self.n_global + self.n_local):
            is_global = i < self.n_global
            v = random_resized_crop(images, generator, size=self.global_size if is_global else self.local_size,
                                    scale=self.global_scale if is_global else self.local_scale, ratio=self.ratio,
                                    degrees=self.degrees, flip_p=flip_p, rows=rows)
            if color:
                blur_p = (1.0 if i == 0 else 0.1) if is_global else 0.5
                v = dino_color((v * std + mean).clamp(0, 1), generator, rows, blur_p=blur_p,
                               solarize_p=0.2 if i == 1 else 0.0)
                v = (v - mean) / std
            out.append(v)
        return out[:self.n_global], out[self.n_global:]
