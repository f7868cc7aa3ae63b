"""``hog_targets`` — MaskFeat per-patch HOG targets (SlowFast ``HOGLayerC`` + MaskFeat unfolding)."""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import Dispatch, standard_impls
from .._checks import HALF_OR_FLOAT32, INDEX_DTYPES, check_choice, check_int, check_same_device, check_tensor, fail
from ._common import check_index_values

OP = "hog_targets"


def hog_targets_eager(images, ids, window, patch_size, pool, nbins):
    """The custom op's contract on the oracle ``sslkern.reference.hog_targets``."""
    from ..reference.hog_targets import hog_targets

    gw = 0 if window is None else int(window.shape[0])
    return hog_targets(images, patch_size, pool, nbins, gw, ids)


dispatch = Dispatch(OP, standard_impls(OP, hog_targets_eager))


def num_features(channels: int, patch_size: int, pool: int, nbins: int = 9) -> int:
    """Length of one patch's HOG target: ``channels · (patch_size // pool)² · nbins``."""
    return channels * (patch_size // pool) ** 2 * nbins


@torch.library.custom_op("sslkern::hog_targets", mutates_args=())
def _hog_targets_op(images: torch.Tensor, ids: Optional[torch.Tensor], window: Optional[torch.Tensor],
                    patch_size: int, pool: int, nbins: int, backend: str) -> torch.Tensor:
    return dispatch(images.device, backend)(images, ids, window, patch_size, pool, nbins)


@_hog_targets_op.register_fake
def _(images, ids, window, patch_size, pool, nbins, backend):
    B, C, H, W = images.shape
    n = ids.shape[1] if ids is not None else (H // patch_size) * (W // patch_size)
    return images.new_empty((B, n, num_features(C, patch_size, pool, nbins)), dtype=torch.float32)


_windows: dict = {}


def _window(size: int, device: torch.device) -> torch.Tensor:
    key = (size, str(device))
    w = _windows.get(key)
    if w is None:
        from ..reference.hog_targets import gaussian_window

        w = _windows[key] = gaussian_window(size).to(device)
    return w


def hog_targets(
    images: torch.Tensor,
    patch_size: int,
    *,
    pool: int = 8,
    nbins: int = 9,
    gaussian_window: int = 0,
    ids: Optional[torch.Tensor] = None,
    check_indices: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""MaskFeat HOG targets per patch: (B, N, C·(patch_size/pool)²·nbins) fp32, or (B, Nm, ·) at ``ids``.

    Per channel (SlowFast ``slowfast/models/operators.py: HOGLayerC``): reflect-padded 3x3
    Sobel gradients ``gx`` (``[[1,0,-1],[2,0,-2],[1,0,-1]]``, cross-correlation) and ``gy``
    (its transpose); magnitude ``sqrt(gx² + gy²)`` (times a Gaussian window tiled over the
    image if ``gaussian_window``); unsigned orientation bin ``floor(atan2(gx, gy)/π · nbins) mod
    nbins``; per cell of ``pool`` x ``pool`` pixels the magnitudes summed per bin and the
    cell's ``nbins`` histogram L2-normalised (``F.normalize`` over the bins, eps 1e-12).
    Per patch (MaskFeat ``slowfast/models/masked.py: _get_hog_label_2d``), the cells of the
    patch in the order ``feature = ((c·nbins + bin)·u + cell_row)·u + cell_col``,
    u = patch_size / pool; patches row-major (as a ViT's patch embedding).

    Args:
        images: (B, C, H, W) fp32, bf16 or fp16 (computed in fp32 from the exact upcast),
            H and W multiples of ``patch_size``, at least 2 (reflect padding). Any strides.
        patch_size: the ViT patch size p, a multiple of ``pool``.
        pool: cell size in pixels (SlowFast ``HOGLayerC(pool=8)`` for 16-pixel patches: 2x2
            cells per patch).
        nbins: orientation bins over [0, π) (MaskFeat: 9).
        gaussian_window: 0 (MaskFeat's default: none) or the side g of SlowFast's
            ``get_gkern(g, g // 2)``, tiled over the image (g ≥ 2 dividing H and W).
        ids: optional (B, Nm) integer patch indices in [0, N): only those patches are computed
            and ``out[b, j] = all[b, ids[b, j]]`` (MaskFeat's ``hog[output_mask]`` for a
            fixed masked count per image, in the order of ``ids``).
        check_indices: check ``ids`` values here (one reduction and host sync; an
            out-of-range index raises an ``IndexError`` naming ``ids``). ``False``: no sync;
            the C++ kernel still refuses them, the Triton kernel writes a row of zeros.
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Returns a new fp32 tensor, detached. There is no autograd formula: targets are not
    differentiated (the op runs under ``no_grad``; HOGLayerC's forward is ``@torch.no_grad``).
    Orientation bins are found by comparing ``gx·cos t_k`` with ``gy·sin t_k`` at the bin edges
    ``t_k = kπ/nbins`` (same bins in every backend); HOGLayerC's ``atan2`` can put a pixel
    within a few ulp of an edge into the neighbouring bin.
    """
    check_tensor(OP, "images", images, dtypes=HALF_OR_FLOAT32, ndim=4)
    device = check_same_device(OP, {"images": images, "ids": ids})
    B, C, H, W = (int(s) for s in images.shape)
    patch_size = check_int(OP, "patch_size", patch_size, 1)
    pool = check_int(OP, "pool", pool, 1)
    nbins = check_int(OP, "nbins", nbins, 1, 256)
    gaussian_window = check_int(OP, "gaussian_window", gaussian_window, 0)
    if patch_size % pool:
        fail(OP, f"patch_size expected a multiple of pool {pool}, got {patch_size}")
    if H < 2 or W < 2 or H % patch_size or W % patch_size:
        fail(OP, f"images expected H and W multiples of patch_size {patch_size} and at least 2, "
                 f"got shape {tuple(images.shape)}")
    window = None
    if gaussian_window:
        if gaussian_window < 2 or H % gaussian_window or W % gaussian_window:
            fail(OP, f"gaussian_window expected 0 or a size >= 2 dividing H {H} and W {W}, got {gaussian_window}")
        window = _window(gaussian_window, device)
    N = (H // patch_size) * (W // patch_size)
    if ids is not None:
        check_tensor(OP, "ids", ids, dtypes=INDEX_DTYPES, ndim=2)
        if int(ids.shape[0]) != B:
            fail(OP, f"ids expected shape ({B}, *) (one row per image), got {tuple(ids.shape)}")
        ids = ids.to(torch.int64).contiguous()
        check_choice(OP, "check_indices", check_indices, (True, False))
        if check_indices:
            check_index_values(OP, "ids", ids, N, meaning=" (patch indices)")
    with torch.no_grad():
        return torch.ops.sslkern.hog_targets(images.detach(), ids, window, patch_size, pool, nbins, backend or "")
