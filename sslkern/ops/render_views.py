"""``render_views`` — training views (crop, resize, flip, colour, blur, solarize, normalise) from a
ragged batch of decoded uint8 images, every view of one output size in one call.

A decode-only loader hands over :class:`RaggedImages` (each image at its own size, back to back
in one uint8 buffer); ``sslkern.views.draw_view_params`` turns the caller's uniforms into
per-view parameters; ``render_views`` renders them: on the CPU one fused C++ pass per view
(OpenMP over views), on CUDA two Triton launches, with no host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .._backend import Dispatch, ext_op, module_attr
from .._checks import check_tensor, fail
from ..views import ViewParams

OP = "render_views"
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SIGMA = 1000.0   # blur sigma bound (output pixels): keeps every kernel's tap loop finite
MAX_KERNEL = 8191    # blur_kernel_size bound, likewise


@dataclass
class RaggedImages:
    """A batch of uint8 images of different sizes, back to back (decode-only loader output).

    ``data`` (T,) uint8: image n is ``data[offsets[n] : offsets[n] + H·W·C]``, (H, W, C)
    row-major (channels last, as decoders return them). ``offsets`` (B,) int64. ``hw`` (B, 2)
    int64: (H, W) of each image. ``channels``: C, 1 (grey) or 3 (RGB), the same for every image.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    hw: torch.Tensor
    channels: int

    @classmethod
    def from_list(cls, images: Sequence[torch.Tensor]) -> "RaggedImages":
        """Pack (H, W, C) uint8 tensors (one C for all) into one buffer on their device."""
        op = "RaggedImages.from_list"
        if len(images) == 0:
            fail(op, "images expected at least one (H, W, C) uint8 tensor, got an empty list")
        for n, im in enumerate(images):
            check_tensor(op, f"images[{n}]", im, dtypes=(torch.uint8,), ndim=3)
        C = int(images[0].shape[2])
        dev = images[0].device
        for n, im in enumerate(images):
            if int(im.shape[2]) != C or im.device != dev:
                fail(op, f"images[{n}] expected {C} channels on {dev} like images[0], got shape "
                         f"{tuple(im.shape)} on {im.device}")
        sizes = torch.tensor([im.numel() for im in images], dtype=torch.int64)
        offsets = torch.cumsum(sizes, 0) - sizes
        hw = torch.tensor([[int(im.shape[0]), int(im.shape[1])] for im in images], dtype=torch.int64)
        data = torch.cat([im.reshape(-1) for im in images])
        out = cls(data, offsets.to(dev), hw.to(dev), C)
        out.validate()
        return out

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def image(self, n: int) -> torch.Tensor:
        """Image n as an (H, W, C) view of ``data``."""
        H, W = (int(s) for s in self.hw[n].tolist())
        off = int(self.offsets[n])
        return self.data[off:off + H * W * self.channels].view(H, W, self.channels)

    def to(self, device, non_blocking: bool = False) -> "RaggedImages":
        return RaggedImages(self.data.to(device, non_blocking=non_blocking),
                            self.offsets.to(device, non_blocking=non_blocking),
                            self.hw.to(device, non_blocking=non_blocking), self.channels)

    def pin_memory(self) -> "RaggedImages":
        return RaggedImages(self.data.pin_memory(), self.offsets.pin_memory(), self.hw.pin_memory(), self.channels)

    def validate(self, check_values: bool = True) -> None:
        """Raise an ``ArgumentError`` naming the field for a wrong dtype, shape or device, and
        (``check_values``) for sizes < 1 or an image that does not fit in ``data`` (one host
        sync on a GPU)."""
        self._validate("RaggedImages", "", check_values)

    def _validate(self, op: str, prefix: str, check_values: bool) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels not in (1, 3):
            fail(op, f"{prefix}channels expected 1 or 3, got {self.channels!r}")
        check_tensor(op, f"{prefix}data", self.data, dtypes=(torch.uint8,), ndim=1)
        check_tensor(op, f"{prefix}offsets", self.offsets, dtypes=(torch.int64,), ndim=1, device=self.data.device)
        B = int(self.offsets.shape[0])
        check_tensor(op, f"{prefix}hw", self.hw, dtypes=(torch.int64,), shape=(B, 2), device=self.data.device)
        if not check_values or B == 0 or torch.compiler.is_compiling():
            return
        bad = self._bad_values()
        self._raise_bad_values(op, prefix, bad, bad.any(1).tolist())  # the one host sync

    def _bad_values(self) -> torch.Tensor:
        """(3, B) bool: size < 1, offset < 0, image past the end of ``data`` (no sync)."""
        H, W = self.hw[:, 0], self.hw[:, 1]
        end = self.offsets + H * W * self.channels
        return torch.stack([(H < 1) | (W < 1), self.offsets < 0, end > self.data.shape[0]])

    def _raise_bad_values(self, op: str, prefix: str, bad: torch.Tensor, flags: list) -> None:
        if flags[0]:
            n = int(bad[0].nonzero()[0])
            fail(op, f"{prefix}hw expected sizes >= 1, got {prefix}hw[{n}] = {self.hw[n].tolist()}")
        if flags[1]:
            n = int(bad[1].nonzero()[0])
            fail(op, f"{prefix}offsets expected values >= 0, got {prefix}offsets[{n}] = {int(self.offsets[n])}")
        if flags[2]:
            n = int(bad[2].nonzero()[0])
            end = int(self.offsets[n] + self.hw[n, 0] * self.hw[n, 1] * self.channels)
            fail(op, f"{prefix}offsets[{n}] + H·W·C = {end} ({prefix}hw[{n}] = {self.hw[n].tolist()}, "
                     f"channels {self.channels}) expected <= len({prefix}data) = {int(self.data.shape[0])}")


def _reference(data, offsets, hw, src, box, angle, flip, jitter, jitter_order, gray, blur_sigma, solarize, channels,
               size, mean, std, out_dtype, blur_kernel_size):
    from ..reference.render_views import render_views

    images = RaggedImages(data, offsets, hw, channels)
    params = ViewParams(src, box, angle, flip, jitter, jitter_order, gray, blur_sigma, solarize)
    return render_views(images, params, size, mean, std, out_dtype, blur_kernel_size or None)


dispatch = Dispatch(
    OP,
    {
        "reference": lambda: _reference,
        "cpu": ext_op("render_views_cpu"),
        "triton": module_attr("sslkern.triton_ops.render_views", "render_views_triton"),
    },
)


@torch.library.custom_op("sslkern::render_views", mutates_args=())
def _render_views_op(data: torch.Tensor, offsets: torch.Tensor, hw: torch.Tensor, src: torch.Tensor,
                     box: torch.Tensor, angle: torch.Tensor, flip: torch.Tensor, jitter: torch.Tensor,
                     jitter_order: torch.Tensor, gray: torch.Tensor, blur_sigma: torch.Tensor, solarize: torch.Tensor,
                     channels: int, size: int, mean: list[float], std: list[float], out_dtype: torch.dtype,
                     blur_kernel_size: int, backend: str) -> torch.Tensor:
    return dispatch(data.device, backend)(data, offsets, hw, src, box, angle, flip, jitter, jitter_order, gray,
                                          blur_sigma, solarize, channels, size, mean, std, out_dtype, blur_kernel_size)


@_render_views_op.register_fake
def _(data, offsets, hw, src, box, angle, flip, jitter, jitter_order, gray, blur_sigma, solarize, channels, size, mean,
      std, out_dtype, blur_kernel_size, backend):
    return data.new_empty((src.shape[0], channels, size, size), dtype=out_dtype)


_PARAM_DTYPES = dict(src=(torch.int64,), box=(torch.float32,), angle=(torch.float32,), flip=(torch.bool,),
                     jitter=(torch.float32,), jitter_order=(torch.int64,), gray=(torch.bool,),
                     blur_sigma=(torch.float32,), solarize=(torch.bool,))
_PARAM_TAIL = dict(box=(4,), jitter=(4,), jitter_order=(4,))


def _check_params(params: ViewParams, device: torch.device) -> int:
    if not isinstance(params, ViewParams):
        fail(OP, f"params expected a ViewParams, got {type(params).__name__}", TypeError)
    V = None
    for name, dtypes in _PARAM_DTYPES.items():
        t = getattr(params, name)
        if V is None:
            check_tensor(OP, f"params.{name}", t, dtypes=dtypes, ndim=1)
            V = int(t.shape[0])
        check_tensor(OP, f"params.{name}", t, dtypes=dtypes, shape=(V,) + _PARAM_TAIL.get(name, ()))
        if t.device != device:
            fail(OP, f"params.{name} expected to be on {device} (like images.data), got {t.device}")
    return V


def _check_values(images: RaggedImages, params: ViewParams) -> None:
    """Every value check of the images and the parameters in one reduction and one host sync;
    the messages name the field."""
    B = len(images)
    src_ok = (params.src >= 0) & (params.src < B)
    size = images.hw[params.src.clamp(0, max(B - 1, 0))].float()
    H, W = size[:, 0], size[:, 1]
    top, left, h, w = params.box.unbind(1)
    tol_h, tol_w = 1e-3 + 1e-6 * H, 1e-3 + 1e-6 * W
    box_ok = (params.box.isfinite().all(1) & (h > 0) & (w > 0) & (top >= 0) & (left >= 0)
              & (top + h <= H + tol_h) & (left + w <= W + tol_w))
    jit = params.jitter
    jitter_ok = jit.isfinite().all(1) & (jit[:, :3] >= 0).all(1) & (jit[:, 3].abs() <= 0.5)
    perm = torch.zeros(params.jitter_order.shape[0], 4, dtype=torch.int64, device=jit.device)
    order_in_range = ((params.jitter_order >= 0) & (params.jitter_order < 4)).all(1)
    perm.scatter_add_(1, params.jitter_order.clamp(0, 3), torch.ones_like(params.jitter_order))
    order_ok = order_in_range & (perm == 1).all(1)
    sigma_ok = (params.blur_sigma >= 0) & (params.blur_sigma <= MAX_SIGMA)
    angle_ok = params.angle.isfinite()
    checks = [("src", src_ok, f"values in [0, {B}) (an image of the batch)"),
              ("box", box_ok, "finite top, left >= 0 and height, width > 0 inside the image (top + height <= H, "
                              "left + width <= W)"),
              ("angle", angle_ok, "finite values"),
              ("jitter", jitter_ok, "finite factors >= 0 and a hue shift in [-0.5, 0.5]"),
              ("jitter_order", order_ok, "a permutation of 0..3 per view"),
              ("blur_sigma", sigma_ok, f"values in [0, {MAX_SIGMA:g}]")]
    bad_images = images._bad_values()
    bad = ~torch.stack([c[1] for c in checks])
    flags = torch.cat([bad_images.any(1), bad.any(1)]).tolist()  # the one host sync
    images._raise_bad_values(OP, "images.", bad_images, flags[:3])
    for (name, ok, what), flag, row in zip(checks, flags[3:], bad):
        if flag:
            v = int(row.nonzero()[0])
            got = getattr(params, name)[v]
            got = got.tolist() if got.dim() else got.item()
            n = int(params.src[v])
            extra = f" (image {n} of size {images.hw[n].tolist()})" if name == "box" else ""
            fail(OP, f"params.{name} expected {what}, got params.{name}[{v}] = {got}{extra}")


def _floats(name: str, value, C: int) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)):
        value = [value]
    try:
        out = [float(x) for x in value]
    except (TypeError, ValueError):
        fail(OP, f"{name} expected a sequence of {C} numbers, got {value!r}", TypeError)
    if len(out) != C:
        fail(OP, f"{name} expected {C} values (one per channel), got {len(out)}")
    if not all(math.isfinite(x) for x in out):
        fail(OP, f"{name} expected finite values, got {out}")
    return out


def render_views(images: RaggedImages, params: ViewParams, size: int, *, mean: Sequence[float],
                 std: Sequence[float], out_dtype: torch.dtype = torch.float32, blur_kernel_size: Optional[int] = None,
                 check_values: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    r"""Render V views of a ragged uint8 batch: (V, C, size, size) in ``out_dtype``, normalised.

    Per view v, from image ``params.src[v]`` (as float in [0, 1], i.e. uint8 / 255), in this
    order (torchvision ``transforms.v2.functional`` on float tensors):

    1. crop + resize: ``resized_crop(img, top, left, h, w, [size, size], antialias=True)``
       (bilinear with antialiasing, ATen's ``_upsample_bilinear2d_aa`` weights) for the box
       ``params.box[v]``; fractional boxes use the same weights with the fractional box. With
       ``params.angle[v] != 0``: the box rotated by the angle about its centre (content turning
       counter-clockwise, as ``rotate``), sampled bilinearly *without* antialiasing, border
       padding at the image edge (``grid_sample(padding_mode="border", align_corners=False)``).
    2. horizontal flip (``params.flip``);
    3. ColorJitter in the view's order ``params.jitter_order`` (0 brightness, 1 contrast,
       2 saturation, 3 hue): ``adjust_brightness`` (x·b, clamped to [0, 1]),
       ``adjust_contrast`` (blend with the mean of the current image's ``rgb_to_grayscale``),
       ``adjust_saturation`` (blend with the grayscale image), ``adjust_hue`` (RGB → HSV, hue
       shifted mod 1, back; torchvision's formulas); identity factors (1, 1, 1, 0) are skipped;
    4. grayscale (``params.gray``; weights 0.2989, 0.587, 0.114, 3 channels kept);
    5. Gaussian blur with ``sigma = params.blur_sigma[v]`` (0: none) — kernel
       ``exp(-d²/2σ²)`` normalised, reflect padding as ``gaussian_blur``; kernel size
       ``blur_kernel_size`` (odd) for every blurred view, or by default ``2·ceil(3σ) + 1`` for
       each view's own σ (so a view never depends on the other views of the batch); a
       reflected index past the far border reflects again (torch's padding would refuse a
       radius >= size);
    6. solarize (``params.solarize``: x >= 0.5 → 1 - x, PIL's threshold 128 on uint8);
    7. normalize ``(x - mean[c]) / std[c]``; 8. cast to ``out_dtype``.

    On one channel (C = 1) saturation, hue and grayscale do nothing and contrast blends with
    the image's own mean, as torchvision does.

    Args:
        images: a :class:`RaggedImages` batch (uint8, C = 1 or 3).
        params: :class:`sslkern.views.ViewParams` of V views, on the images' device.
        size: output side S >= 1 (one size per call: render DINO's global and local crops in
            two calls).
        mean, std: C numbers each (std > 0).
        out_dtype: float32, bfloat16 or float16.
        blur_kernel_size: odd kernel size (at most 8191) for every blurred view, or None
            (per-view default). Blur sigmas must lie in [0, 1000].
        check_values: check the values of ``params`` (``src`` in range, boxes inside their
            image, factors, orders, sigmas) and of ``images`` (sizes, offsets) here, in one
            reduction and one host sync on a GPU (free on the CPU), raising an ``ArgumentError``
            naming the field. ``False``: no sync (for a sync-free training step); the C++ kernel
            still refuses bad values, the Triton kernel clamps ``src`` and the taps into the
            image and masks every load to ``data``, so nothing is read out of bounds.
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: by device).

    Returns a new tensor (V, C, size, size), contiguous, no autograd (views are inputs, not
    differentiated).
    """
    if not isinstance(images, RaggedImages):
        fail(OP, f"images expected a RaggedImages, got {type(images).__name__}", TypeError)
    images._validate(OP, "images.", check_values=False)
    device = images.data.device
    V = _check_params(params, device)
    if isinstance(size, bool) or not isinstance(size, int):
        fail(OP, f"size expected an int, got {type(size).__name__}", TypeError)
    if size < 1:
        fail(OP, f"size expected >= 1, got {size}")
    C = images.channels
    mean_l, std_l = _floats("mean", mean, C), _floats("std", std, C)
    if any(s <= 0 for s in std_l):
        fail(OP, f"std expected values > 0, got {std_l}")
    if out_dtype not in _OUT_DTYPES:
        fail(OP, f"out_dtype expected float32, bfloat16 or float16, got {out_dtype}", TypeError)
    if blur_kernel_size is not None:
        if isinstance(blur_kernel_size, bool) or not isinstance(blur_kernel_size, int):
            fail(OP, f"blur_kernel_size expected an odd int or None, got {blur_kernel_size!r}", TypeError)
        if blur_kernel_size < 1 or blur_kernel_size % 2 == 0 or blur_kernel_size > MAX_KERNEL:
            fail(OP, f"blur_kernel_size expected an odd int in [1, {MAX_KERNEL}] or None, got {blur_kernel_size}")
    if check_values and V and len(images) and not torch.compiler.is_compiling():
        _check_values(images, params)
    elif check_values and V and not torch.compiler.is_compiling():
        fail(OP, f"params.src expected values in [0, 0) (an image of the batch): images is empty, params has {V} views")
    p = params
    with torch.no_grad():
        return torch.ops.sslkern.render_views(
            images.data.contiguous(), images.offsets.contiguous(), images.hw.contiguous(), p.src.contiguous(),
            p.box.contiguous(), p.angle.contiguous(), p.flip.contiguous(), p.jitter.contiguous(),
            p.jitter_order.contiguous(), p.gray.contiguous(), p.blur_sigma.contiguous(), p.solarize.contiguous(), C,
            size, mean_l, std_l, out_dtype, blur_kernel_size or 0, backend or "")


__all__ = ["RaggedImages", "render_views"]
