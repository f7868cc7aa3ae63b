"""A colour dataset made offline: scikit-learn's digits with strokes coloured by their orientation.

``load_orientation_coloured_digits(image_size)``: the 1,797 digits of ``sklearn.datasets.load_digits``
(8×8, upsampled to ``image_size`` as the default digits set), the same labels and the same
stratified split (``test_size=0.3, random_state=0``: 1,257 train / 540 test). Each image is
made RGB without any randomness:

  * ``s`` = the grey digit in [0, 1] (stroke strength);
  * the local stroke orientation θ ∈ [0, π) from the structure tensor of the grey image
    (Sobel gradients, their products averaged over 3×3 pixels, θ = ½·atan2(2Jxy, Jxx − Jyy));
  * hue = θ / π (so a stroke and its 180°-turned copy get one colour), full saturation and
    value: ``c(θ)``; the pixel is ``(1 − s)·white + s·c(θ)``.

So the background is white (grey, no colour), a stroke's colour says which way it runs, and
its lightness is the digit. Colour carries no information about the label beyond the strokes'
shape (every digit uses every hue), and it is a function of the grey image: a colorization
network can learn it from L alone, by detecting stroke orientation in each neighbourhood.

What the kNN / probe of a recipe on it measure: digit identity (10 classes) from the features
of an encoder that sees the L channel (CIE lightness) only — the L of these images is the
digit shape with hue-dependent stroke lightness, so the figures are close to, but not the
same task as, the grey digits'.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import ImageDataset, _split, load_digits_images

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


def hue_to_rgb(h: torch.Tensor) -> torch.Tensor:
    """Fully saturated colours of hue h ∈ [0, 1): (N, 1, H, W) → (N, 3, H, W) (HSV with S = V = 1)."""
    k = torch.stack([(5.0 + h * 6) % 6, (3.0 + h * 6) % 6, (1.0 + h * 6) % 6], 1).squeeze(2)
    return 1.0 - torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def orientation_colour(grey: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grey in [0, 1] → (N, 3, H, W) RGB in [0, 1]: white background, strokes coloured by orientation."""
    s = grey.clamp(0, 1)
    colour = hue_to_rgb(stroke_orientation(s) / math.pi)
    return (1.0 - s) + s * colour


def load_orientation_coloured_digits(image_size: int = 16) -> ImageDataset:
    """The digits recoloured by ``orientation_colour`` (see the module docstring), normalised per
    channel with the training set's mean and std like every other dataset."""
    grey, labels, classes = load_digits_images(image_size)
    images = orientation_colour(grey)
    xtr, ytr, xte, yte = _split(images, labels)
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return ImageDataset(NAME, ((xtr - mean) / std).contiguous(), ytr, ((xte - mean) / std).contiguous(), yte, classes,
                        mean, std)
