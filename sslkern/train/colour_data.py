"""A colour dataset made offline: scikit-learn's digits with strokes coloured by their orientation.

``orientation_coloured_digits()``: the 1,797 digits of ``sklearn.datasets.load_digits`` with the
labels and the split of :func:`sslkern.data.digits` (stratified, ``test_size=0.3,
random_state=0``: 1,257 train / 540 test), upsampled from 8×8 to 16×16 (bilinear,
antialiased) and stored in memory as uint8 RGB; the views are rendered from them at
``--image-size`` like every dataset's. Each image is made RGB without any randomness, in CIE
Lab (skimage's conversion, D65):

  * ``s`` = the grey digit in [0, 1] (stroke strength);
  * the local stroke orientation θ ∈ [0, π) from the structure tensor of the grey image
    (Sobel gradients, their products averaged over 3×3 pixels, θ = ½·atan2(2Jxy, Jxx − Jyy) + π/2);
  * ``L = 100 − 60·s`` (white background, dark strokes), chroma ``40·s`` at hue angle ``2θ`` in
    the ab plane (a stroke and its 180°-turned copy get one colour; horizontal strokes +a,
    reddish; vertical ones −a, green), converted to sRGB, clamped to [0, 1] and rounded to uint8.

So the L channel is the grey digit itself (up to the sRGB clamp at a few saturated pixels and
the uint8 rounding) and the colour says which way each stroke runs. Colour carries no
information about the label beyond the strokes' shape (every digit uses every hue), and it is
a function of the grey image: a colorization network can learn it from L alone, by detecting
stroke orientation around each pixel. A mirrored or rotated view breaks that function (a
mirrored stroke keeps its colour but not its orientation), so the colorization recipe renders
neither on this set.

What the kNN / probe of a recipe on it measure: digit identity (10 classes) from the features
of an encoder that sees the L channel only — the same information as the grey digits
(``100 − 60·s`` instead of ``s``), so the figures are comparable with the digits recipes'
(both against their own random-init baselines).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ArraySource, Dataset, digits

NAME = "digits-orientation-colour"


def stroke_orientation(grey: torch.Tensor) -> torch.Tensor:
    """θ ∈ [0, π) per pixel of (N, 1, H, W) images: the structure tensor's dominant gradient direction + π/2."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]).view(1, 1, 3, 3)
    xp = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(xp, kx)
    gy = F.conv2d(xp, kx.transpose(2, 3))
    box = torch.full((1, 1, 3, 3), 1.0 / 9.0)
    j = [F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), box) for t in (gx * gx, gy * gy, gx * gy)]
    grad_dir = 0.5 * torch.atan2(2 * j[2], j[0] - j[1])        # direction of strongest change
    return torch.remainder(grad_dir + math.pi / 2, math.pi)      # the stroke runs across it


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """skimage ``lab2rgb`` (D65, 2°) of (N, 3, H, W) Lab → sRGB clamped to [0, 1] (the inverse of ``rgb_to_lab``)."""
    from ..reference.colorization_targets import D65_WHITE, XYZ_FROM_RGB

    L, a, b = lab[:, 0], lab[:, 1], lab[:, 2]
    fy = (L + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, fy - b / 200.0], 1)
    t = torch.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
    xyz = t * torch.tensor(D65_WHITE, dtype=lab.dtype).view(1, 3, 1, 1)
    rgb_from_xyz = torch.linalg.inv(torch.tensor(XYZ_FROM_RGB, dtype=torch.float64)).to(lab.dtype)
    lin = torch.einsum("ij,njhw->nihw", rgb_from_xyz, xyz)
    srgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0) ** (1 / 2.4) - 0.055, 12.92 * lin)
    return srgb.clamp(0.0, 1.0)


def orientation_colour(grey: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grey in [0, 1] → (N, 3, H, W) RGB in [0, 1]: L = 100 − 60·s, chroma 40·s at hue 2θ."""
    s = grey.clamp(0, 1)
    phi = 2.0 * stroke_orientation(s)
    lab = torch.cat([100.0 - 60.0 * s, 40.0 * s * torch.cos(phi), 40.0 * s * torch.sin(phi)], 1)
    return lab_to_rgb(lab)


def orientation_coloured_digits(size: int = 16) -> Dataset:
    """The digits recoloured by ``orientation_colour`` at ``size``×``size`` (see the module
    docstring), normalised per channel with the training set's mean and std like the other
    in-memory sets."""
    grey = digits()
    splits = []
    for src in (grey.train, grey.test):
        x = torch.from_numpy(src.images).permute(0, 3, 1, 2).double() / 255.0
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        rgb = orientation_colour(x.float()).double()
        u8 = (rgb * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        splits.append(ArraySource(u8, src.labels, src.classes, f"{NAME}/{src.name.split('/')[-1]}"))
    x = splits[0].images.astype(np.float64) / 255.0
    mean = tuple(x.mean(axis=(0, 1, 2)).tolist())
    std = tuple(np.maximum(x.std(axis=(0, 1, 2)), 1e-6).tolist())
    return Dataset(NAME, splits[0], splits[1], mean, std, 1.0, True)
