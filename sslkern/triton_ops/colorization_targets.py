"""``colorization_targets`` — colorization soft-encoded ab targets, Triton kernel.

``colorization_encode_kernel``: one program per BLOCK_P sampled pixels (flattened over image,
sampled row, sampled column; large counts on grid axis 0, offsets in int64). Per pixel: the
RGB value clamped to [0, 1], skimage's rgb2lab in fp32 (``x^2.4`` and the cube root as
``exp2(·log2)``), the squared distances to every bin as a (BLOCK_P, BLOCK_Q) tile, then K
rounds of "smallest distance, lowest id among equals" (the C++ kernel's and the reference's
order), each picked bin masked out; the K weights ``exp(−d²/(2σ²))`` normalised and written
with the ids. Each pixel's non-grey flag is written too; the launcher reduces them per image
and forms ``factor[nearest] · non-grey`` (device ops, no host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P = 8
NUM_WARPS = 4
_TS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _srgb_linear(c):
    c = tl.minimum(tl.maximum(c, 0.0), 1.0)
    return tl.where(c > 0.04045, tl.exp2(2.4 * tl.log2((c + 0.055) / 1.055)), c / 12.92)


@triton.jit
def _lab_f(t):
    return tl.where(t > 0.008856, tl.exp2(tl.log2(tl.maximum(t, 1e-30)) / 3.0), 7.787 * t + 16.0 / 116.0)


@triton.jit
def colorization_encode_kernel(img_ptr, bins_ptr, ids_ptr, w_ptr, flag_ptr,
                               P, HW, w, Q, sb, sc, sh, sw, stride, inv_two_sigma2, grey,
                               K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < P
    b = p // HW
    rem = p % HW
    y = (rem // w) * stride
    x = (rem % w) * stride
    base = img_ptr + b * sb + y * sh + x * sw
    r = _srgb_linear(tl.load(base, mask=valid, other=0.0).to(tl.float32))
    g = _srgb_linear(tl.load(base + sc, mask=valid, other=0.0).to(tl.float32))
    bl = _srgb_linear(tl.load(base + 2 * sc, mask=valid, other=0.0).to(tl.float32))
    fx = _lab_f(((0.412453 * r + 0.357580 * g) + 0.180423 * bl) / 0.95047)
    fy = _lab_f(((0.212671 * r + 0.715160 * g) + 0.072169 * bl) / 1.0)
    fz = _lab_f(((0.019334 * r + 0.119193 * g) + 0.950227 * bl) / 1.08883)
    a = 500.0 * (fx - fy)
    bb = 200.0 * (fy - fz)
    flag = (tl.abs(a) > grey) | (tl.abs(bb) > grey)
    tl.store(flag_ptr + p, flag.to(tl.int8), mask=valid)

    q = tl.arange(0, BLOCK_Q)
    qm = q < Q
    qa = tl.load(bins_ptr + 2 * q, mask=qm, other=0.0)
    qb = tl.load(bins_ptr + 2 * q + 1, mask=qm, other=0.0)
    da = a[:, None] - qa[None, :]
    db = bb[:, None] - qb[None, :]
    d2 = tl.where(qm[None, :], da * da + db * db, float("inf"))
    kk = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.int32)
    dk = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    for k in tl.static_range(K):
        m = tl.min(d2, axis=1)
        sel = tl.min(tl.where(d2 == m[:, None], q[None, :], BLOCK_Q), axis=1)
        ids = tl.where(kk[None, :] == k, sel[:, None], ids)
        dk = tl.where(kk[None, :] == k, m[:, None], dk)
        d2 = tl.where(q[None, :] == sel[:, None], float("inf"), d2)
    km = kk < K
    e = tl.where(km[None, :], tl.exp(-dk * inv_two_sigma2), 0.0)
    wts = e / tl.sum(e, axis=1)[:, None]
    out = p[:, None] * K + kk[None, :]
    m2 = valid[:, None] & km[None, :]
    tl.store(ids_ptr + out, ids.to(tl.int16), mask=m2)
    tl.store(w_ptr + out, wts, mask=m2)


def colorization_targets_triton(images, bins, factor, stride, num_neighbors, sigma, grey_threshold):
    B, _, H, W = images.shape
    h, w, K = (H + stride - 1) // stride, (W + stride - 1) // stride, num_neighbors
    dev = images.device
    ids = torch.empty((B, h, w, K), dtype=torch.int16, device=dev)
    wts = torch.empty((B, h, w, K), dtype=torch.float32, device=dev)
    P = B * h * w
    if P == 0:
        return ids, wts, torch.zeros((B, h, w), device=dev), torch.zeros((B,), dtype=torch.bool, device=dev)
    flags = torch.empty(P, dtype=torch.int8, device=dev)
    bins = bins.float().contiguous()
    Q = bins.shape[0]
    colorization_encode_kernel[(triton.cdiv(P, BLOCK_P),)](
        images, bins, ids, wts, flags, P, h * w, w, Q, *images.stride(), stride, 1.0 / (2.0 * sigma * sigma),
        grey_threshold, K=K, BLOCK_K=triton.next_power_of_2(K), BLOCK_P=BLOCK_P,
        BLOCK_Q=triton.next_power_of_2(Q), num_warps=NUM_WARPS)
    nongray = flags.view(B, h * w).bool().any(1)
    rebalance = factor.float()[ids[..., 0].long()] * nongray[:, None, None]
    return ids, wts, rebalance, nongray


AOT_DIVISIBLE = ("HW", "sb", "sc", "sh")


def _aot_configs():
    ints = {k: "i32" for k in ("P", "HW", "w", "Q", "sb", "sc", "sh", "sw", "stride")}
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out.append(dict(
            name=f"colorization_encode_kernel {_TS[dtype]} K=10",
            kernel=colorization_encode_kernel,
            signature={"img_ptr": f"*{_TS[dtype]}", "bins_ptr": "*fp32", "ids_ptr": "*i16", "w_ptr": "*fp32",
                       "flag_ptr": "*i8", **ints, "inv_two_sigma2": "fp32", "grey": "fp32"},
            constexprs={"K": 10, "BLOCK_K": 16, "BLOCK_P": BLOCK_P, "BLOCK_Q": 512},
            num_warps=NUM_WARPS, num_stages=3))
    return out


AOT_CONFIGS = _aot_configs()
