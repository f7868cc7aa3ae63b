"""``render_views`` — training views of a ragged uint8 batch, Triton kernels (two launches).

``render_resample_kernel`` (launch 1, one program per (view, tile of BLOCK output pixels)):
crop + resize of the view's box — ATen's antialiased bilinear weights evaluated per tap, the
taps a runtime loop whose bound ``ceil(2·max(scale, 1)) + 1`` comes from the box (no host
value), or bilinear sampling of the rotated box with border padding — then the flip and the
jitter ops that come *before* contrast in the view's order (all of them, and grayscale, when
the view has no contrast change). The tile goes to an fp32 scratch (V, C, S, S) and its sum
of grayscale values to ``partial[view, tile]``.

``render_blur_kernel`` (launch 2, one program per (view, ROWS output rows), whole rows of
BLOCK_S >= S columns): the view's contrast mean as the fixed-order sum of its tiles' partial
sums (deterministic, no atomics); for every vertical tap of the Gaussian (2·r + 1 rows, reflect
indices, r a runtime value per view) the scratch row is loaded and finished (contrast, the
jitter ops after it, grayscale) and accumulated; the horizontal taps gather along the row in
registers (``tl.gather`` with reflected column indices); then solarize, normalise, cast, store.
A view without blur runs one tap of weight 1.

No host syncs: every per-view value (source image, box, order, sigma) is read by the kernels.
Offsets are int64; the grids are 1-D over axis 0. ``src`` is clamped to the batch, sample
coordinates to the image, and every byte load is masked to ``data``, so unchecked parameters
never read out of bounds. Sizes up to 2048 (a row of the output is one register tile).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256
MAX_SIZE = 2048
_TS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _fold(i, n):
    """Reflect-101 index (torch's ``reflect`` padding) folded into [0, n) for any i."""
    period = tl.maximum(2 * n - 2, 1)
    i = i % period
    i = tl.where(i < 0, i + period, i)
    return tl.where(i >= n, period - i, i)


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _gray(r, g, b, CHANNELS: tl.constexpr):
    if CHANNELS == 3:
        return r * 0.2989 + g * 0.587 + b * 0.114
    else:
        return r


@triton.jit
def _hue(r, g, b, shift):
    """RGB → HSV (torchvision's ``_rgb_to_hsv``), hue + shift mod 1, HSV → RGB."""
    maxc = tl.maximum(r, tl.maximum(g, b))
    minc = tl.minimum(r, tl.minimum(g, b))
    same = maxc == minc
    span = maxc - minc
    sat = span / tl.where(same, 1.0, maxc)
    div = tl.where(same, 1.0, span)
    rc = (maxc - r) / div
    gc = (maxc - g) / div
    bc = (maxc - b) / div
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h / 6.0 + 1.0
    h = h - tl.floor(h)
    h = h + shift
    h = h - tl.floor(h)
    h6 = h * 6.0
    fi = tl.floor(h6)
    f = h6 - fi
    sector = fi.to(tl.int32)
    sector = tl.where(sector >= 6, sector - 6, sector)
    p = _clamp01(maxc * (1.0 - sat))
    q = _clamp01(maxc * (1.0 - sat * f))
    t = _clamp01(maxc * (1.0 - sat * (1.0 - f)))
    v = maxc
    r2 = tl.where(sector == 0, v, tl.where(sector == 1, q, tl.where(sector == 2, p, tl.where(sector == 3, p, tl.where(
        sector == 4, t, v)))))
    g2 = tl.where(sector == 0, t, tl.where(sector == 1, v, tl.where(sector == 2, v, tl.where(sector == 3, q, p))))
    b2 = tl.where(sector == 0, p, tl.where(sector == 1, p, tl.where(sector == 2, t, tl.where(sector == 3, v, tl.where(
        sector == 4, v, q)))))
    return r2, g2, b2


@triton.jit
def _jitter_op(r, g, b, op, todo, bf, cf, sf, hf, mean, CHANNELS: tl.constexpr):
    """Apply jitter op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) if ``todo`` and its
    factor is not the identity (torchvision's float formulas)."""
    if todo & (op == 0) & (bf != 1.0):
        r = _clamp01(r * bf)
        g = _clamp01(g * bf)
        b = _clamp01(b * bf)
    if todo & (op == 1) & (cf != 1.0):
        m = mean * (1.0 - cf)
        r = _clamp01(r * cf + m)
        g = _clamp01(g * cf + m)
        b = _clamp01(b * cf + m)
    if CHANNELS == 3:
        if todo & (op == 2) & (sf != 1.0):
            lum = _gray(r, g, b, CHANNELS) * (1.0 - sf)
            r = _clamp01(r * sf + lum)
            g = _clamp01(g * sf + lum)
            b = _clamp01(b * sf + lum)
        if todo & (op == 3) & (hf != 0.0):
            r, g, b = _hue(r, g, b, hf)
    return r, g, b


@triton.jit
def _contrast_position(order_ptr, v, cf):
    """Position of contrast in the view's order, or 4 when the view has no contrast change."""
    o0 = tl.load(order_ptr + 4 * v)
    o1 = tl.load(order_ptr + 4 * v + 1)
    o2 = tl.load(order_ptr + 4 * v + 2)
    o3 = tl.load(order_ptr + 4 * v + 3)
    pos = tl.where(o0 == 1, 0, tl.where(o1 == 1, 1, tl.where(o2 == 1, 2, tl.where(o3 == 1, 3, 4))))
    return o0, o1, o2, o3, tl.where(cf != 1.0, pos, 4)


@triton.jit(do_not_specialize=["T", "B", "S", "n_tiles"])
def render_resample_kernel(data_ptr, offsets_ptr, hw_ptr, src_ptr, box_ptr, angle_ptr, flip_ptr, jitter_ptr, order_ptr,
                           gray_ptr, scratch_ptr, partial_ptr, T, B, S, n_tiles,
                           CHANNELS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    v = pid // n_tiles
    tile = pid % n_tiles
    p = tile * BLOCK + tl.arange(0, BLOCK)
    plane = S * S  # < 2^31: S <= MAX_SIZE
    pm = p < plane
    i = (p // S).to(tl.float32)
    j = p % S
    n = tl.minimum(tl.maximum(tl.load(src_ptr + v), 0), tl.maximum(B - 1, 0))
    off = tl.load(offsets_ptr + n)
    H = tl.load(hw_ptr + 2 * n)
    W = tl.load(hw_ptr + 2 * n + 1)
    Hf = H.to(tl.float32)
    Wf = W.to(tl.float32)
    # bounds that hold for every valid box and keep the tap loops short for unchecked ones
    # (a NaN becomes a bound: max / min return the other operand on the GPU)
    bh = tl.minimum(tl.maximum(tl.load(box_ptr + 4 * v + 2), 1e-6), Hf + 1.0)
    bw = tl.minimum(tl.maximum(tl.load(box_ptr + 4 * v + 3), 1e-6), Wf + 1.0)
    top = tl.minimum(tl.maximum(tl.load(box_ptr + 4 * v), -1.0), Hf + 1.0)
    left = tl.minimum(tl.maximum(tl.load(box_ptr + 4 * v + 1), -1.0), Wf + 1.0)
    jx = tl.where(tl.load(flip_ptr + v) != 0, S - 1 - j, j).to(tl.float32)
    angle = tl.load(angle_ptr + v)
    r = tl.zeros([BLOCK], dtype=tl.float32)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    b = tl.zeros([BLOCK], dtype=tl.float32)
    if angle == 0.0:
        sy = bh / S
        sx = bw / S
        supy = tl.maximum(sy, 1.0)
        supx = tl.maximum(sx, 1.0)
        cy = top + sy * (i + 0.5)
        cx = left + sx * (jx + 0.5)
        y0 = tl.maximum(tl.floor(cy - supy + 0.5), tl.maximum(tl.floor(top), 0.0))
        y1 = tl.minimum(tl.floor(cy + supy + 0.5), tl.minimum(tl.ceil(top + bh), Hf))
        x0 = tl.maximum(tl.floor(cx - supx + 0.5), tl.maximum(tl.floor(left), 0.0))
        x1 = tl.minimum(tl.floor(cx + supx + 0.5), tl.minimum(tl.ceil(left + bw), Wf))
        taps_y = (tl.ceil(2.0 * supy) + 1.0).to(tl.int32)
        taps_x = (tl.ceil(2.0 * supx) + 1.0).to(tl.int32)
        wsum_x = tl.zeros([BLOCK], dtype=tl.float32)
        for tx in range(0, taps_x):
            x = x0 + tx
            wsum_x += tl.where(x < x1, tl.maximum(1.0 - tl.abs(x + 0.5 - cx) / supx, 0.0), 0.0)
        wsum_y = tl.zeros([BLOCK], dtype=tl.float32)
        for ty in range(0, taps_y):
            y = y0 + ty
            wy = tl.where(y < y1, tl.maximum(1.0 - tl.abs(y + 0.5 - cy) / supy, 0.0), 0.0)
            wsum_y += wy
            row = tl.minimum(tl.maximum(y, 0.0), Hf - 1.0).to(tl.int64) * W
            for tx in range(0, taps_x):
                x = x0 + tx
                wt = wy * tl.where(x < x1, tl.maximum(1.0 - tl.abs(x + 0.5 - cx) / supx, 0.0), 0.0)
                addr = off + (row + tl.minimum(tl.maximum(x, 0.0), Wf - 1.0).to(tl.int64)) * CHANNELS
                m = pm & (wt > 0.0) & (addr >= 0) & (addr + CHANNELS <= T)
                r += wt * tl.load(data_ptr + addr, mask=m, other=0).to(tl.float32)
                if CHANNELS == 3:
                    g += wt * tl.load(data_ptr + addr + 1, mask=m, other=0).to(tl.float32)
                    b += wt * tl.load(data_ptr + addr + 2, mask=m, other=0).to(tl.float32)
        total = wsum_y * wsum_x * 255.0
        scale = tl.where(total > 0.0, 1.0 / tl.maximum(total, 1e-30), 0.0)
        r = r * scale
        g = g * scale
        b = b * scale
    else:
        cs = tl.cos(angle)
        sn = tl.sin(angle)
        du = ((jx + 0.5) / S - 0.5) * bw
        dv = ((i + 0.5) / S - 0.5) * bh
        x = tl.minimum(tl.maximum(left + bw * 0.5 + cs * du - sn * dv - 0.5, 0.0), Wf - 1.0)
        y = tl.minimum(tl.maximum(top + bh * 0.5 + sn * du + cs * dv - 0.5, 0.0), Hf - 1.0)
        xf = tl.floor(x)
        yf = tl.floor(y)
        fx = x - xf
        fy = y - yf
        xa = xf.to(tl.int64)
        ya = yf.to(tl.int64)
        xb = tl.minimum(xa + 1, W - 1)
        yb = tl.minimum(ya + 1, H - 1)
        a00 = off + (ya * W + xa) * CHANNELS
        a01 = off + (ya * W + xb) * CHANNELS
        a10 = off + (yb * W + xa) * CHANNELS
        a11 = off + (yb * W + xb) * CHANNELS
        m = pm & (a00 >= 0) & (a11 + CHANNELS <= T)
        for c in tl.static_range(CHANNELS):
            p00 = tl.load(data_ptr + a00 + c, mask=m, other=0).to(tl.float32)
            p01 = tl.load(data_ptr + a01 + c, mask=m, other=0).to(tl.float32)
            p10 = tl.load(data_ptr + a10 + c, mask=m, other=0).to(tl.float32)
            p11 = tl.load(data_ptr + a11 + c, mask=m, other=0).to(tl.float32)
            upper = p00 + fx * (p01 - p00)
            lower = p10 + fx * (p11 - p10)
            val = (upper + fy * (lower - upper)) * (1.0 / 255.0)
            if c == 0:
                r = val
            elif c == 1:
                g = val
            else:
                b = val
    if CHANNELS == 1:
        g = r
        b = r
    bf = tl.load(jitter_ptr + 4 * v)
    cf = tl.load(jitter_ptr + 4 * v + 1)
    sf = tl.load(jitter_ptr + 4 * v + 2)
    hf = tl.load(jitter_ptr + 4 * v + 3)
    o0, o1, o2, o3, cpos = _contrast_position(order_ptr, v, cf)
    r, g, b = _jitter_op(r, g, b, o0, cpos > 0, bf, cf, sf, hf, 0.0, CHANNELS)
    r, g, b = _jitter_op(r, g, b, o1, cpos > 1, bf, cf, sf, hf, 0.0, CHANNELS)
    r, g, b = _jitter_op(r, g, b, o2, cpos > 2, bf, cf, sf, hf, 0.0, CHANNELS)
    r, g, b = _jitter_op(r, g, b, o3, cpos > 3, bf, cf, sf, hf, 0.0, CHANNELS)
    if CHANNELS == 3:
        if (cpos == 4) & (tl.load(gray_ptr + v) != 0):
            lum = _gray(r, g, b, CHANNELS)
            r = lum
            g = lum
            b = lum
    base = scratch_ptr + v * CHANNELS * plane + p
    tl.store(base, r, mask=pm)
    if CHANNELS == 3:
        tl.store(base + plane, g, mask=pm)
        tl.store(base + 2 * plane, b, mask=pm)
    tl.store(partial_ptr + pid, tl.sum(tl.where(pm, _gray(r, g, b, CHANNELS), 0.0), axis=0))


@triton.jit
def _finish(r, g, b, o0, o1, o2, o3, cpos, bf, cf, sf, hf, mean, gray_on, CHANNELS: tl.constexpr):
    """The colour ops from contrast on (contrast, the ops after it, grayscale)."""
    if cpos < 4:
        r, g, b = _jitter_op(r, g, b, o0, cpos <= 0, bf, cf, sf, hf, mean, CHANNELS)
        r, g, b = _jitter_op(r, g, b, o1, cpos <= 1, bf, cf, sf, hf, mean, CHANNELS)
        r, g, b = _jitter_op(r, g, b, o2, cpos <= 2, bf, cf, sf, hf, mean, CHANNELS)
        r, g, b = _jitter_op(r, g, b, o3, cpos <= 3, bf, cf, sf, hf, mean, CHANNELS)
        if CHANNELS == 3:
            if gray_on:
                lum = _gray(r, g, b, CHANNELS)
                r = lum
                g = lum
                b = lum
    return r, g, b


@triton.jit(do_not_specialize=["S", "n_tiles", "n_row_tiles", "kernel_size"])
def render_blur_kernel(scratch_ptr, partial_ptr, jitter_ptr, order_ptr, gray_ptr, sigma_ptr, solarize_ptr, rows_ptr,
                       out_ptr, mean0, mean1, mean2, istd0, istd1, istd2, S, n_tiles, n_row_tiles, kernel_size,
                       CHANNELS: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
                       GATHER: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    v = pid // n_row_tiles
    rows = (pid % n_row_tiles) * ROWS + tl.arange(0, ROWS)[:, None]      # (ROWS, 1)
    cols = tl.arange(0, BLOCK_S)[None, :]                               # (1, BLOCK_S)
    cm = cols < S
    plane = S * S
    bf = tl.load(jitter_ptr + 4 * v)
    cf = tl.load(jitter_ptr + 4 * v + 1)
    sf = tl.load(jitter_ptr + 4 * v + 2)
    hf = tl.load(jitter_ptr + 4 * v + 3)
    o0, o1, o2, o3, cpos = _contrast_position(order_ptr, v, cf)
    gray_on = tl.load(gray_ptr + v) != 0
    partials = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):  # fixed order: the same mean in every program of the view
        t = t0 + tl.arange(0, BLOCK_T)
        partials += tl.load(partial_ptr + v * n_tiles + t, mask=t < n_tiles, other=0.0)
    mean = tl.sum(partials, axis=0) / (plane * 1.0)
    sigma = tl.minimum(tl.load(sigma_ptr + v), 1000.0)  # the front door's bound: finite tap loops
    radius = tl.where(sigma > 0.0, tl.where(kernel_size > 0, kernel_size // 2, tl.ceil(3.0 * sigma).to(tl.int32)), 0)
    two_var = 2.0 * tl.maximum(sigma, 1e-6) * tl.maximum(sigma, 1e-6)
    wsum = sigma * 0.0
    for d in range(-radius, radius + 1):
        wsum += tl.exp(-(d * d * 1.0) / two_var)
    base = scratch_ptr + v * CHANNELS * plane
    acc_r = tl.zeros([ROWS, BLOCK_S], dtype=tl.float32)
    acc_g = tl.zeros([ROWS, BLOCK_S], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_S], dtype=tl.float32)
    for d in range(-radius, radius + 1):   # vertical taps on finished pixels
        w = tl.exp(-(d * d * 1.0) / two_var) / wsum
        idx = _fold(rows + d, S).to(tl.int64) * S + cols
        r = tl.load(base + idx, mask=cm, other=0.0)
        if CHANNELS == 3:
            g = tl.load(base + plane + idx, mask=cm, other=0.0)
            b = tl.load(base + 2 * plane + idx, mask=cm, other=0.0)
        else:
            g = r
            b = r
        r, g, b = _finish(r, g, b, o0, o1, o2, o3, cpos, bf, cf, sf, hf, mean, gray_on, CHANNELS)
        acc_r += w * r
        if CHANNELS == 3:
            acc_g += w * g
            acc_b += w * b
    out_r = tl.zeros([ROWS, BLOCK_S], dtype=tl.float32)
    out_g = tl.zeros([ROWS, BLOCK_S], dtype=tl.float32)
    out_b = tl.zeros([ROWS, BLOCK_S], dtype=tl.float32)
    if GATHER:  # horizontal taps gathered within the rows, in registers
        for d in range(-radius, radius + 1):
            w = tl.exp(-(d * d * 1.0) / two_var) / wsum
            ci = _fold(cols + d, S) + rows * 0
            out_r += w * tl.gather(acc_r, ci, axis=1)
            if CHANNELS == 3:
                out_g += w * tl.gather(acc_g, ci, axis=1)
                out_b += w * tl.gather(acc_b, ci, axis=1)
    else:  # wide rows: through this program's own rows of a second scratch, after a barrier
        rm = (rows < S) & cm
        tmp = rows_ptr + v * CHANNELS * plane + rows.to(tl.int64) * S
        tl.store(tmp + cols, acc_r, mask=rm)
        if CHANNELS == 3:
            tl.store(tmp + plane + cols, acc_g, mask=rm)
            tl.store(tmp + 2 * plane + cols, acc_b, mask=rm)
        tl.debug_barrier()  # the CTA's stores are visible to all its threads after it
        for d in range(-radius, radius + 1):
            w = tl.exp(-(d * d * 1.0) / two_var) / wsum
            ci = _fold(cols + d, S)
            out_r += w * tl.load(tmp + ci, mask=rm, other=0.0)
            if CHANNELS == 3:
                out_g += w * tl.load(tmp + plane + ci, mask=rm, other=0.0)
                out_b += w * tl.load(tmp + 2 * plane + ci, mask=rm, other=0.0)
    solar = tl.load(solarize_ptr + v) != 0
    om = (rows < S) & cm
    dst = out_ptr + v * CHANNELS * plane + rows.to(tl.int64) * S + cols
    out_r = tl.where(solar & (out_r >= 0.5), 1.0 - out_r, out_r)
    tl.store(dst, ((out_r - mean0) * istd0).to(out_ptr.dtype.element_ty), mask=om)
    if CHANNELS == 3:
        out_g = tl.where(solar & (out_g >= 0.5), 1.0 - out_g, out_g)
        out_b = tl.where(solar & (out_b >= 0.5), 1.0 - out_b, out_b)
        tl.store(dst + plane, ((out_g - mean1) * istd1).to(out_ptr.dtype.element_ty), mask=om)
        tl.store(dst + 2 * plane, ((out_b - mean2) * istd2).to(out_ptr.dtype.element_ty), mask=om)


GATHER_MAX = 256  # widest row gathered in registers (512: 168 registers on sm_80; 1024 spills)


def _blur_blocks(size: int, gather_max: int = GATHER_MAX) -> tuple[int, int, int, bool]:
    """(BLOCK_S, ROWS, num_warps, GATHER) of launch 2: whole rows, 512 elements per channel
    tile (4 per thread), the horizontal taps in registers up to ``gather_max`` columns."""
    block_s = max(16, triton.next_power_of_2(size))
    rows = max(1, 512 // block_s)
    return block_s, rows, max(4, rows * block_s // 128), block_s <= gather_max


def render_views_triton(data, offsets, hw, src, box, angle, flip, jitter, jitter_order, gray, blur_sigma, solarize,
                        channels, size, mean, std, out_dtype, blur_kernel_size, gather_max: int = GATHER_MAX):
    V = src.shape[0]
    dev = data.device
    out = torch.empty((V, channels, size, size), dtype=out_dtype, device=dev)
    if V == 0:
        return out
    if size > MAX_SIZE:
        raise ValueError(f"sslkern.render_views: size expected <= {MAX_SIZE} on the triton backend, got {size}")
    plane = size * size
    n_tiles = triton.cdiv(plane, BLOCK)
    scratch = torch.empty((V, channels, size, size), dtype=torch.float32, device=dev)
    partial = torch.empty((V, n_tiles), dtype=torch.float32, device=dev)
    as_u8 = lambda t: t.view(torch.uint8)  # noqa: E731  (bool flags as bytes)
    render_resample_kernel[(V * n_tiles,)](
        data, offsets, hw, src, box, angle, as_u8(flip), jitter, jitter_order, as_u8(gray), scratch, partial,
        data.numel(), offsets.shape[0], size, n_tiles, CHANNELS=channels, BLOCK=BLOCK, num_warps=4)
    block_s, rows, warps, gather = _blur_blocks(size, gather_max)
    rows_buf = partial if gather else torch.empty_like(scratch)
    n_row_tiles = triton.cdiv(size, rows)
    m = list(mean) + [0.0] * (3 - channels)
    inv = [1.0 / s for s in std] + [1.0] * (3 - channels)
    render_blur_kernel[(V * n_row_tiles,)](
        scratch, partial, jitter, jitter_order, as_u8(gray), blur_sigma, as_u8(solarize), rows_buf, out, *m, *inv,
        size, n_tiles, n_row_tiles, blur_kernel_size, CHANNELS=channels, ROWS=rows, BLOCK_S=block_s, BLOCK_T=64,
        GATHER=gather, num_warps=warps)
    return out


AOT_DIVISIBLE = ()  # sizes are not specialised (do_not_specialize)


def _aot_configs():
    resample_sig = {"data_ptr": "*u8", "offsets_ptr": "*i64", "hw_ptr": "*i64", "src_ptr": "*i64", "box_ptr": "*fp32",
                    "angle_ptr": "*fp32", "flip_ptr": "*u8", "jitter_ptr": "*fp32", "order_ptr": "*i64",
                    "gray_ptr": "*u8", "scratch_ptr": "*fp32", "partial_ptr": "*fp32", "T": "i64", "B": "i32",
                    "S": "i32", "n_tiles": "i32"}
    out = [dict(name=f"render_resample_kernel C={c}", kernel=render_resample_kernel, signature=resample_sig,
                constexprs={"CHANNELS": c, "BLOCK": BLOCK}, num_warps=4, num_stages=3) for c in (3, 1)]
    # launch 2: every row width of the launcher for RGB fp32; the DINO sizes (96, 224) in bf16
    # and fp16; grey images (digits, 8-32 pixels) in fp32
    cases = [(3, torch.float32, s) for s in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    cases += [(3, dt, s) for dt in (torch.bfloat16, torch.float16) for s in (128, 256)]
    cases += [(1, torch.float32, s) for s in (16, 32, 128, 256)]
    for c, dt, size in cases:
        block_s, rows, warps, gather = _blur_blocks(size)
        sig = {"scratch_ptr": "*fp32", "partial_ptr": "*fp32", "jitter_ptr": "*fp32", "order_ptr": "*i64",
               "gray_ptr": "*u8", "sigma_ptr": "*fp32", "solarize_ptr": "*u8", "rows_ptr": "*fp32",
               "out_ptr": f"*{_TS[dt]}", **{k: "fp32" for k in ("mean0", "mean1", "mean2", "istd0", "istd1", "istd2")},
               "S": "i32", "n_tiles": "i32", "n_row_tiles": "i32", "kernel_size": "i32"}
        out.append(dict(name=f"render_blur_kernel C={c} {_TS[dt]} BLOCK_S={block_s}", kernel=render_blur_kernel,
                        signature=sig, constexprs={"CHANNELS": c, "ROWS": rows, "BLOCK_S": block_s, "BLOCK_T": 64,
                                                   "GATHER": gather},
                        num_warps=warps, num_stages=3))
    return out


AOT_CONFIGS = _aot_configs()
