"""``hog_targets`` — MaskFeat per-patch HOG targets, Triton kernel.

``hog_patch_kernel``: one program per output row (image, requested patch). For each channel
it walks the patch's PATCH pixel rows; per row it loads the 3x3 neighbourhoods (reflect
padding at the border: indices -1 → 1 and n → n-2), forms the Sobel gradients in the
reference's order of sums, the magnitude (times the tiled Gaussian window) and the bin (the
vector (gy, gx) turned into the upper half plane, counted against the edges
``gx·cos t_k >= gy·sin t_k``, the same rounded products as the C++ kernel and the
reference), then adds the row's magnitudes into the patch histogram of NBINS·u² slots
(``slot = (bin·u + cell_row)·u + cell_col``) with a (BLOCK_P, BLOCK_F) one-hot reduction.
Each cell's NBINS values are divided by max(‖·‖₂, 1e-12) and the row is written once.

Patch size, cell size and bin count are compile-time constants; ``AOT_CONFIGS`` lists the
recipe (patch 4, cells of 2) and benchmark (patch 16, cells of 8) geometries for every
input dtype, with and without ids, with and without a Gaussian window. With ids out of
range (``check_indices=False``) the row is written as zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 4
_TS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _reflect(i, n):
    return tl.where(i < 0, -i, tl.where(i >= n, 2 * n - 2 - i, i))


@triton.jit
def hog_patch_kernel(img_ptr, ids_ptr, win_ptr, edges_ptr, out_ptr,
                     C, H, W, Wp, N, Nm, sb, sc, sh, sw, GW,
                     HAS_IDS: tl.constexpr, HAS_WINDOW: tl.constexpr, PATCH: tl.constexpr, POOL: tl.constexpr,
                     NBINS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_CELLS: tl.constexpr):
    U: tl.constexpr = PATCH // POOL
    UU: tl.constexpr = U * U
    FC: tl.constexpr = NBINS * UU  # features per channel
    r = tl.program_id(0).to(tl.int64)
    b = r // Nm
    if HAS_IDS:
        j = tl.load(ids_ptr + r)
        valid = (j >= 0) & (j < N)
        j = tl.where(valid, j, 0)
    else:
        j = r % Nm
        valid = j >= 0
    y0 = (j // Wp) * PATCH
    x0 = (j % Wp) * PATCH
    xs = tl.arange(0, BLOCK_P)
    xm = xs < PATCH
    col = x0 + xs
    cl = _reflect(col - 1, W).to(tl.int64) * sw
    cc = col.to(tl.int64) * sw
    cr = _reflect(col + 1, W).to(tl.int64) * sw
    f = tl.arange(0, BLOCK_F)
    cells = tl.arange(0, BLOCK_CELLS)
    same_cell = ((f % UU)[:, None] == cells[None, :]) & (f < FC)[:, None]
    out_row = out_ptr + r * C * FC
    for c in range(C):
        base = img_ptr + b * sb + tl.cast(c, tl.int64) * sc
        hist = tl.zeros([BLOCK_F], dtype=tl.float32)
        for y in range(PATCH):
            row = y0 + y
            up = base + _reflect(row - 1, H).to(tl.int64) * sh
            mid = base + row.to(tl.int64) * sh
            dn = base + _reflect(row + 1, H).to(tl.int64) * sh
            a_l = tl.load(up + cl, mask=xm, other=0.0).to(tl.float32)
            a_c = tl.load(up + cc, mask=xm, other=0.0).to(tl.float32)
            a_r = tl.load(up + cr, mask=xm, other=0.0).to(tl.float32)
            m_l = tl.load(mid + cl, mask=xm, other=0.0).to(tl.float32)
            m_r = tl.load(mid + cr, mask=xm, other=0.0).to(tl.float32)
            b_l = tl.load(dn + cl, mask=xm, other=0.0).to(tl.float32)
            b_c = tl.load(dn + cc, mask=xm, other=0.0).to(tl.float32)
            b_r = tl.load(dn + cr, mask=xm, other=0.0).to(tl.float32)
            gx = ((a_l - a_r) + 2.0 * (m_l - m_r)) + (b_l - b_r)
            gy = ((a_l + 2.0 * a_c) + a_r) - ((b_l + 2.0 * b_c) + b_r)
            mag = tl.sqrt(gx * gx + gy * gy)
            if HAS_WINDOW:
                mag = mag * tl.load(win_ptr + (row % GW) * GW + col % GW, mask=xm, other=0.0)
            flip = (gx < 0.0) | ((gx == 0.0) & (gy < 0.0))
            vb = tl.where(flip, -gx, gx)
            va = tl.where(flip, -gy, gy)
            bins = tl.zeros([BLOCK_P], dtype=tl.int32)
            for e in tl.static_range(NBINS - 1):
                ce = tl.load(edges_ptr + e)
                se = tl.load(edges_ptr + (NBINS - 1) + e)
                bins += (vb * ce >= va * se).to(tl.int32)
            slot = (bins * U + y // POOL) * U + xs // POOL
            mag = tl.where(xm, mag, 0.0)
            hist += tl.sum(tl.where(slot[:, None] == f[None, :], mag[:, None], 0.0), axis=0)
        sq = tl.sum(tl.where(same_cell, (hist * hist)[:, None], 0.0), axis=0)          # (BLOCK_CELLS,)
        norm = tl.sum(tl.where(same_cell, tl.sqrt(sq)[None, :], 0.0), axis=1)          # (BLOCK_F,) per slot
        val = hist / tl.maximum(norm, 1e-12)
        val = tl.where(valid, val, 0.0)
        tl.store(out_row + c * FC + f, val, mask=f < FC)


_consts: dict = {}


def _cached(key, make):
    t = _consts.get(key)
    if t is None:
        t = _consts[key] = make()
    return t


def _edges(nbins: int, device) -> torch.Tensor:
    from ..reference.hog_targets import bin_edges

    def make():
        cos, sin = bin_edges(nbins)
        return torch.tensor((cos + sin) or [0.0], dtype=torch.float32, device=device)

    return _cached(("edges", nbins, str(device)), make)


def _blocks(patch_size, pool, nbins):
    u = patch_size // pool
    return (triton.next_power_of_2(patch_size), triton.next_power_of_2(nbins * u * u), triton.next_power_of_2(u * u))


def hog_targets_triton(images, ids, window, patch_size, pool, nbins):
    B, C, H, W = images.shape
    wp = W // patch_size
    N = (H // patch_size) * wp
    Nm = ids.shape[1] if ids is not None else N
    u = patch_size // pool
    out = torch.empty((B, Nm, C * nbins * u * u), dtype=torch.float32, device=images.device)
    if out.numel() == 0:
        return out
    dev = images.device
    dummy_i = _cached(("ids", str(dev)), lambda: torch.zeros(1, dtype=torch.int64, device=dev))
    dummy_w = _cached(("win", str(dev)), lambda: torch.zeros(1, dtype=torch.float32, device=dev))
    bp, bf, bc = _blocks(patch_size, pool, nbins)
    hog_patch_kernel[(B * Nm,)](
        images, ids if ids is not None else dummy_i, window.contiguous() if window is not None else dummy_w,
        _edges(nbins, dev), out, C, H, W, wp, N, Nm, *images.stride(), window.shape[0] if window is not None else 1,
        HAS_IDS=ids is not None, HAS_WINDOW=window is not None, PATCH=patch_size, POOL=pool, NBINS=nbins,
        BLOCK_P=bp, BLOCK_F=bf, BLOCK_CELLS=bc, num_warps=NUM_WARPS)
    return out


AOT_DIVISIBLE = ("H", "W", "sb", "sc", "sh")


def _aot_configs():
    ints = {k: "i32" for k in ("C", "H", "W", "Wp", "N", "Nm", "sb", "sc", "sh", "sw", "GW")}
    out = []
    for patch, pool in ((16, 8), (4, 2)):
        bp, bf, bc = _blocks(patch, pool, 9)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for has_ids in (False, True):
                for has_window in ((False, True) if dtype == torch.float32 else (False,)):
                    out.append(dict(
                        name=f"hog_patch_kernel {_TS[dtype]} patch={patch} pool={pool} ids={has_ids} window={has_window}",
                        kernel=hog_patch_kernel,
                        signature={"img_ptr": f"*{_TS[dtype]}", "ids_ptr": "*i64", "win_ptr": "*fp32",
                                   "edges_ptr": "*fp32", "out_ptr": "*fp32", **ints},
                        constexprs={"HAS_IDS": has_ids, "HAS_WINDOW": has_window, "PATCH": patch, "POOL": pool,
                                    "NBINS": 9, "BLOCK_P": bp, "BLOCK_F": bf, "BLOCK_CELLS": bc},
                        num_warps=NUM_WARPS, num_stages=3))
    return out


AOT_CONFIGS = _aot_configs()
