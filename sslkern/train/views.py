"""The recipes' views: their options mapped onto :mod:`sslkern.views` specs.

Every view is rendered on the training device by :func:`sslkern.render_views` from
per-view parameters drawn by the step's context (``ctx.views(images, specs)``). The named
pipelines follow the papers (DINO and SwAV multi-crop, BYOL / Barlow Twins / VICReg two
asymmetric views, one crop for masked image modelling); what the small defaults change is applied
here, once:

  * rotation ``--degrees`` (U(−d, d), not in the papers; it helps on the 16×16 digits);
  * the small in-memory sets (digits, CIFAR) use continuous crop boxes — torchvision's
    integer boxes would give a 8-pixel digit only three crop sizes;
  * grey data gets no flips (digits are not mirror-symmetric) and no colour ops;
  * the Gaussian-blur σ range (0.1, 2) is in pixels of a 224-pixel crop and scales with
    the global crop size (σ · size / 224), so the blur is the same fraction of the image at
    every resolution (at 224 it is DINO's).
"""
from __future__ import annotations

import dataclasses

from sslkern import views as V


def _adapt(specs, data, *, degrees: float = 0.0, flip_p: float | None = None, global_size: int | None = None):
    rgb = data.channels == 3
    f = (global_size or specs[0].size) / 224
    out = []
    for s in specs:
        kw = dict(degrees=degrees, integer_boxes=not data.in_memory,
                  blur_sigma=(s.blur_sigma[0] * f, s.blur_sigma[1] * f))
        if not rgb:
            kw.update(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
        elif flip_p is not None:
            kw.update(flip_p=flip_p)
        out.append(dataclasses.replace(s, **kw))
    return out


def multicrop(a, data, *, inverted_blur: bool = False) -> list:
    """DINO multi-crop: 2 global crops at ``--image-size`` + ``--local-crops`` at ``--local-size``."""
    specs = V.dino_multicrop(global_size=a.image_size, local_size=a.local_size, n_local=a.local_crops,
                             global_scale=tuple(a.global_scale), local_scale=tuple(a.local_scale),
                             color=data.channels == 3, inverted_blur=inverted_blur)
    return _adapt(specs, data, degrees=a.degrees, global_size=a.image_size)


def swav_multicrop(a, data) -> list:
    """SwAV multi-crop: 2 crops at ``--image-size`` (``--global-scale``) + ``--local-crops`` at
    ``--local-size`` (``--local-scale``), swav's colour distortion and blur p 0.5 for RGB data."""
    specs = V.swav_multicrop(global_size=a.image_size, local_size=a.local_size, n_local=a.local_crops,
                             global_scale=tuple(a.global_scale), local_scale=tuple(a.local_scale),
                             color=data.channels == 3)
    return _adapt(specs, data, degrees=a.degrees, global_size=a.image_size)


def two_views(a, data, *, asymmetric: bool = True) -> list:
    """Two crops at ``--image-size`` (``--crop-scale``; BYOL's asymmetric blur / solarize for RGB)."""
    specs = V.two_views(a.image_size, tuple(a.crop_scale), asymmetric=asymmetric, color=data.channels == 3)
    return _adapt(specs, data, degrees=a.degrees, flip_p=getattr(a, "flip_p", None))


def add_crop_arguments(g, *, scale=(0.5, 1.0), degrees: float = 10.0) -> None:
    """``--crop-scale``, ``--degrees`` and ``--flip-p``: the crop options of every recipe with
    one crop per view (:func:`single_view`, :func:`two_views`).

    The defaults are those tuned for the default data; the papers' settings at 224 pixels are
    the recipes' ``--preset paper``."""
    g.add_argument("--crop-scale", type=float, nargs=2, default=scale,
                   help="random resized crop area range (the papers: --preset paper)")
    g.add_argument("--degrees", type=float, default=degrees, help="random rotation of every view (the papers: none)")
    g.add_argument("--flip-p", type=float, default=None,
                   help="horizontal flip probability (default: 0.5 for RGB data, 0 for grey digits)")


def check_crop_arguments(a, error) -> None:
    lo, hi = a.crop_scale
    if not 0 < lo <= hi <= 1:
        error(f"--crop-scale expected 0 < lo <= hi <= 1, got {lo} {hi}")
    if a.degrees < 0:
        error(f"--degrees expected >= 0, got {a.degrees}")
    if a.flip_p is not None and not 0 <= a.flip_p <= 1:
        error(f"--flip-p expected in [0, 1], got {a.flip_p}")


def single_view(a, data, *, scale=(0.5, 1.0), degrees: float = 10.0) -> list:
    """One crop at ``--image-size`` (masked image modelling): crop + flip (RGB), no colour ops.

    ``--crop-scale`` / ``--degrees`` / ``--flip-p`` (:func:`add_crop_arguments`) where the
    recipe has them, else ``scale`` / ``degrees`` and the default flip."""
    scale, degrees = getattr(a, "crop_scale", scale), getattr(a, "degrees", degrees)
    return _adapt(V.single_view(a.image_size, tuple(scale)), data, degrees=degrees, flip_p=getattr(a, "flip_p", None))
