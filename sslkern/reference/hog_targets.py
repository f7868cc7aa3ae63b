"""Eager reference for ``hog_targets`` (MaskFeat HOG targets).

Follows SlowFast ``slowfast/models/operators.py: HOGLayerC`` and the target unfolding of
``slowfast/models/masked.py: MaskMViT._get_hog_label_2d``, per channel:

  1. reflect-pad the image by 1 pixel, 3x3 Sobel filters ``gx`` (kernel ``[[1,0,-1],[2,0,-2],
     [1,0,-1]]``, cross-correlation as ``F.conv2d``) and ``gy`` (its transpose);
  2. magnitude ``sqrt(gx² + gy²)``, optionally times a Gaussian window tiled over the image;
  3. unsigned orientation bin ``floor(atan2(gx, gy) / π · nbins) mod nbins``;
  4. per cell of ``pool`` x ``pool`` pixels, the magnitude summed per bin, then each cell's
     ``nbins`` histogram L2-normalised (``F.normalize(dim=bins)``, eps 1e-12);
  5. per patch the features in MaskFeat's order ``(channel, bin, cell row, cell col)``.

Step 3 is computed without ``atan2``: with the vector ``(a, b) = (gy, gx)`` turned into the
upper half plane (negated when ``b < 0``, or ``b == 0`` and ``a < 0``), its angle θ ∈ [0, π) is
``atan2(gx, gy) mod π`` and ``floor(atan2 / π · n) mod n = floor(θ · n / π)``, i.e. the number
of edges ``t_k = kπ/n`` (k = 1..n-1) with ``b·cos t_k >= a·sin t_k``. The same comparison of
two rounded products runs in the C++ and Triton kernels, so every backend puts every pixel
in the same bin; ``atan2`` itself (HOGLayerC) can differ from it for a pixel within a few
ulp of a bin edge. The Sobel sums are taken in the kernels' order.
"""
from __future__ import annotations

import math

import torch


def gaussian_window(size: int, device=None) -> torch.Tensor:
    """SlowFast ``models/utils.py: get_gkern(size, size // 2)``: outer product of a 1-D
    Gaussian (std ``size // 2`` around the centre), divided by its sum; (size, size) fp32."""
    n = torch.arange(0, size, device=device).float()
    n -= n.mean()
    n /= size // 2
    w = torch.exp(-0.5 * n ** 2)
    g = torch.outer(w, w)
    return g / g.sum()


def bin_edges(nbins: int) -> tuple[list[float], list[float]]:
    """(cos t_k, sin t_k) rounded to fp32, t_k = kπ/nbins, k = 1..nbins-1."""
    cos = [float(torch.tensor(math.cos(k * math.pi / nbins), dtype=torch.float32)) for k in range(1, nbins)]
    sin = [float(torch.tensor(math.sin(k * math.pi / nbins), dtype=torch.float32)) for k in range(1, nbins)]
    return cos, sin


def orientation_bins(gx: torch.Tensor, gy: torch.Tensor, nbins: int) -> torch.Tensor:
    """``floor(atan2(gx, gy) / π · nbins) mod nbins`` by edge comparisons (int64, same shape)."""
    a, b = gy, gx
    flip = (b < 0) | ((b == 0) & (a < 0))
    a, b = torch.where(flip, -a, a), torch.where(flip, -b, b)
    cos, sin = bin_edges(nbins)
    bins = torch.zeros(gx.shape, dtype=torch.int64, device=gx.device)
    for c, s in zip(cos, sin):
        bins += (b * c >= a * s).long()
    return bins


@torch.no_grad()
def hog_targets(images: torch.Tensor, patch_size: int, pool: int = 8, nbins: int = 9, gaussian_window_size: int = 0,
                ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) → (B, N, C·(p/pool)²·nbins) fp32 HOG targets (B, Nm, ·) at ``ids``."""
    x = images.float()
    B, C, H, W = x.shape
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    d = xp[..., :-2] - xp[..., 2:]                            # horizontal difference (B, C, H+2, W)
    gx = (d[:, :, :-2] + 2 * d[:, :, 1:-1]) + d[:, :, 2:]     # (B, C, H, W)
    s = (xp[..., :-2] + 2 * xp[..., 1:-1]) + xp[..., 2:]      # horizontal smoothing
    gy = s[:, :, :-2] - s[:, :, 2:]
    mag = torch.sqrt(gx * gx + gy * gy)
    if gaussian_window_size:
        g = gaussian_window(gaussian_window_size, x.device)
        mag = mag * g.repeat(H // gaussian_window_size, W // gaussian_window_size)
    bins = orientation_bins(gx, gy, nbins)
    hc, wc = H // pool, W // pool
    cell = (torch.arange(H, device=x.device) // pool).view(H, 1) * wc + (torch.arange(W, device=x.device) // pool)
    hist = torch.zeros(B, C, nbins * hc * wc, device=x.device)
    hist.scatter_add_(2, (bins * (hc * wc) + cell).flatten(2), mag.flatten(2))
    hist = torch.nn.functional.normalize(hist.view(B, C, nbins, hc, wc), p=2, dim=2)
    u = patch_size // pool                                    # cells per patch side
    hp, wp = H // patch_size, W // patch_size
    out = hist.view(B, C, nbins, hp, u, wp, u).permute(0, 3, 5, 1, 2, 4, 6).reshape(B, hp * wp, C * nbins * u * u)
    if ids is not None:
        out = out.gather(1, ids.long().unsqueeze(-1).expand(-1, -1, out.shape[-1]))
    return out.contiguous()
