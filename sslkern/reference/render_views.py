"""Eager reference for ``render_views``: one view at a time, torchvision's float formulas.

Per view v (torchvision ``transforms/v2/functional`` on float images in [0, 1]):

  1. crop + resize of image ``src[v]`` (uint8 / 255) to S x S:
     - ``angle == 0``: antialiased bilinear resampling of the box, the weights of ATen's
       ``_upsample_bilinear2d_aa`` (= ``resized_crop(img, top, left, h, w, [S, S],
       antialias=True)`` for integer boxes): per axis, output i has the centre
       ``c = start + scale·(i + 0.5)``, ``scale = length / S``, and input pixel p the weight
       ``max(0, 1 - |p + 0.5 - c| / max(scale, 1))``, normalised over the pixels the box covers
       (``floor(start) <= p < ceil(start + length)``, within the image). Fractional boxes use
       the same formula.
     - ``angle != 0``: bilinear sampling without antialiasing of the box rotated by ``angle``
       about its centre (the content turns counter-clockwise, as torchvision's ``rotate``),
       border padding: ``grid_sample(mode="bilinear", padding_mode="border",
       align_corners=False)``.
  2. horizontal flip; 3. ColorJitter in the view's order (``adjust_brightness``,
     ``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``; identity factors are skipped,
     as torchvision skips a ``None`` factor); 4. grayscale (0.2989, 0.587, 0.114, 3 channels
     kept); 5. Gaussian blur (reflect padding, kernel exp(-d²/2σ²) normalised; size
     ``blur_kernel_size``, or ``2·ceil(3σ) + 1`` per view when it is None / 0; an index beyond a
     border reflects again, so any radius is defined); 6. solarize (x >= 0.5 → 1 - x);
     7. normalize ``(x - mean) / std``; 8. cast to ``out_dtype``.
Colour ops on one channel: saturation, hue and grayscale do nothing; contrast blends with the
image's own mean (torchvision's rule).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def box_pixels(start: float, length: float, in_size: int) -> tuple[int, int]:
    """The pixels ``[lo, hi)`` of an axis that the box ``[start, start + length)`` covers."""
    return max(math.floor(start), 0), min(math.ceil(start + length), in_size)


def aa_weights(start: float, length: float, out_size: int, in_size: int) -> torch.Tensor:
    """(out_size, hi - lo) fp32 matrix of ATen's antialiased bilinear weights for the box
    ``[start, start + length)`` of an axis of ``in_size`` pixels, over the pixels ``[lo, hi)``
    it covers (``box_pixels``)."""
    lo, hi = box_pixels(start, length, in_size)
    scale = length / out_size
    support = max(scale, 1.0)
    centre = start + scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)
    p = torch.arange(lo, hi, dtype=torch.float64)
    w = (1 - ((p[None, :] + 0.5 - centre[:, None]).abs() / support)).clamp(min=0)
    return (w / w.sum(1, keepdim=True)).float()


def resize_box(img: torch.Tensor, top: float, left: float, h: float, w: float, size: int) -> torch.Tensor:
    """(C, H, W) float → (C, size, size): the box resampled with antialiased bilinear weights."""
    (y0, y1), (x0, x1) = box_pixels(top, h, img.shape[1]), box_pixels(left, w, img.shape[2])
    wy = aa_weights(top, h, size, img.shape[1])
    wx = aa_weights(left, w, size, img.shape[2])
    return wy @ img[:, y0:y1, x0:x1] @ wx.T


def rotated_box(img: torch.Tensor, top: float, left: float, h: float, w: float, angle: float,
                size: int) -> torch.Tensor:
    """(C, H, W) → (C, size, size): the box rotated by ``angle`` (radians, counter-clockwise
    on screen) about its centre, sampled bilinearly with border padding."""
    H, W = img.shape[1:]
    t = (torch.arange(size, dtype=torch.float64) + 0.5) / size - 0.5
    v, u = torch.meshgrid(t * h, t * w, indexing="ij")        # offsets from the box centre
    cos, sin = math.cos(angle), math.sin(angle)
    x = left + w / 2 + cos * u - sin * v
    y = top + h / 2 + sin * u + cos * v
    grid = torch.stack([2 * x / W - 1, 2 * y / H - 1], dim=-1).float()[None]
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) → (1, H, W): torchvision's ``rgb_to_grayscale`` weights."""
    r, g, b = img.unbind(0)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(0)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: float) -> torch.Tensor:
    return (a * ratio + b * (1.0 - ratio)).clamp(0.0, 1.0)


def adjust_brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    return (img * factor).clamp(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    gray = grayscale(img) if img.shape[0] == 3 else img
    return _blend(img, gray.mean(), factor)


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    if img.shape[0] == 1:
        return img
    return _blend(img, grayscale(img), factor)


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(0)
    maxc, minc = img.max(0).values, img.min(0).values
    same = maxc == minc
    span = maxc - minc
    s = span / torch.where(same, torch.ones_like(maxc), maxc)
    span = torch.where(same, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    r = torch.stack([v, q, p, p, t, v]).gather(0, i[None])[0]
    g = torch.stack([t, v, v, q, p, p]).gather(0, i[None])[0]
    b = torch.stack([p, p, t, v, v, q]).gather(0, i[None])[0]
    return torch.stack([r, g, b])


def adjust_hue(img: torch.Tensor, shift: float) -> torch.Tensor:
    if img.shape[0] == 1:
        return img
    hsv = _rgb_to_hsv(img)
    hsv = torch.stack([torch.remainder(hsv[0] + shift, 1.0), hsv[1], hsv[2]])
    return _hsv_to_rgb(hsv)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect-101 indices (torch's ``reflect`` padding), folded again past the far border."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def blur_radius(sigma: torch.Tensor, kernel_size: int | None) -> torch.Tensor:
    """Kernel radius per view: ``kernel_size // 2``, or ``ceil(3σ)`` (fp32) when it is None / 0;
    0 where σ = 0 (no blur)."""
    sigma = sigma.float()
    r = torch.ceil(3.0 * sigma).long() if not kernel_size else torch.full_like(sigma, kernel_size // 2).long()
    return torch.where(sigma > 0, r, torch.zeros_like(r))


def gaussian_blur(img: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of (C, S, S) with reflect padding and 2·radius + 1 taps."""
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-d * d / (2.0 * sigma * sigma))
    k = (k / k.sum()).float()
    S0, S1 = img.shape[1:]
    rows = _reflect(torch.arange(S0)[:, None] + d.long()[None, :], S0)    # (S, K)
    cols = _reflect(torch.arange(S1)[:, None] + d.long()[None, :], S1)
    x = (img[:, rows, :] * k[None, None, :, None]).sum(2)                # vertical
    return (x[:, :, cols] * k).sum(-1)                                    # horizontal


def solarize(img: torch.Tensor) -> torch.Tensor:
    return torch.where(img >= 0.5, 1.0 - img, img)


def _image(data, offsets, hw, channels, n):
    H, W = int(hw[n, 0]), int(hw[n, 1])
    off = int(offsets[n])
    return data[off:off + H * W * channels].view(H, W, channels).permute(2, 0, 1).float() / 255.0


@torch.no_grad()
def render_view(img: torch.Tensor, box, angle: float, flip: bool, jitter, order, gray: bool, sigma: float, radius: int,
                solarize_: bool, size: int) -> torch.Tensor:
    """One view of a (C, H, W) float image in [0, 1], before normalisation (steps 1-6)."""
    top, left, h, w = (float(b) for b in box)
    x = resize_box(img, top, left, h, w, size) if angle == 0 else rotated_box(img, top, left, h, w, angle, size)
    if flip:
        x = x.flip(-1)
    b, c, s, hue = (float(f) for f in jitter)
    for op in order:
        op = int(op)
        if op == 0 and b != 1.0:
            x = adjust_brightness(x, b)
        elif op == 1 and c != 1.0:
            x = adjust_contrast(x, c)
        elif op == 2 and s != 1.0:
            x = adjust_saturation(x, s)
        elif op == 3 and hue != 0.0:
            x = adjust_hue(x, hue)
    if gray and x.shape[0] == 3:
        x = grayscale(x).expand(3, -1, -1)
    if sigma > 0:
        x = gaussian_blur(x, sigma, radius)
    if solarize_:
        x = solarize(x)
    return x


@torch.no_grad()
def render_views(images, params, size: int, mean, std, out_dtype: torch.dtype = torch.float32,
                 blur_kernel_size: int | None = None) -> torch.Tensor:
    """(V, C, size, size) views of a ``RaggedImages`` batch (fields ``data``, ``offsets``,
    ``hw``, ``channels``) by a ``ViewParams``; see the module docstring."""
    C = images.channels
    V = int(params.src.shape[0])
    dev = images.data.device
    out = torch.empty((V, C, size, size), dtype=out_dtype, device=dev)
    radius = blur_radius(params.blur_sigma, blur_kernel_size)
    m = torch.tensor(list(mean), dtype=torch.float32, device=dev).view(C, 1, 1)
    sd = torch.tensor(list(std), dtype=torch.float32, device=dev).view(C, 1, 1)
    for v in range(V):
        img = _image(images.data, images.offsets, images.hw, C, int(params.src[v]))
        x = render_view(img, params.box[v].tolist(), float(params.angle[v]), bool(params.flip[v]),
                        params.jitter[v].tolist(), params.jitter_order[v].tolist(), bool(params.gray[v]),
                        float(params.blur_sigma[v]), int(radius[v]), bool(params.solarize[v]), size)
        out[v] = ((x - m) / sd).to(out_dtype)
    return out
