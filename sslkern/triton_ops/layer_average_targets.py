"""``layer_average_targets`` — data2vec targets, Triton kernels.

Two kernels, each reading the K layers through a table of their addresses (no stacking):

* ``instance_norm_average_kernel`` — one program per (image, BLOCK_D channels): for each
  layer, pass 1 collects shifted per-channel sums over the tokens (x − x[0] keeps a large
  mean from cancelling the variance), pass 2 normalizes and accumulates into the fp32
  output; optionally the final instance norm of the average follows in the same program.
* ``row_norm_average_kernel`` — one program per token row: per-layer layer norm over D
  (or none), accumulate, optionally the final layer norm of the finished row.

The table of layer addresses is cached by those addresses (uploaded once, not per call, so
a step captured in a CUDA graph replays a copy whose source is still alive), and every
address is 16-byte aligned (the launcher copies a misaligned view), which the kernels state
with ``tl.multiple_of`` so that their loads vectorise.

The other combinations reuse them on the output with K = 1 (a final layer norm after the
instance path; a final instance norm after the row path). Block sizes are fixed, so
``AOT_CONFIGS`` lists every configuration.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .ema_update import upload_table

BLOCK_T = 32
BLOCK_D_INSTANCE = 64
BLOCK_D_ROW = 256
NUM_WARPS = 4

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def instance_norm_average_kernel(table_ptr, out_ptr, T, D, stride_b, stride_t, K, eps,
                                 DTYPE: tl.constexpr, FINAL_INSTANCE: tl.constexpr,
                                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    rows0 = tl.arange(0, BLOCK_T)
    inv_t = 1.0 / T
    inv_k = 1.0 / K
    out_img = out_ptr + b * T * D
    for k in range(K):
        # 16-byte aligned base (the launcher checks): lets loads vectorise despite the table
        x_img = tl.multiple_of(tl.load(table_ptr + k).to(tl.pointer_type(DTYPE)), 16) + b * stride_b
        shift = tl.load(x_img + cols, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.zeros([BLOCK_D], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + rows0
            m = (rows < T)[:, None] & dmask[None, :]
            x = tl.load(x_img + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=m, other=0.0)
            v = tl.where(m, x.to(tl.float32) - shift[None, :], 0.0)
            s1 += tl.sum(v, axis=0)
            s2 += tl.sum(v * v, axis=0)
        mu = s1 * inv_t
        var = tl.maximum(s2 * inv_t - mu * mu, 0.0)
        mean = shift + mu
        a = inv_k / tl.sqrt(var + eps)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + rows0
            m = (rows < T)[:, None] & dmask[None, :]
            x = tl.load(x_img + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=m, other=0.0)
            o_ptrs = out_img + rows[:, None].to(tl.int64) * D + cols[None, :]
            acc = tl.load(o_ptrs, mask=m & (k > 0), other=0.0)
            tl.store(o_ptrs, acc + (x.to(tl.float32) - mean[None, :]) * a[None, :], mask=m)
    if FINAL_INSTANCE:
        s1 = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + rows0
            m = (rows < T)[:, None] & dmask[None, :]
            y = tl.load(out_img + rows[:, None].to(tl.int64) * D + cols[None, :], mask=m, other=0.0)
            s1 += tl.sum(y, axis=0)
        mean = s1 * inv_t
        s2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + rows0
            m = (rows < T)[:, None] & dmask[None, :]
            y = tl.load(out_img + rows[:, None].to(tl.int64) * D + cols[None, :], mask=m, other=0.0)
            v = tl.where(m, y - mean[None, :], 0.0)
            s2 += tl.sum(v * v, axis=0)
        rstd = 1.0 / tl.sqrt(s2 * inv_t + eps)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + rows0
            m = (rows < T)[:, None] & dmask[None, :]
            o_ptrs = out_img + rows[:, None].to(tl.int64) * D + cols[None, :]
            y = tl.load(o_ptrs, mask=m, other=0.0)
            tl.store(o_ptrs, (y - mean[None, :]) * rstd[None, :], mask=m)


@triton.jit
def row_norm_average_kernel(table_ptr, out_ptr, T, D, stride_b, stride_t, K, eps,
                            DTYPE: tl.constexpr, LAYER_NORM: tl.constexpr, FINAL_LAYER: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    inv_d = 1.0 / D
    inv_k = 1.0 / K
    o_row = out_ptr + row * D
    offs = tl.arange(0, BLOCK_D)
    for k in range(K):
        x_row = tl.multiple_of(tl.load(table_ptr + k).to(tl.pointer_type(DTYPE)), 16) + b * stride_b + t * stride_t
        mean = 0.0
        a = inv_k
        if LAYER_NORM:
            s = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs
                s += tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
            mean = tl.sum(s, axis=0) * inv_d
            q = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs
                v = tl.where(cols < D, tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32) - mean, 0.0)
                q += v * v
            a = inv_k / tl.sqrt(tl.sum(q, axis=0) * inv_d + eps)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs
            cm = cols < D
            x = tl.load(x_row + cols, mask=cm, other=0.0).to(tl.float32)
            acc = tl.load(o_row + cols, mask=cm & (k > 0), other=0.0)
            tl.store(o_row + cols, acc + (x - mean) * a, mask=cm)
    if FINAL_LAYER:
        s = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs
            s += tl.load(o_row + cols, mask=cols < D, other=0.0)
        mean = tl.sum(s, axis=0) * inv_d
        q = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs
            v = tl.where(cols < D, tl.load(o_row + cols, mask=cols < D, other=0.0) - mean, 0.0)
            q += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(q, axis=0) * inv_d + eps)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs
            y = tl.load(o_row + cols, mask=cols < D, other=0.0)
            tl.store(o_row + cols, (y - mean) * rstd, mask=cols < D)


_tables: OrderedDict = OrderedDict()


def _table(tensors, device):
    """Device table of the layers' addresses, cached by those addresses (no upload per call;
    an upload under CUDA-graph capture keeps its pinned source alive, see ``upload_table``)."""
    key = tuple(t.data_ptr() for t in tensors) + (str(device),)
    entry = _tables.get(key)
    if entry is None:
        entry = _tables[key] = upload_table(torch.tensor(key[:-1], dtype=torch.int64), device)
        while len(_tables) > 64:
            _tables.popitem(last=False)
    _tables.move_to_end(key)
    return entry[1]


def _aligned(layers):
    """The layers with 16-byte aligned data pointers (the kernels tell the compiler so): a
    misaligned view (rare: an odd element offset) is copied."""
    return [y if y.data_ptr() % 16 == 0 else y.clone() for y in layers]


def _instance(table, out, T, D, sb, st, K, eps, dtype, final_instance):
    B = out.shape[0]
    instance_norm_average_kernel[(B, triton.cdiv(D, BLOCK_D_INSTANCE))](
        table, out, T, D, sb, st, K, eps, DTYPE=_TL[dtype], FINAL_INSTANCE=final_instance,
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D_INSTANCE, num_warps=NUM_WARPS)


def _rows(table, out, T, D, sb, st, K, eps, dtype, layer_norm, final_layer):
    B = out.shape[0]
    row_norm_average_kernel[(B * T,)](
        table, out, T, D, sb, st, K, eps, DTYPE=_TL[dtype], LAYER_NORM=layer_norm, FINAL_LAYER=final_layer,
        BLOCK_D=BLOCK_D_ROW, num_warps=NUM_WARPS)


def layer_average_targets_triton(layers, layer_norm, final_norm, eps):
    first = layers[0]
    B, T, D = first.shape
    out = torch.empty((B, T, D), dtype=torch.float32, device=first.device)
    if out.numel() == 0:
        return out
    layers = _aligned(layers)
    sb, st = layers[0].stride(0), layers[0].stride(1)
    K = len(layers)
    table = _table(layers, first.device)
    if layer_norm == "instance":
        _instance(table, out, T, D, sb, st, K, eps, first.dtype, final_norm == "instance")
        if final_norm == "layer":
            _rows(_table([out], out.device), out, T, D, T * D, D, 1, eps, torch.float32, False, True)
    else:
        _rows(table, out, T, D, sb, st, K, eps, first.dtype, layer_norm == "layer", final_norm == "layer")
        if final_norm == "instance":
            _instance(_table([out], out.device), out, T, D, T * D, D, 1, eps, torch.float32, False)
    return out


# Multiples of 16 at the benchmark sizes (D = 384 / 768, strides T·D and D): real launches
# specialise them as 16-divisible, and so does the GPU report.
AOT_DIVISIBLE = ("D", "stride_b", "stride_t")
_SIG = {"table_ptr": "*i64", "out_ptr": "*fp32", "T": "i32", "D": "i32", "stride_b": "i64", "stride_t": "i64",
        "K": "i32", "eps": "fp32"}
AOT_CONFIGS = [
    dict(name=f"instance_norm_average_kernel {n} final_instance={fi}", kernel=instance_norm_average_kernel,
         signature=dict(_SIG), constexprs={"DTYPE": dt, "FINAL_INSTANCE": fi, "BLOCK_T": BLOCK_T,
                                           "BLOCK_D": BLOCK_D_INSTANCE},
         num_warps=NUM_WARPS, num_stages=3)
    for n, dt in [("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)] for fi in (False, True)
] + [
    dict(name=f"row_norm_average_kernel {n} layer_norm={lnm} final_layer={fl}", kernel=row_norm_average_kernel,
         signature=dict(_SIG), constexprs={"DTYPE": dt, "LAYER_NORM": lnm, "FINAL_LAYER": fl,
                                           "BLOCK_D": BLOCK_D_ROW},
         num_warps=NUM_WARPS, num_stages=3)
    for n, dt in [("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)]
    for lnm in (False, True) for fl in (False, True)
]
