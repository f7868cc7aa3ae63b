"""TEMPORARY — delete once every op below has landed on main.

The data2vec 2.0 recipe is written against the public sslkern API. While an op is still
on its branch, this module provides a small eager stand-in under the same name, and the
library op is used as soon as it exists. Each stand-in is the SPEC's math in plain
PyTorch, kept only so the recipe runs end to end in the meantime; none of it is part of
the library.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import sslkern

PENDING: list[str] = []  # names served by a stand-in in this process (shown in the run summary)


def _pick(name: str, standin, owner=sslkern):
    fn = getattr(owner, name, None) if owner is not None else None
    if fn is None:
        PENDING.append(name)
        return standin
    return fn


# ---- ALiBi attention ---------------------------------------------------------------------
def _alibi_slopes(h):
    def pow2(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(h).is_integer():
        return torch.tensor(pow2(h))
    lower = 2 ** math.floor(math.log2(h))
    return torch.tensor(pow2(lower) + pow2(2 * lower)[0::2][: h - lower])


class _AlibiContext:
    def __init__(self, grid_size, num_prefix_tokens):
        self.grid_size, self.num_prefix_tokens, self.coords = tuple(grid_size), num_prefix_tokens, None

    @contextlib.contextmanager
    def tokens(self, ids_keep):
        w = self.grid_size[1]
        old, self.coords = self.coords, torch.stack([ids_keep // w, ids_keep % w], dim=-1)
        try:
            yield
        finally:
            self.coords = old


class _AlibiAttention(nn.Module):
    """timm ``Attention`` sub-modules (qkv, proj) with a 2-D ALiBi bias from a shared context."""

    def __init__(self, attn, ctx):
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.qkv, self.q_norm, self.k_norm, self.norm, self.proj = attn.qkv, attn.q_norm, attn.k_norm, attn.norm, attn.proj
        self.register_buffer("slopes", _alibi_slopes(attn.num_heads), persistent=False)
        self.context = ctx

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        ctx = self.context
        coords = ctx.coords
        if coords is None:
            h, w = ctx.grid_size
            idx = torch.arange(h * w, device=x.device)
            coords = torch.stack([idx // w, idx % w], -1).expand(b, -1, -1)
        d = (coords[:, :, None, :] - coords[:, None, :, :]).abs().sum(-1).float()  # (B, Np, Np)
        p = ctx.num_prefix_tokens
        dist = F.pad(d, (p, 0, p, 0))  # prefix tokens: zero bias
        bias = -self.slopes.view(1, -1, 1, 1).to(x.dtype) * dist[:, None].to(x.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _use_alibi(model, mode="2d"):
    assert mode == "2d"
    ctx = _AlibiContext(model.patch_embed.grid_size, model.num_prefix_tokens)
    for blk in model.blocks:
        blk.attn = _AlibiAttention(blk.attn, ctx)
    return ctx


# ---- what the recipe uses ---------------------------------------------------------------------
use_alibi = _pick("use_alibi", _use_alibi, sslkern.nn)
