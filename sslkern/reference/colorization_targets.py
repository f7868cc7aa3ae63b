"""Eager reference for ``colorization_targets`` (Zhang, Isola & Efros 2016, colorization targets).

Follows richzhang/colorization ``resources/caffe_traininglayers.py`` and the training net
``models/colorization_train_val_v2.prototxt``:

  1. ``BGR2LabLayer``: skimage ``rgb2lab`` (sRGB, D65, 2° observer) of the RGB image;
  2. ``data_ab_ss``: the ab channels point-sampled at stride s (a 1x1 convolution of stride
     s, no padding: pixels 0, s, 2s, ...);
  3. ``NNEncLayer`` / ``NNEncode``: the 10 nearest of the 313 in-gamut bins (sklearn
     ``NearestNeighbors``), weights ``exp(-d²/(2σ²))`` with σ = 5, normalised to sum 1;
  4. ``PriorBoostLayer`` / ``PriorFactor``: the factor of the bin with the largest weight (the
     nearest bin; ``np.argmax`` keeps the lowest bin id on a tie);
  5. ``NonGrayMaskLayer``: 1 if any sampled pixel of the image has ``|a| > 5`` or ``|b| > 5``.

The rebalancing weight of a pixel is (4) times (5), as the net's ``prior_boost_nongray``.

Here the nearest bins are found by sorting the squared distances to all 313 bins (stable:
equal distances keep the lower bin id first); the released code uses a ball tree, whose
order among exactly equidistant bins is its own. RGB values are clamped to [0, 1] first
(the released code converts uint8 images, always in range).

The 313 bins (``ab_bins``): the points of the grid of step 10 over ab whose square of side 20
(one grid step either way in a and in b) meets the convex hull of the ab values of the sRGB
colours — ``derive_in_gamut_bins`` computes them from the colour conversion; the shipped table
``AB_BIN_ROWS`` is its result (checked against the derivation in the tests; docs/ops/
colorization_targets.md says how it was compared with the released ``pts_in_hull.npy``).
"""
from __future__ import annotations

import math

import torch

# skimage.color.colorconv: sRGB (D65) -> XYZ, and the D65 2° reference white
XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                (0.212671, 0.715160, 0.072169),
                (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.95047, 1.0, 1.08883)
GRID = 10

# a -> (lowest b, highest b) of the in-gamut bins in that row of the grid (bins every GRID)
AB_BIN_ROWS = {
    -90: (50, 90), -80: (20, 90), -70: (0, 90), -60: (-20, 90), -50: (-30, 100), -40: (-40, 100),
    -30: (-50, 100), -20: (-50, 100), -10: (-60, 100), 0: (-70, 100), 10: (-80, 90), 20: (-80, 90),
    30: (-90, 90), 40: (-100, 90), 50: (-100, 80), 60: (-110, 80), 70: (-110, 80), 80: (-110, 70),
    90: (-110, 70), 100: (-90, 0),
}


def ab_bins(device=None) -> torch.Tensor:
    """The 313 in-gamut ab bin centres, (313, 2) fp32, a-major then b ascending (the released order)."""
    pts = [(a, b) for a, (lo, hi) in sorted(AB_BIN_ROWS.items()) for b in range(lo, hi + 1, GRID)]
    return torch.tensor(pts, dtype=torch.float32, device=device)


def derive_in_gamut_bins(grid: int = GRID, levels: int = 64) -> torch.Tensor:
    """The in-gamut bins from the colour conversion, (Q, 2) fp32 in ``ab_bins`` order.

    A bin centre q (a multiple of ``grid`` in a and b) is in gamut when the square
    ``[q - grid, q + grid]²`` meets the convex hull of the ab values of the sRGB colours, i.e.
    when q lies in that hull grown by ``grid`` in a and b (the hull of its vertices shifted by
    (±grid, ±grid)). The hull is taken over the RGB cube sampled at ``levels`` values per
    channel plus every 8-bit colour of its six faces, where the extreme chromas lie.
    """
    import numpy as np
    from scipy.spatial import ConvexHull

    v = torch.linspace(0, 1, levels, dtype=torch.float64)
    cube = torch.stack(torch.meshgrid(v, v, v, indexing="ij"), 0).reshape(3, -1)
    e = torch.arange(256, dtype=torch.float64) / 255
    s, t = (x.reshape(-1) for x in torch.meshgrid(e, e, indexing="ij"))
    faces = []
    for ch in range(3):
        for val in (0.0, 1.0):
            f = torch.empty(3, s.numel(), dtype=torch.float64)
            others = [c for c in range(3) if c != ch]
            f[ch], f[others[0]], f[others[1]] = val, s, t
            faces.append(f)
    rgb = torch.cat([cube] + faces, 1).reshape(1, 3, -1, 1)
    ab = rgb_to_lab(rgb)[0, 1:, :, 0].T.numpy()
    hull = ab[ConvexHull(ab).vertices]
    grown = np.concatenate([hull + np.array([da, db]) for da in (-grid, grid) for db in (-grid, grid)])
    eq = ConvexHull(grown).equations                          # normal·x + offset <= 0 inside
    r = int(math.ceil(np.abs(grown).max() / grid)) * grid
    q = np.array([(a, b) for a in range(-r, r + 1, grid) for b in range(-r, r + 1, grid)], dtype=np.float64)
    inside = (q @ eq[:, :2].T + eq[:, 2] <= 1e-9).all(1)
    return torch.from_numpy(q[inside]).float()


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """skimage ``rgb2lab`` (sRGB, D65, 2°) of (B, 3, H, W) images in [0, 1] (clamped) → (B, 3, H, W) Lab.

    Computed in fp32 (fp64 for fp64 input) with the sums in the order the kernels use.
    """
    dt = torch.float64 if rgb.dtype == torch.float64 else torch.float32
    x = rgb.to(dt).clamp(0.0, 1.0)
    lin = torch.where(x > 0.04045, torch.pow((x + 0.055) / 1.055, 2.4), x / 12.92)
    r, g, b = lin[:, 0], lin[:, 1], lin[:, 2]
    f = []
    for row, white in zip(XYZ_FROM_RGB, D65_WHITE):
        t = ((row[0] * r + row[1] * g) + row[2] * b) / white
        f.append(torch.where(t > 0.008856, torch.pow(t.clamp_min(0.0), 1.0 / 3.0), 7.787 * t + 16.0 / 116.0))
    fx, fy, fz = f
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], 1)


@torch.no_grad()
def colorization_targets(images: torch.Tensor, factor: torch.Tensor, stride: int = 4, num_neighbors: int = 10,
                         sigma: float = 5.0, grey_threshold: float = 5.0, bins: torch.Tensor | None = None):
    """(B, 3, H, W) RGB → (bin_ids int16 (B, h, w, K), weights fp32 (B, h, w, K), rebalance fp32 (B, h, w),
    nongray bool (B,)), h = ceil(H / stride), w = ceil(W / stride); bins nearest first."""
    bins = ab_bins(images.device) if bins is None else bins.float()
    ab = rgb_to_lab(images[:, :, ::stride, ::stride].float())[:, 1:].permute(0, 2, 3, 1)   # (B, h, w, 2)
    da = ab[..., None, 0] - bins[:, 0]
    db = ab[..., None, 1] - bins[:, 1]
    d2 = da * da + db * db                                                               # (B, h, w, Q)
    order = torch.sort(d2, dim=-1, stable=True).indices[..., :num_neighbors]
    dk = d2.gather(-1, order)
    w = torch.exp(-dk / (2.0 * sigma * sigma))
    w = w / w.sum(-1, keepdim=True)
    nongray = (ab.abs() > grey_threshold).flatten(1).any(1)
    rebalance = factor.float()[order[..., 0]] * nongray[:, None, None].float()
    return order.to(torch.int16), w, rebalance, nongray
