"""``colorization_targets`` — colorization soft-encoded ab targets, rebalancing weights and the
class-rebalancing prior (Zhang, Isola & Efros 2016; richzhang/colorization)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._backend import Dispatch, standard_impls
from .._checks import HALF_OR_FLOAT32, check_float, check_int, check_tensor, fail

OP = "colorization_targets"


def colorization_targets_eager(images, bins, factor, stride, num_neighbors, sigma, grey_threshold):
    """The custom op's contract on the oracle ``sslkern.reference.colorization_targets``."""
    from ..reference.colorization_targets import colorization_targets

    return colorization_targets(images, factor, stride, num_neighbors, sigma, grey_threshold, bins=bins)


# reference: colorization_targets_eager; cpu: torch.ops.sslkern_C.colorization_targets_cpu
# (csrc/cpu/colorization_targets.cpp); triton: sslkern.triton_ops.colorization_targets
dispatch = Dispatch(OP, standard_impls(OP, colorization_targets_eager))


class ColorizationTargets(NamedTuple):
    """Sparse colorization targets of a batch (h = ceil(H / stride), w = ceil(W / stride))."""

    bin_ids: torch.Tensor    # (B, h, w, K) int16: the K nearest ab bins, nearest first
    weights: torch.Tensor    # (B, h, w, K) fp32: their soft-encoding weights (sum 1 per pixel)
    rebalance: torch.Tensor  # (B, h, w) fp32: factor of the nearest bin x the image's non-grey flag
    nongray: torch.Tensor    # (B,) bool: some sampled pixel has |a| or |b| above the grey threshold


@torch.library.custom_op("sslkern::colorization_targets", mutates_args=())
def _targets_op(images: torch.Tensor, bins: torch.Tensor, factor: torch.Tensor, stride: int, num_neighbors: int,
                sigma: float, grey_threshold: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch(images.device, backend)(images, bins, factor, stride, num_neighbors, sigma, grey_threshold)


@_targets_op.register_fake
def _(images, bins, factor, stride, num_neighbors, sigma, grey_threshold, backend):
    B, _, H, W = images.shape
    h, w = (H + stride - 1) // stride, (W + stride - 1) // stride
    return (images.new_empty((B, h, w, num_neighbors), dtype=torch.int16),
            images.new_empty((B, h, w, num_neighbors), dtype=torch.float32),
            images.new_empty((B, h, w), dtype=torch.float32), images.new_empty((B,), dtype=torch.bool))


_bins_cache: dict = {}


def ab_bins(device=None) -> torch.Tensor:
    """The 313 in-gamut ab bin centres (313, 2) fp32 (cached per device)."""
    key = str(torch.device(device) if device is not None else torch.device("cpu"))
    t = _bins_cache.get(key)
    if t is None:
        from ..reference.colorization_targets import ab_bins as make

        t = _bins_cache[key] = make(device)
    return t


def _check_images(op, images):
    check_tensor(op, "images", images, dtypes=HALF_OR_FLOAT32, ndim=4)
    if int(images.shape[1]) != 3:
        fail(op, f"images expected 3 channels (RGB in [0, 1]), got shape {tuple(images.shape)}")


def colorization_targets(
    images: torch.Tensor,
    factor: Optional[torch.Tensor] = None,
    *,
    stride: int = 4,
    num_neighbors: int = 10,
    sigma: float = 5.0,
    grey_threshold: float = 5.0,
    backend: Optional[str] = None,
) -> ColorizationTargets:
    r"""Colorization targets: soft-encoded ab over the 313 in-gamut bins, sparse, and rebalancing weights.

    For each pixel sampled at ``stride`` (rows and columns 0, s, 2s, ...: the released net's
    ``data_ab_ss``, a 1x1 convolution of stride 4), with (L, a, b) = skimage ``rgb2lab`` of the
    RGB value (sRGB, D65):

      * ``bin_ids``: the K nearest of the 313 in-gamut bins ``ab_bins()`` (grid 10), nearest first;
      * ``weights``: ``w_k ∝ exp(−‖ab − q_k‖² / (2σ²))``, summing to 1 (``NNEncode``, K = 10, σ = 5);
      * ``rebalance``: ``factor[nearest bin]`` (``PriorBoostLayer``) times the image's non-grey
        flag (``NonGrayMaskLayer``): the per-pixel weight that multiplies the GRADIENT of the
        soft cross-entropy (``ClassRebalanceMultLayer``; see ``sslkern.nn.rebalanced_soft_cross_entropy``);
      * ``nongray``: whether some sampled pixel of the image has ``|a| > grey_threshold`` or
        ``|b| > grey_threshold``.

    The dense (B, 313, h, w) encoding of the released ``NNEncLayer`` is never formed.

    Args:
        images: (B, 3, H, W) RGB in [0, 1] (values outside are clamped), fp32, bf16 or fp16 (read
            exactly, computed in fp32). Any strides.
        factor: (313,) rebalancing factor per bin (``rebalance_factor(prior)``); default all ones
            (no rebalancing, only the grey mask).
        stride: sampling step s (h = ceil(H / s), w = ceil(W / s)).
        num_neighbors: K in [1, 16] (the released code: 10; the paper says 5).
        sigma: the Gaussian's σ in ab units (5).
        grey_threshold: |a| or |b| above it makes an image non-grey (5).
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Matches richzhang/colorization ``resources/caffe_traininglayers.py`` (``NNEncLayer``,
    ``PriorBoostLayer``, ``NonGrayMaskLayer`` on ``BGR2LabLayer``'s output) except at exact
    ties: among equidistant bins the lower bin id comes first (sklearn's ball tree has its own
    order), so only a pixel equidistant from its K-th and (K+1)-th bins (or from its two
    nearest, for ``rebalance``) can differ. No autograd: targets are constants.
    """
    _check_images(OP, images)
    device = images.device
    stride = check_int(OP, "stride", stride, 1)
    num_neighbors = check_int(OP, "num_neighbors", num_neighbors, 1, 16)
    sigma = check_float(OP, "sigma", sigma, 0.0, None, lo_open=True)
    grey_threshold = check_float(OP, "grey_threshold", grey_threshold)
    bins = ab_bins(device)
    if factor is None:
        factor = torch.ones(bins.shape[0], device=device)
    check_tensor(OP, "factor", factor, dtypes=(torch.float32, torch.float64), shape=(bins.shape[0],), device=device)
    with torch.no_grad():
        out = torch.ops.sslkern.colorization_targets(images.detach(), bins, factor.detach().float().contiguous(),
                                                     stride, num_neighbors, sigma, grey_threshold, backend or "")
    return ColorizationTargets(*out)


def colorization_prior(images: torch.Tensor, *, stride: int = 4, smooth_sigma: float = 5.0, batch_size: int = 256,
                       backend: Optional[str] = None) -> torch.Tensor:
    r"""Empirical probability of each ab bin over a training set, (313,) fp64, summing to 1.

    The nearest bin of every pixel sampled at ``stride`` (as ``colorization_targets``) is
    counted over all images; with ``smooth_sigma > 0`` the histogram is smoothed with a Gaussian
    of that σ over the bin centres (the paper: "smoothed with a Gaussian kernel G_σ"; the
    released ``prior_probs.npy`` was made from ImageNet's training set). ``images`` as
    ``colorization_targets`` (B, 3, H, W) in [0, 1], processed ``batch_size`` at a time.
    """
    _check_images("colorization_prior", images)
    smooth_sigma = check_float("colorization_prior", "smooth_sigma", smooth_sigma, 0.0, None)
    batch_size = check_int("colorization_prior", "batch_size", batch_size, 1)
    bins = ab_bins(images.device)
    counts = torch.zeros(bins.shape[0], dtype=torch.float64, device=images.device)
    for i in range(0, images.shape[0], batch_size):
        t = colorization_targets(images[i:i + batch_size], stride=stride, num_neighbors=1, backend=backend)
        counts += torch.bincount(t.bin_ids[..., 0].reshape(-1).long(), minlength=bins.shape[0]).double()
    if int(counts.sum()) == 0:
        fail("colorization_prior", "images expected at least one image")
    p = counts / counts.sum()
    if smooth_sigma > 0:
        d2 = torch.cdist(bins.double(), bins.double()) ** 2
        p = torch.exp(-d2 / (2 * smooth_sigma ** 2)) @ p
        p = p / p.sum()
    return p


def rebalance_factor(prior: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    r"""Class-rebalancing factor per bin (richzhang/colorization ``PriorFactor``, alpha 1), (Q,) fp32.

    ``prior_mix = (1 − γ)·p + γ/Q``; ``factor = prior_mix⁻¹`` scaled so that ``Σ_q p_q·factor_q = 1``
    (the expected weight of a training pixel is 1). The uniform part is over all Q bins
    (the paper's equation; ``PriorFactor`` spreads it over the bins with non-zero prior, the same
    when every bin occurs, as in the released prior), so the factor stays finite for a bin the
    training set never shows.
    """
    check_tensor("rebalance_factor", "prior", prior, dtypes=(torch.float32, torch.float64), ndim=1)
    gamma = check_float("rebalance_factor", "gamma", gamma, 0.0, 1.0)
    p = prior.double()
    if bool((p < 0).any()) or not math.isclose(float(p.sum()), 1.0, rel_tol=1e-6):
        fail("rebalance_factor", "prior expected non-negative probabilities summing to 1")
    if gamma == 0 and bool((p == 0).any()):
        fail("rebalance_factor", "gamma expected > 0 when some bin has zero prior (its factor would be infinite)")
    mix = (1 - gamma) * p + gamma / p.numel()
    factor = 1.0 / mix
    return (factor / (p * factor).sum()).float()
