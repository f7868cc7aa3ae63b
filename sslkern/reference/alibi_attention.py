"""Eager references for ``alibi_attention`` (fairseq data2vec 2.0 ``get_alibi``): the bias is materialized.

``alibi_attention`` here builds the full (B, H, L, L) bias from the same arguments as the
fused op and runs ``softmax(scale·q·kᵀ + bias)·v``; ``fairseq_get_alibi`` /
``fairseq_masked_alibi`` restate fairseq's data2vec 2.0 construction
(``examples/data2vec/models/modalities/base.py: get_alibi, masked_alibi``), the oracle the
tests compare the 2D bias with.
"""
from __future__ import annotations

import math

import torch

MODES = ("none", "1d", "2d", "2d_euclidean")


def _slopes_list(n: int) -> list[float]:
    # ALiBi paper / fairseq get_slopes: a geometric sequence for a power of two; otherwise
    # the nearest lower power's set plus every other slope of twice that power.
    def power_of_2(m: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _slopes_list(2 * closest)[0::2][: n - closest]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi slopes for ``num_heads`` heads, (H,) float32 (fairseq ``get_alibi``)."""
    return torch.tensor(_slopes_list(int(num_heads)), dtype=torch.float32)


def grid_coords(n_tokens: int, device=None) -> torch.Tensor:
    """(n, 2) float32 (row, col) of a square grid of ``n_tokens`` patches in raster order."""
    side = math.isqrt(n_tokens)
    idx = torch.arange(n_tokens, device=device)
    return torch.stack([idx // side, idx % side], dim=-1).to(torch.float32)


def alibi_bias(slopes: torch.Tensor, coords: torch.Tensor, mode: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """The materialized bias (B, H, L, L) for effective ``slopes`` (B, H) and patch
    ``coords`` (B, L-P, 2) (for 1d, coords[..., 0] is the position); prefix rows and
    columns are zero."""
    b, lp = coords.shape[0], coords.shape[1]
    P = num_prefix_tokens
    d = coords[:, :, None, :] - coords[:, None, :, :]  # (B, Lp, Lp, 2)
    if mode == "none":
        dist = torch.zeros(d.shape[:-1], dtype=slopes.dtype, device=d.device)
    elif mode == "2d_euclidean":
        dist = torch.sqrt((d * d).sum(-1))
    else:  # 1d (second coordinate is 0) and 2d: Manhattan
        dist = d.abs().sum(-1)
    bias = -slopes[:, :, None, None] * dist[:, None].to(slopes.dtype)
    if P:
        bias = torch.nn.functional.pad(bias, (P, 0, P, 0))
    return bias


def alibi_attention(q, k, v, *, slopes=None, mode="2d", coords=None, num_prefix_tokens=0,
                    bias_scale=None, scale=None) -> torch.Tensor:
    """``softmax(scale·q·kᵀ + bias)·v`` with the ALiBi bias materialized as (B, H, L, L).

    Same arguments as :func:`sslkern.alibi_attention`; softmax in fp32 for fp16/bf16
    inputs, output in the input dtype.
    """
    B, H, L, Dh = q.shape
    eff, crd = effective_slopes_and_coords(q, slopes, mode, coords, num_prefix_tokens, bias_scale)
    scale = Dh**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = scale * torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))
    s = s + alibi_bias(eff.to(acc), crd.to(acc), mode, num_prefix_tokens)
    return torch.matmul(torch.softmax(s, dim=-1), v.to(acc)).to(q.dtype)


def effective_slopes_and_coords(q, slopes, mode, coords, num_prefix_tokens, bias_scale):
    """(B, H) slopes times ``bias_scale`` (differentiable) and (B, L-P, 2) float32 coords."""
    B, H, L, _ = q.shape
    lp = L - num_prefix_tokens
    if slopes is None:
        slopes = alibi_slopes(H).to(q.device)
    s = slopes.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    s = s.expand(B, H) if s.dim() == 1 else s
    if bias_scale is not None:
        s = s * bias_scale.to(s.dtype)[None, :]
    if mode == "none":
        s = s * 0
    if mode == "1d":
        pos = torch.arange(lp, device=q.device, dtype=torch.float32) if coords is None else coords.to(torch.float32)
        pos = pos.reshape(-1, lp)  # (L-P,), (B, L-P) or (B, L-P, 1) positions
        crd = torch.stack([pos, torch.zeros_like(pos)], dim=-1)
    elif coords is None:
        crd = grid_coords(lp, q.device)[None]
    else:
        crd = coords.to(torch.float32)
        crd = crd[None] if crd.dim() == 2 else crd
    return s, crd.expand(B, lp, 2)


# ---------------------------------------------------------------------------------------
# fairseq's construction (data2vec 2.0), restated for the tests
# ---------------------------------------------------------------------------------------
def fairseq_get_alibi(max_positions: int, attention_heads: int, dims: int = 1, distance: str = "manhattan"):
    """(H, L, L) bias as fairseq ``get_alibi``: 1D ``-s·|i-j|`` or, for dims=2, the negative
    Manhattan / Euclidean distance of the (row, col) of a sqrt(L) x sqrt(L) raster grid."""
    slopes = alibi_slopes(attention_heads)
    if dims == 1:
        pos = torch.arange(max_positions)
        pos_bias = -(pos[None, :] - pos[:, None]).abs().to(torch.float32)
    else:
        n = math.isqrt(max_positions)
        assert n * n == max_positions
        pos_bias = torch.zeros(max_positions, max_positions)
        for i in range(n):  # loops kept as in the original, to be an independent oracle
            for j in range(n):
                for kk in range(n):
                    for ll in range(n):
                        dist = abs(i - kk) + abs(j - ll) if distance == "manhattan" else math.sqrt((i - kk) ** 2 + (j - ll) ** 2)
                        pos_bias[i * n + j, kk * n + ll] = -dist
    return slopes[:, None, None] * pos_bias[None]


def fairseq_masked_alibi(alibi_bias: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """fairseq ``masked_alibi``: gather rows then columns of a (B or 1, H, L, L) bias at
    ``ids_keep`` (B, Lk) → (B, H, Lk, Lk)."""
    B, Lk = ids_keep.shape
    H = alibi_bias.shape[1]
    full = alibi_bias.expand(B, H, -1, -1)
    idx = ids_keep[:, None, :, None]
    rows = torch.gather(full, -2, idx.expand(B, H, Lk, full.shape[-1]))
    return torch.gather(rows, -1, ids_keep[:, None, None, :].expand(B, H, Lk, Lk))
