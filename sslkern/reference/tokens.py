"""Eager references for ``gather_tokens`` / ``restore_tokens`` (mae ``models_mae.py``).

Written as the MAE code does it (mae ``models_mae.py``: ``random_masking`` keeps
``torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, D))``; ``forward_decoder`` appends
mask tokens and unshuffles with ``torch.gather(..., ids_restore)``), with the clone batch
materialized by ``repeat_interleave`` (data2vec 2.0) or a loop over masks (I-JEPA
``apply_masks``). Autograd provides the backward. These are the oracles for the tests and
the ``reference`` provider of the benchmarks.
"""
from __future__ import annotations

import torch


def _pos(pos_embed, n_total, d):
    return None if pos_embed is None else pos_embed.reshape(n_total, d)


def gather_tokens(x, ids_keep, *, pos_embed=None, num_prefix_tokens=0, mask_major=False):
    B, L, D = x.shape
    P = num_prefix_tokens
    pos = _pos(pos_embed, L, D)
    if pos is not None:
        x = x + pos.unsqueeze(0)
    prefix, patches = x[:, :P], x[:, P:]
    ids = ids_keep.long()
    if ids.dim() == 2:
        kept = torch.gather(patches, 1, ids.unsqueeze(-1).expand(-1, -1, D))
        return torch.cat([prefix, kept], dim=1)
    M, Nk = ids.shape[1], ids.shape[2]
    if mask_major:  # I-JEPA apply_masks: cat over masks of gather(x, masks[m])
        outs = [torch.cat([prefix, torch.gather(patches, 1, ids[:, m].unsqueeze(-1).expand(-1, -1, D))], 1)
                for m in range(M)]
        return torch.cat(outs, dim=0)
    # data2vec 2.0 clone batch: repeat each image M times, then gather each clone's mask
    rep = patches.repeat_interleave(M, dim=0)
    kept = torch.gather(rep, 1, ids.reshape(B * M, Nk).unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([prefix.repeat_interleave(M, dim=0), kept], dim=1)


def restore_tokens(x_vis, ids_restore, *, mask_token=None, fill=None, pos_embed=None, num_prefix_tokens=0):
    B, Lv, D = x_vis.shape
    P = num_prefix_tokens
    N = ids_restore.shape[1]
    Nk = Lv - P
    prefix, vis = x_vis[:, :P], x_vis[:, P:]
    if mask_token is not None:
        removed = mask_token.reshape(1, 1, D).expand(B, N - Nk, D).to(x_vis.dtype)
        full = torch.cat([vis, removed], dim=1)  # shuffled order: visible ranks first
        y = torch.gather(full, 1, ids_restore.long().unsqueeze(-1).expand(-1, -1, D))
    else:
        # per-slot values (data2vec 2.0 noise): slot i holds fill[b, i] where removed
        rank = ids_restore.long()
        visible = rank < Nk
        src = torch.gather(vis, 1, rank.clamp(max=max(Nk - 1, 0)).unsqueeze(-1).expand(-1, -1, D)) if Nk > 0 \
            else torch.zeros_like(fill)
        y = torch.where(visible.unsqueeze(-1), src, fill.to(x_vis.dtype))
    y = torch.cat([prefix, y], dim=1)
    pos = _pos(pos_embed, P + N, D)
    if pos is not None:
        y = y + pos.unsqueeze(0)
    return y
