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
from typing import NamedTuple

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


# ---- tokens ---------------------------------------------------------------------------
def _gather_tokens(x, ids_keep, *, pos_embed=None, num_prefix_tokens=0, mask_major=False):
    if ids_keep.dim() == 2:
        ids_keep = ids_keep.unsqueeze(1)
    b, m, nk = ids_keep.shape
    p = num_prefix_tokens
    patches = x[:, p:]
    if pos_embed is not None:
        patches = patches + pos_embed
    idx = ids_keep.reshape(b, m * nk, 1).expand(-1, -1, x.shape[-1])
    vis = torch.gather(patches, 1, idx).reshape(b, m, nk, -1)
    prefix = x[:, :p].unsqueeze(1).expand(-1, m, -1, -1)
    out = torch.cat([prefix, vis], dim=2)
    if mask_major:
        out = out.transpose(0, 1)
    return out.reshape(b * m, p + nk, -1)


def _restore_tokens(x_vis, ids_restore, *, mask_token=None, fill=None, pos_embed=None, num_prefix_tokens=0):
    p = num_prefix_tokens
    b, n = ids_restore.shape
    vis = x_vis[:, p:]
    nk = vis.shape[1]
    if fill is None:
        fill = mask_token.view(1, 1, -1).expand(b, n, -1)
    # slot i holds visible token rank r = ids_restore[i] when r < nk, else the fill of slot i
    from_vis = torch.gather(vis, 1, ids_restore.clamp(max=nk - 1).unsqueeze(-1).expand(-1, -1, vis.shape[-1]))
    y = torch.where((ids_restore < nk).unsqueeze(-1), from_vis, fill.to(vis.dtype))
    if pos_embed is not None:
        y = y + pos_embed
    return torch.cat([x_vis[:, :p], y], dim=1)


class _TokenMasks(NamedTuple):
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def _from_noise(noise, keep):
    ids_shuffle = noise.argsort(dim=-1)
    ids_restore = ids_shuffle.argsort(dim=-1)
    mask = ids_restore >= keep
    out = _TokenMasks(ids_shuffle[..., :keep].contiguous(), ids_restore, mask)
    return _TokenMasks(*(t.squeeze(1) for t in out)) if noise.shape[1] == 1 else out  # (B, ...) for one mask


def _random_mask(batch, num_tokens, mask_ratio, *, num_masks=1, generator=None, device=None):
    keep = int(num_tokens * (1 - mask_ratio))
    noise = torch.rand(batch, num_masks, num_tokens, generator=generator, device=device)
    return _from_noise(noise, keep)


def _inverse_block_mask(batch, grid_hw, mask_prob, *, mask_length=3, mask_prob_adjust=0.07, num_masks=1,
                        generator=None, device=None):
    h, w = grid_hw
    n = h * w
    keep_prob = 1 - mask_prob
    keep = int(n * keep_prob)
    n_centers = max(1, int(n * (keep_prob + mask_prob_adjust) / mask_length ** 2))
    rows = batch * num_masks
    kept = torch.zeros(rows, h, w, dtype=torch.bool)
    centers = torch.randint(0, n, (rows, n_centers), generator=generator)
    off = torch.arange(mask_length) - (mask_length - 1) // 2
    for r in range(rows):
        for c in centers[r].tolist():
            ci, cj = divmod(c, w)
            ii = (ci + off).clamp(0, h - 1)
            jj = (cj + off).clamp(0, w - 1)
            kept[r][ii[:, None], jj[None, :]] = True
    kept = kept.view(rows, n)
    # add / remove kept tokens at random until exactly `keep` per row: rank by (kept, random)
    score = kept.float() + torch.rand(rows, n, generator=generator)  # kept tokens score in [1, 2)
    noise = -score  # argsort ascending → highest score kept first
    return _from_noise(noise.view(batch, num_masks, n).to(device), keep)


class _Masks:
    random_mask = staticmethod(_random_mask)
    inverse_block_mask = staticmethod(_inverse_block_mask)


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
gather_tokens = _pick("gather_tokens", _gather_tokens)
restore_tokens = _pick("restore_tokens", _restore_tokens)
masks = _pick("masks", _Masks)
use_alibi = _pick("use_alibi", _use_alibi, sslkern.nn)
