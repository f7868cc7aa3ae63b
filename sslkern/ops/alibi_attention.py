"""``alibi_attention`` — attention with an in-kernel ALiBi bias (fairseq data2vec 2.0 ``get_alibi``).

``softmax(scale·q·kᵀ + bias)·v`` where the 1D / 2D linear bias is computed inside the
kernel from per-token coordinates: no (B, H, L, L) tensor is ever allocated, also on
gathered (masked) token sets, whose tokens keep their true grid coordinates.

Custom ops: ``torch.ops.sslkern.alibi_attention`` (returns the output and the row
log-sum-exp) and ``torch.ops.sslkern.alibi_attention_backward`` (dq, dk, dv and the
gradient of the per-(batch, head) effective slopes). The public function folds the
optional per-head ``bias_scale`` into the effective slopes with ordinary differentiable
torch ops, so autograd returns its gradient (and the slopes' gradient) for free.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import Dispatch, standard_impls
from .._checks import FLOAT_DTYPES, check_choice, check_float, check_int, check_tensor, fail
from ..reference.alibi_attention import MODES, alibi_bias, alibi_slopes as _ref_slopes, grid_coords
from ._common import acc_dtype

OP = "alibi_attention"
_MODE_ID = {"none": 0, "1d": 1, "2d": 1, "2d_euclidean": 2}  # kernel distance: none / Manhattan / Euclidean
_MODE_NAME = {0: "none", 1: "2d", 2: "2d_euclidean"}


# ---------------------------------------------------------------------------------------
# Eager backend: the custom ops' contracts on the materialized bias (runs anywhere)
# ---------------------------------------------------------------------------------------
def alibi_attention_eager(q, k, v, slopes, coords, num_prefix_tokens, mode, scale):
    """The forward custom op's contract (output and row log-sum-exp) in eager PyTorch."""
    acc = slopes.dtype
    s = scale * torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))
    s = s + alibi_bias(slopes, coords, _MODE_NAME[mode], num_prefix_tokens)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.to(acc))
    return out.to(q.dtype).contiguous(), lse.contiguous()


def alibi_attention_backward_eager(dout, q, k, v, out, lse, slopes, coords, num_prefix_tokens, mode, scale):
    """The backward custom op's contract: the attention backward written out on the
    materialized matrices (custom-op bodies run below autograd)."""
    acc, dtype = slopes.dtype, q.dtype
    q, k, v, dout, out = (t.to(acc) for t in (q, k, v, dout, out))
    neg_dist = alibi_bias(torch.ones_like(slopes), coords, _MODE_NAME[mode], num_prefix_tokens)
    s = scale * torch.matmul(q, k.transpose(-1, -2)) + slopes[:, :, None, None] * neg_dist
    p = torch.exp(s - lse[..., None])
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    ds = p * (dp - (dout * out).sum(-1, keepdim=True))
    dq = scale * torch.matmul(ds, k)
    dk = scale * torch.matmul(ds.transpose(-1, -2), q)
    dslopes = (ds * neg_dist).sum((-1, -2))
    return tuple(t.to(dtype).contiguous() for t in (dq, dk, dv)) + (dslopes.contiguous(),)


dispatch = Dispatch(OP, standard_impls(OP, alibi_attention_eager))
dispatch_backward = Dispatch(OP + "_backward", standard_impls(OP + "_backward", alibi_attention_backward_eager,
                                                              triton_module=OP))


# ---------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("sslkern::alibi_attention", mutates_args=())
def _alibi_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                        coords: torch.Tensor, num_prefix_tokens: int, mode: int, scale: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = dispatch(q.device, backend)(q, k, v, slopes, coords, num_prefix_tokens, mode, scale)
    return out, lse


@_alibi_attention_op.register_fake
def _(q, k, v, slopes, coords, num_prefix_tokens, mode, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=slopes.dtype)


@torch.library.custom_op("sslkern::alibi_attention_backward", mutates_args=())
def _alibi_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, slopes: torch.Tensor, coords: torch.Tensor,
                                 num_prefix_tokens: int, mode: int, scale: float,
                                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, ds = dispatch_backward(q.device, backend)(dout, q, k, v, out, lse, slopes, coords,
                                                         num_prefix_tokens, mode, scale)
    return dq, dk, dv, ds


@_alibi_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, slopes, coords, num_prefix_tokens, mode, scale, backend):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return like(q), like(q), like(q), torch.empty_like(slopes)


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, coords, num_prefix_tokens, mode, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, slopes, coords)
    ctx.args = (num_prefix_tokens, mode, scale, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, slopes, coords = ctx.saved_tensors
    if dout is None:
        return (None,) * 9
    dq, dk, dv, ds = torch.ops.sslkern.alibi_attention_backward(
        dout.contiguous(), q, k, v, out, lse, slopes, coords, *ctx.args)
    return dq, dk, dv, ds, None, None, None, None, None


_alibi_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes, (H,) float32: fairseq ``get_alibi`` / Press et al. (2022) for any H.

    ``s_h = (2^(−8/H))^(h+1)`` for H a power of two; otherwise the set of the nearest lower
    power of two followed by every other slope of the set for twice that power
    (H=6 → [1/4, 1/16, 1/64, 1/256, 1/2, 1/8]).
    """
    return _ref_slopes(check_int("alibi_slopes", "num_heads", num_heads, 1))


def _autocast(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, q, k, v in the autocast dtype (fp64 stays fp64), as SDPA does: with
    qk-norm, timm's LayerNorm returns fp32 q / k next to a bf16 v."""
    dev = ts[0].device.type
    if not torch.is_autocast_enabled(dev):
        return ts
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.dtype != torch.float64 else t for t in ts)


def _unit_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, slopes: Optional[torch.Tensor] = None,
                    mode: str = "2d", coords: Optional[torch.Tensor] = None, num_prefix_tokens: int = 0,
                    bias_scale: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    r"""Attention with a linear (ALiBi) bias computed in the kernel.

    ``out = softmax(scale·q·kᵀ + bias)·v`` with, for patch tokens i, j (prefix tokens get
    zero bias to and from everything)::

        "none"          bias = 0
        "1d"            bias = −s·|p_i − p_j|
        "2d"            bias = −s·(|r_i − r_j| + |c_i − c_j|)          (data2vec 2.0 images)
        "2d_euclidean"  bias = −s·sqrt((r_i − r_j)² + (c_i − c_j)²)

    ``s = slopes[b, h] · bias_scale[h]``. Matches fairseq data2vec 2.0 ``get_alibi`` (dims 1
    and 2, ``masked_alibi`` for gathered tokens, zero-padded prefix rows/columns, bias
    times the clamped per-head ``alibi_scale``) fed to SDPA; no (B, H, L, L) tensor is made.

    Args:
        q, k, v: (B, H, L, Dh), one float dtype (fp32, fp16, bf16, fp64); softmax in fp32
            (fp64 for fp64). Under ``torch.autocast`` all three are first cast to the
            autocast dtype (fp64 excepted), like ``F.scaled_dot_product_attention``. Any strides with unit stride on Dh (others are copied).
        slopes: (H,) or (B, H) slopes (default :func:`alibi_slopes`\ (H)); differentiable.
        mode: "none" | "1d" | "2d" | "2d_euclidean".
        coords: positions of the L − P patch tokens (gathered tokens keep their true grid
            coordinates). 2D modes: (B, L−P, 2) or (L−P, 2) (row, col); None → a square
            sqrt(L−P)×sqrt(L−P) grid in raster order. 1D: (B, L−P) or (L−P,) positions;
            None → 0 … L−P−1. Any real dtype (used as float32); not differentiated.
        num_prefix_tokens: P, leading tokens (CLS, registers) with zero bias.
        bias_scale: optional (H,) non-negative per-head multiplier; differentiable
            (data2vec 2.0 learns it and clamps it ≥ 0 — the caller clamps).
        scale: softmax scale (default Dh ** -0.5).
        backend: force "reference", "cpu" or "triton" (default: auto).

    Returns:
        (B, H, L, Dh) contiguous, in q's dtype. Gradients flow to q, k, v, slopes and
        bias_scale.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, dtypes=FLOAT_DTYPES, ndim=4)
    q, k, v = _autocast(q, k, v)
    B, H, L, Dh = q.shape
    device = q.device
    check_tensor(OP, "k", k, dtypes=(q.dtype,), shape=tuple(q.shape), device=device)
    check_tensor(OP, "v", v, dtypes=(q.dtype,), shape=tuple(q.shape), device=device)
    check_choice(OP, "mode", mode, MODES)
    P = num_prefix_tokens = check_int(OP, "num_prefix_tokens", num_prefix_tokens, 0, L)
    lp = L - P
    acc = acc_dtype(q)

    # Effective slopes (B, H): slopes × bias_scale, built with differentiable torch ops.
    if slopes is None:
        slopes = _ref_slopes(H).to(device)
    else:
        check_tensor(OP, "slopes", slopes, dtypes=FLOAT_DTYPES, ndim=(1, 2), device=device)
        if tuple(slopes.shape) not in ((H,), (B, H)):
            fail(OP, f"slopes expected shape ({H},) or ({B}, {H}) (one per head of q), got {tuple(slopes.shape)}")
    eff = slopes.to(acc).expand(B, H)
    if bias_scale is not None:
        check_tensor(OP, "bias_scale", bias_scale, dtypes=FLOAT_DTYPES, shape=(H,), device=device)
        eff = eff * bias_scale.to(acc)[None, :]
    if mode == "none":
        eff = eff * 0  # keeps the graph (zero gradients) without a special case in the kernels
    eff = eff.contiguous()

    # Coordinates (B, L-P, 2) float32.
    if mode == "1d":
        if coords is None:
            pos = torch.arange(lp, device=device, dtype=torch.float32)[None]
        else:
            check_tensor(OP, "coords", coords, ndim=(1, 2), device=device)
            if tuple(coords.shape) not in ((lp,), (B, lp)):
                fail(OP, f"coords expected shape ({lp},) or ({B}, {lp}) for mode '1d' (positions of the "
                         f"L - P patch tokens), got {tuple(coords.shape)}")
            pos = coords.to(torch.float32).reshape(-1, lp)
        crd = torch.stack([pos, torch.zeros_like(pos)], dim=-1)
    elif coords is None:
        side = math.isqrt(lp)
        if mode != "none" and side * side != lp:
            fail(OP, f"coords is None with mode {mode!r}: L - P = {lp} patch tokens must form a square grid; "
                     "pass coords (B, L - P, 2) for other layouts")
        crd = grid_coords(lp, device)[None]
    else:
        check_tensor(OP, "coords", coords, ndim=(2, 3), device=device)
        if tuple(coords.shape) not in ((lp, 2), (B, lp, 2)):
            fail(OP, f"coords expected shape ({lp}, 2) or ({B}, {lp}, 2) ((row, col) of the L - P patch "
                     f"tokens), got {tuple(coords.shape)}")
        crd = coords.to(torch.float32).reshape(-1, lp, 2)
    crd = crd.expand(B, lp, 2).contiguous()

    scale = Dh**-0.5 if scale is None else check_float(OP, "scale", scale)
    # autocast off inside: the inputs are already cast, and the reference backend's fp32
    # softmax must not be recast to half by autocast
    with torch.autocast(device.type, enabled=False):
        out, _ = torch.ops.sslkern.alibi_attention(_unit_last_dim(q), _unit_last_dim(k), _unit_last_dim(v), eff,
                                                   crd, P, _MODE_ID[mode], scale, backend or "")
    return out
