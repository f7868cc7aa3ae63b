"""Straightforward per-image ports of the reference mask generators.

These follow the public loops step by step — dinov2 ``MaskingGenerator`` with the ratios
of ``collate_data_and_cast``, fairseq ``compute_block_mask_2d(inverse_mask=True)``, I-JEPA
``MaskCollator`` — and are the oracles for the distribution tests of ``sslkern.masks`` and
the baselines of its benchmark. Randomness: ``random.Random`` (dinov2 draws from Python's
``random``) or a ``torch.Generator`` (fairseq, I-JEPA draw with torch).
"""
from __future__ import annotations

import math
import random

import torch


def dinov2_block_mask_image(rng: random.Random, H: int, W: int, num_masking_patches: int, *,
                            min_num_patches: int = 4, max_num_patches: float | None = None,
                            min_aspect: float = 0.3, max_aspect: float | None = None) -> torch.Tensor:
    """One image's (H, W) bool mask, dinov2 ``MaskingGenerator.__call__``."""
    max_patches = num_masking_patches if max_num_patches is None else max_num_patches
    lo_ar, hi_ar = math.log(min_aspect), math.log(max_aspect or 1 / min_aspect)
    mask = torch.zeros(H, W, dtype=torch.bool)
    count = 0
    while count < num_masking_patches:
        budget = min(num_masking_patches - count, max_patches)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_num_patches, budget)
            ar = math.exp(rng.uniform(lo_ar, hi_ar))
            h = int(round(math.sqrt(area * ar)))
            w = int(round(math.sqrt(area / ar)))
            if w < W and h < H:
                top = rng.randint(0, H - h)
                left = rng.randint(0, W - w)
                already = int(mask[top:top + h, left:left + w].sum())
                if 0 < h * w - already <= budget:
                    added = h * w - already
                    mask[top:top + h, left:left + w] = True
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return mask


def dinov2_block_mask(rng: random.Random, batch: int, H: int, W: int, mask_ratio=(0.1, 0.5),
                      mask_probability: float = 1.0, **kwargs) -> torch.Tensor:
    """(B, H·W) masks with dinov2 ``collate_data_and_cast``'s per-image ratios."""
    N = H * W
    kwargs.setdefault("max_num_patches", 0.5 * N)
    n_masked = int(batch * mask_probability)
    lo, hi = mask_ratio
    edges = [lo + (hi - lo) * i / n_masked for i in range(n_masked + 1)] if n_masked else [lo]
    out = []
    for i in range(n_masked):
        target = int(N * rng.uniform(edges[i], edges[i + 1]))
        out.append(dinov2_block_mask_image(rng, H, W, target, **kwargs).flatten())
    out += [torch.zeros(N, dtype=torch.bool)] * (batch - n_masked)
    rng.shuffle(out)
    return torch.stack(out) if out else torch.zeros(0, N, dtype=torch.bool)


def fairseq_inverse_block_mask(batch: int, H: int, W: int, mask_prob: float, *, mask_length: int = 3,
                               mask_prob_adjust: float = 0.07, generator: torch.Generator | None = None
                               ) -> torch.Tensor:
    """(B, H·W) bool, True = masked: ``compute_block_mask_2d(..., inverse_mask=True,
    require_same_masks=True)`` without mask dropout."""
    L = H * W
    p = 1 - mask_prob
    keep = torch.zeros(batch, H, W)
    n_centers = int(L * ((p + mask_prob_adjust) / mask_length ** 2))
    centers = torch.randint(0, L, (batch, n_centers), generator=generator)
    keep.view(batch, -1).scatter_(1, centers, 1)
    bi, ci, cj = keep.nonzero(as_tuple=True)
    off = mask_length // 2
    for di in range(mask_length):
        for dj in range(mask_length):
            keep[bi, (ci + di - off).clamp(0, H - 1), (cj + dj - off).clamp(0, W - 1)] = 1
    keep = keep.reshape(batch, -1)
    target = int(L * p)
    for b in range(batch):
        row = keep[b]
        n = int(row.sum())
        if n > target:
            row[torch.multinomial(row, n - target, replacement=False, generator=generator)] = 0
        elif n < target:
            row[torch.multinomial(1 - row, target - n, replacement=False, generator=generator)] = 1
    return keep == 0


def ijepa_multiblock(batch: int, H: int, W: int, *, num_targets: int = 4, target_scale=(0.15, 0.2),
                     target_aspect=(0.75, 1.5), num_context: int = 1, context_scale=(0.85, 1.0),
                     min_keep: int = 4, generator: torch.Generator | None = None):
    """(context (B, nc, Kc), targets (B, nt, Kt)) index sets, I-JEPA ``MaskCollator.__call__``."""

    def block_size(scale, aspect):
        u = torch.rand(1, generator=generator).item()
        keep = int(H * W * (scale[0] + u * (scale[1] - scale[0])))
        ar = aspect[0] + u * (aspect[1] - aspect[0])
        h, w = int(round(math.sqrt(keep * ar))), int(round(math.sqrt(keep / ar)))
        while h >= H:
            h -= 1
        while w >= W:
            w -= 1
        return h, w

    def block(size, regions=None):
        h, w = size
        tries, timeout = 0, 20
        while True:
            top = int(torch.randint(0, H - h, (1,), generator=generator))
            left = int(torch.randint(0, W - w, (1,), generator=generator))
            m = torch.zeros(H, W, dtype=torch.int32)
            m[top:top + h, left:left + w] = 1
            if regions is not None:
                for k in range(max(len(regions) - tries, 0)):
                    m *= regions[k]
            idx = torch.nonzero(m.flatten()).squeeze(1)
            if len(idx) > min_keep:
                comp = torch.ones(H, W, dtype=torch.int32)
                comp[top:top + h, left:left + w] = 0
                return idx, comp
            timeout -= 1
            if timeout == 0:
                tries += 1
                timeout = 20

    p_size = block_size(target_scale, target_aspect)
    e_size = block_size(context_scale, (1.0, 1.0))
    preds, encs = [], []
    for _ in range(batch):
        ps, comps = zip(*[block(p_size) for _ in range(num_targets)])
        preds.append(list(ps))
        encs.append([block(e_size, list(comps))[0] for _ in range(num_context)])
    kp = min(len(m) for ms in preds for m in ms)
    ke = min(len(m) for ms in encs for m in ms)
    targets = torch.stack([torch.stack([m[:kp] for m in ms]) for ms in preds])
    context = torch.stack([torch.stack([m[:ke] for m in ms]) for ms in encs])
    return context, targets
