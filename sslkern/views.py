"""Per-view augmentation parameters for ``sslkern.render_views``, drawn from caller-given uniforms.

A pipeline is a list of :class:`ViewSpec` (one per kind of view: DINO's two global crops and its
local crops, BYOL's two asymmetric views, one MIM crop). For a batch of images the caller draws
``u`` — ``(V, spec.num_uniforms)`` float64 uniforms in [0, 1) — from its own seeded generator
and :func:`draw_view_params` turns them into :class:`ViewParams`, a pure function of
``(spec, hw, u)``: no random numbers are drawn here, so a training loop that draws ``u`` for the
global batch and slices its rank's rows gets the same views for any world size or worker count.

The distributions are torchvision's (``torchvision/transforms/transforms.py``):

- ``RandomResizedCrop.get_params``: 10 tries of ``area = U(scale)·H·W`` and
  ``aspect = exp(U(log ratio))``; ``w = round(sqrt(area·aspect))``, ``h = round(sqrt(area/aspect))``
  (round half to even, as Python's ``round``); the first try with ``0 < w <= W`` and
  ``0 < h <= H`` wins, with ``top = randint(0, H - h + 1)``, ``left = randint(0, W - w + 1)``;
  if none does, the central crop of the fallback (the whole image, or the largest centred box
  of aspect ``ratio[0]`` / ``ratio[1]`` when the image is narrower / wider than the range).
  ``integer_boxes=False`` keeps ``w`` and ``h`` unrounded and draws ``top`` in ``[0, H - h]``
  continuously (sub-pixel boxes, for tiny images such as 8x8 digits).
- ``RandomHorizontalFlip(p)``, ``RandomApply([ColorJitter(b, c, s, h)], p)`` with
  ``ColorJitter.get_params`` (factors ``U[max(0, 1 - v), 1 + v]``, hue ``U[-h, h]``, the order
  ``fn_idx`` a uniformly random permutation of the four ops), ``RandomGrayscale(p)``,
  ``GaussianBlur`` applied with probability ``blur_p`` and ``sigma = U(blur_sigma)``,
  solarization with probability ``solarize_p``. A rotation ``U(-degrees, degrees)`` is an
  extra (not part of torchvision's RandomResizedCrop).

Uniform columns of one view (``num_uniforms = 37``, the same for every spec, so changing one
probability leaves the other draws as they were): 0-9 crop areas, 10-19 log-aspects, 20 top,
21 left, 22 angle, 23 flip, 24 jitter applied, 25-28 brightness / contrast / saturation / hue,
29-32 jitter order keys (their argsort is the permutation), 33 grayscale, 34 blur applied,
35 blur sigma, 36 solarize. A Bernoulli(p) event is ``u < p``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ._checks import check_tensor, fail

__all__ = ["ViewSpec", "ViewParams", "draw_view_params", "dino_multicrop", "swav_multicrop", "two_views", "single_view"]

NUM_UNIFORMS = 37
_TRIES = 10
_AREA, _LOG_RATIO, _TOP, _LEFT, _ANGLE, _FLIP = 0, 10, 20, 21, 22, 23
_JITTER, _FACTORS, _ORDER, _GRAY, _BLUR, _SIGMA, _SOLARIZE = 24, 25, 29, 33, 34, 35, 36


def _pair(name: str, value, lo_open: float | None = 0.0, hi: float | None = None) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        fail("ViewSpec", f"{name} expected a (min, max) pair, got {value!r}", TypeError)
    a, b = float(value[0]), float(value[1])
    if not (math.isfinite(a) and math.isfinite(b)) or a > b or (lo_open is not None and a <= lo_open) or (
            hi is not None and b > hi):
        bound = f" in ({lo_open}, {'inf' if hi is None else hi}]" if lo_open is not None else ""
        fail("ViewSpec", f"{name} expected finite min <= max{bound}, got {value!r}")
    return (a, b)


@dataclass(frozen=True)
class ViewSpec:
    """One kind of view: torchvision semantics, parameters drawn per view.

    ``size`` is the square output side S. ``scale`` / ``ratio`` are RandomResizedCrop's area
    fraction and aspect range (log-uniform); ``integer_boxes`` its rounded integer boxes (False:
    continuous sub-pixel boxes). ``degrees``: rotation ``U(-degrees, degrees)`` of the crop about
    its centre. ``flip_p``: horizontal flip. ``jitter_p``: ``RandomApply(ColorJitter(brightness,
    contrast, saturation, hue), jitter_p)``. ``gray_p``: RandomGrayscale. ``blur_p`` /
    ``blur_sigma``: Gaussian blur probability and sigma range, in output pixels. ``solarize_p``:
    solarization (threshold 0.5 on [0, 1] values, i.e. 128 on uint8).
    """

    size: int
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    integer_boxes: bool = True
    degrees: float = 0.0
    flip_p: float = 0.0
    jitter_p: float = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            fail("ViewSpec", f"size expected a positive int, got {self.size!r}", TypeError if not isinstance(
                self.size, int) else ValueError)
        object.__setattr__(self, "scale", _pair("scale", self.scale))
        object.__setattr__(self, "ratio", _pair("ratio", self.ratio))
        object.__setattr__(self, "blur_sigma", _pair("blur_sigma", self.blur_sigma))
        if not isinstance(self.integer_boxes, bool):
            fail("ViewSpec", f"integer_boxes expected a bool, got {self.integer_boxes!r}", TypeError)
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                fail("ViewSpec", f"{name} expected a probability in [0, 1], got {v!r}")
        for name, hi in (("brightness", None), ("contrast", None), ("saturation", None), ("hue", 0.5),
                         ("degrees", 180.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(float(v)) or float(v) < 0 or (
                    hi is not None and float(v) > hi):
                fail("ViewSpec", f"{name} expected a number in [0, {'inf' if hi is None else hi}], got {v!r}")

    @property
    def num_uniforms(self) -> int:
        """Uniforms one view consumes (the columns of ``u`` in :func:`draw_view_params`)."""
        return NUM_UNIFORMS


@dataclass
class ViewParams:
    """Per-view parameters of ``sslkern.render_views`` (V views, all tensors on one device).

    ``src`` (V,) int64: the image of the ``RaggedImages`` batch. ``box`` (V, 4) float32: top,
    left, height, width in source pixels. ``angle`` (V,) float32 radians, counter-clockwise as
    ``torchvision.transforms.functional.rotate`` (0 = none). ``flip`` (V,) bool: horizontal flip
    of the output. ``jitter`` (V, 4) float32: brightness, contrast, saturation factors and hue
    shift (1, 1, 1, 0 = no jitter). ``jitter_order`` (V, 4) int64: the permutation of 0..3
    (brightness, contrast, saturation, hue) applied in that order (torchvision's ``fn_idx``).
    ``gray`` (V,) bool. ``blur_sigma`` (V,) float32: 0 = no blur. ``solarize`` (V,) bool.
    """

    src: torch.Tensor
    box: torch.Tensor
    angle: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_order: torch.Tensor
    gray: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor

    def __len__(self) -> int:
        return int(self.src.shape[0])

    def to(self, device, non_blocking: bool = False) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    @staticmethod
    def cat(parts: list["ViewParams"]) -> "ViewParams":
        """The views of ``parts`` one after another (e.g. DINO's two global crops: all images'
        first crop, then all images' second crop)."""
        if not parts:
            fail("ViewParams.cat", "parts expected a non-empty list of ViewParams, got []")
        return ViewParams(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(ViewParams)})

    def select(self, index: torch.Tensor | slice) -> "ViewParams":
        """The views at ``index`` (rows of every field)."""
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _crop_boxes(spec: ViewSpec, H: torch.Tensor, W: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop.get_params for every view at once: (V, 4) float64 top, left, h, w."""
    area = (H * W).unsqueeze(1)                                             # (V, 1)
    Hc, Wc = H.unsqueeze(1), W.unsqueeze(1)
    s0, s1 = spec.scale
    r0, r1 = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    target = area * (s0 + (s1 - s0) * u[:, _AREA:_AREA + _TRIES])         # (V, 10)
    aspect = torch.exp(r0 + (r1 - r0) * u[:, _LOG_RATIO:_LOG_RATIO + _TRIES])
    w = torch.sqrt(target * aspect)
    h = torch.sqrt(target / aspect)
    if spec.integer_boxes:
        w, h = torch.round(w), torch.round(h)                               # half to even, as Python's round
    ok = (w > 0) & (w <= Wc) & (h > 0) & (h <= Hc)
    first = ok.to(torch.int8).argmax(1, keepdim=True)                       # the first try that fits
    found = ok.any(1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    if spec.integer_boxes:
        top = torch.minimum(torch.floor(u[:, _TOP] * (H - h + 1)), H - h)  # randint(0, H - h + 1)
        left = torch.minimum(torch.floor(u[:, _LEFT] * (W - w + 1)), W - w)
    else:
        top, left = u[:, _TOP] * (H - h), u[:, _LEFT] * (W - w)
    # fallback: central crop, clipped to the ratio range
    in_ratio = W / H
    fw = torch.where(in_ratio < spec.ratio[0], W, torch.where(in_ratio > spec.ratio[1], H * spec.ratio[1], W))
    fh = torch.where(in_ratio < spec.ratio[0], W / spec.ratio[0], H)
    if spec.integer_boxes:
        fw, fh = torch.round(fw), torch.round(fh)
        ftop, fleft = torch.div(H - fh, 2, rounding_mode="floor"), torch.div(W - fw, 2, rounding_mode="floor")
    else:
        ftop, fleft = (H - fh) / 2, (W - fw) / 2
    return torch.stack([torch.where(found, top, ftop), torch.where(found, left, fleft),
                        torch.where(found, h, fh), torch.where(found, w, fw)], dim=1)


def draw_view_params(spec: ViewSpec, hw: torch.Tensor, u: torch.Tensor, src: torch.Tensor | None = None) -> ViewParams:
    """Parameters of V views of kind ``spec`` from the caller's uniforms (pure, deterministic).

    Args:
        spec: the kind of view.
        hw: (B, 2) integer tensor, (H, W) of each image of the batch (``RaggedImages.hw``).
        u: (V, spec.num_uniforms) float64 (or float32) uniforms in [0, 1), one row per view,
            drawn by the caller; column layout in the module docstring.
        src: (V,) int64 image of each view, in [0, B); default ``arange(B)`` (one view per
            image, V = B).

    Returns :class:`ViewParams` on ``u``'s device (``hw`` and ``src`` must be on it too).
    """
    op = "draw_view_params"
    if not isinstance(spec, ViewSpec):
        fail(op, f"spec expected a ViewSpec, got {type(spec).__name__}", TypeError)
    check_tensor(op, "hw", hw, dtypes=(torch.int64, torch.int32, torch.int16), ndim=2)
    if hw.shape[1] != 2:
        fail(op, f"hw expected shape (B, 2), got {tuple(hw.shape)}")
    check_tensor(op, "u", u, dtypes=(torch.float64, torch.float32), ndim=2)
    if src is None:
        src = torch.arange(hw.shape[0], device=hw.device)
    check_tensor(op, "src", src, dtypes=(torch.int64, torch.int32), ndim=1)
    V = int(src.shape[0])
    if tuple(u.shape) != (V, spec.num_uniforms):
        fail(op, f"u expected shape ({V}, {spec.num_uniforms}) (one row per view, spec.num_uniforms columns), "
                 f"got {tuple(u.shape)}")
    if not (hw.device == u.device == src.device):
        fail(op, f"hw, u and src expected on one device, got {hw.device}, {u.device}, {src.device}")
    if V and hw.device.type == "cpu":  # free on the CPU; on a GPU these would be host syncs
        if bool((hw <= 0).any()):
            fail(op, f"hw expected positive sizes, got {hw[(hw <= 0).any(1)][0].tolist()}")
        if bool(((src < 0) | (src >= hw.shape[0])).any()):
            bad = src[(src < 0) | (src >= hw.shape[0])][0].item()
            fail(op, f"src expected values in [0, {hw.shape[0]}), got {bad}")
        if bool(((u < 0) | (u >= 1) | u.isnan()).any()):
            fail(op, "u expected values in [0, 1)")
    src = src.long()
    u = u.double()
    size = hw.double()[src]
    H, W = size[:, 0], size[:, 1]
    box = _crop_boxes(spec, H, W, u)
    angle = (2 * u[:, _ANGLE] - 1) * math.radians(spec.degrees) + 0.0  # + 0.0: no -0.0
    flip = u[:, _FLIP] < spec.flip_p
    jitter_on = (u[:, _JITTER] < spec.jitter_p).unsqueeze(1)
    lo = torch.tensor([max(0.0, 1 - spec.brightness), max(0.0, 1 - spec.contrast), max(0.0, 1 - spec.saturation),
                       -spec.hue], dtype=torch.float64, device=u.device)
    hi = torch.tensor([1 + spec.brightness, 1 + spec.contrast, 1 + spec.saturation, spec.hue], dtype=torch.float64,
                      device=u.device)
    factors = lo + (hi - lo) * u[:, _FACTORS:_FACTORS + 4]
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=u.device)
    jitter = torch.where(jitter_on, factors, identity)
    order = u[:, _ORDER:_ORDER + 4].argsort(dim=1)
    gray = u[:, _GRAY] < spec.gray_p
    s0, s1 = spec.blur_sigma
    sigma = torch.where(u[:, _BLUR] < spec.blur_p, s0 + (s1 - s0) * u[:, _SIGMA], torch.zeros_like(u[:, _SIGMA]))
    solarize = u[:, _SOLARIZE] < spec.solarize_p
    return ViewParams(src=src, box=box.float(), angle=angle.float(), flip=flip, jitter=jitter.float(),
                      jitter_order=order, gray=gray, blur_sigma=sigma.float(), solarize=solarize)


# ------------------------------------------------------------------------------------------
# Named pipelines
# ------------------------------------------------------------------------------------------
def dino_multicrop(global_size: int = 224, local_size: int = 96, n_local: int = 10, global_scale=(0.4, 1.0),
                   local_scale=(0.05, 0.4), color: bool = True, inverted_blur: bool = False) -> list[ViewSpec]:
    """DINO multi-crop: two global crops then ``n_local`` local crops.

    dino ``main_dino.py: DataAugmentationDINO``: every crop RandomResizedCrop, flip 0.5, and
    (``color``) ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 and RandomGrayscale 0.2; Gaussian blur
    (sigma U(0.1, 2)) with p 1.0 on global crop 1, 0.1 on global crop 2 and 0.5 on local crops;
    solarization 0.2 on global crop 2 only. (dino crops with bicubic interpolation and blurs with
    PIL's ``ImageFilter.GaussianBlur(radius=sigma)``; the renderer uses antialiased bilinear
    resampling and an exact Gaussian kernel.)

    ``inverted_blur=True`` is dinov2's and dinov3's behaviour (``dinov2/data/augmentations.py``,
    ``dinov3/data/augmentations.py``): their ``GaussianBlur(p)`` subclasses
    ``transforms.RandomApply`` with ``p = 1 - p``, so global crop 1 (``GaussianBlur(p=1.0)``) is
    never blurred, global crop 2 (``GaussianBlur(p=0.1)``) is blurred with probability 0.9 and
    local crops (``p=0.5``) with 0.5; their blur is torchvision's ``GaussianBlur(kernel_size=9,
    sigma=(0.1, 2.0))``, so pass ``blur_kernel_size=9`` to ``render_views`` to match it exactly.
    Everything else is as in dino (flip in the geometric part, then jitter, grayscale, blur,
    solarize 0.2 on global crop 2).

    ``color=False`` leaves only crops and flips (and no blur or solarization).
    """
    g1_blur, g2_blur = (0.0, 0.9) if inverted_blur else (1.0, 0.1)
    col = dict(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2) if color else {}
    g1 = ViewSpec(global_size, scale=global_scale, flip_p=0.5, blur_p=g1_blur if color else 0.0, **col)
    g2 = ViewSpec(global_size, scale=global_scale, flip_p=0.5, blur_p=g2_blur if color else 0.0,
                  solarize_p=0.2 if color else 0.0, **col)
    local = ViewSpec(local_size, scale=local_scale, flip_p=0.5, blur_p=0.5 if color else 0.0, **col)
    return [g1, g2] + [local] * n_local


def swav_multicrop(global_size: int = 224, local_size: int = 96, n_global: int = 2, n_local: int = 6,
                   global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), color: bool = True) -> list[ViewSpec]:
    """SwAV multi-crop: ``n_global`` crops at ``global_size`` then ``n_local`` at ``local_size``.

    swav ``src/multicropdataset.py: MultiCropDataset`` (defaults: ``swav_800ep_pretrain.sh``,
    2 × 224 at (0.14, 1) + 6 × 96 at (0.05, 0.14)): every crop the same pipeline,
    RandomResizedCrop, flip 0.5 and (``color``) ``get_color_distortion(s=1)`` —
    ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, RandomGrayscale 0.2 — then a Gaussian blur
    with p 0.5, sigma U(0.1, 2) (swav's ``RandomGaussianBlur``: cv2, 23 × 23 taps); no
    solarization. ``color=False`` leaves crops and flips.
    """
    col = dict(jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, gray_p=0.2, blur_p=0.5) if color \
        else {}
    return ([ViewSpec(global_size, scale=global_scale, flip_p=0.5, **col)] * n_global
            + [ViewSpec(local_size, scale=local_scale, flip_p=0.5, **col)] * n_local)


def two_views(size: int = 224, scale=(0.08, 1.0), asymmetric: bool = True, color: bool = True) -> list[ViewSpec]:
    """Two views of each image (BYOL / Barlow Twins / VICReg).

    BYOL's augmentations (Grill et al. 2020, table 6; solo-learn's and lightly's BYOL transforms):
    RandomResizedCrop, flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2;
    ``asymmetric``: Gaussian blur p 1.0 on view 1 and 0.1 on view 2, solarization 0 on view 1
    and 0.2 on view 2; otherwise blur 0.5 and no solarization on both.
    """
    col = dict(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2) if color else {}
    if not color:
        return [ViewSpec(size, scale=scale, flip_p=0.5)] * 2
    if asymmetric:
        return [ViewSpec(size, scale=scale, flip_p=0.5, blur_p=1.0, **col),
                ViewSpec(size, scale=scale, flip_p=0.5, blur_p=0.1, solarize_p=0.2, **col)]
    return [ViewSpec(size, scale=scale, flip_p=0.5, blur_p=0.5, **col)] * 2


def single_view(size: int = 224, scale=(0.2, 1.0)) -> list[ViewSpec]:
    """One crop + flip per image (MAE / BEiT / data2vec MIM pretraining: RandomResizedCrop(scale),
    RandomHorizontalFlip; MAE uses scale (0.2, 1.0))."""
    return [ViewSpec(size, scale=scale, flip_p=0.5)]
