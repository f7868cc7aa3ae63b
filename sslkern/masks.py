"""Mask generators for masked image modelling (BEiT blockwise, MAE random, I-JEPA multi-block, data2vec 2.0
inverse-block, SimMIM mask patches) and the context encoder's pixel regions, vectorized over the batch.

Every generator takes a ``torch.Generator`` (all randomness is drawn from it, so a seed
reproduces the masks) and returns index sets ready for ``sslkern.gather_tokens`` /
``sslkern.restore_tokens``:

``TokenMasks(ids_keep, ids_restore, mask)``
    ``mask`` bool, True = removed, in original token order; ``ids_keep`` the kept patch
    indices; ``ids_restore`` the MAE rank of every position (``ids_restore[ids_keep[j]] = j``),
    so ``restore_tokens(gather_tokens(x, ids_keep), ids_restore, …)`` puts tokens back.
    Shapes ``(B, Nk)``, ``(B, N)``, ``(B, N)``; with ``num_masks=M > 1`` a mask dim follows
    the batch: ``(B, M, Nk)`` etc. (image-major, the data2vec 2.0 clone batch).

Orders: ``random_mask`` keeps MAE's shuffle order (``ids_keep`` is a random order of the
kept tokens); the block generators list kept tokens in ascending position, then the
removed ones ascending (``ids_restore`` ranks in that order).

The reference loops (dinov2 ``MaskingGenerator``, fairseq ``compute_block_mask_2d``,
I-JEPA ``MaskCollator``) draw per image in Python; here each generator runs a handful of
batched tensor steps. They draw from the same distributions, not the same random stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import check_range, fail

__all__ = ["TokenMasks", "MultiBlockMasks", "random_mask", "block_mask", "inverse_block_mask", "multiblock_masks",
           "masks_from_bool", "simmim_mask", "center_region", "random_region", "shrink"]


@dataclass
class TokenMasks:
    ids_keep: torch.Tensor     # (B[, M], Nk) int64
    ids_restore: torch.Tensor  # (B[, M], N) int64
    mask: torch.Tensor         # (B[, M], N) bool, True = removed


@dataclass
class MultiBlockMasks:
    """I-JEPA masks: ascending patch indices, every set cut to the batch-minimum length.

    ``context`` ``(B, num_context, Kc)``, ``targets`` ``(B, num_targets, Kt)``. For the I-JEPA
    encoder / predictor order use ``gather_tokens(x, masks.targets, mask_major=True)``
    (rows ``m·B + b``, = ``apply_masks``); ``as_lists()`` gives ijepa's collated lists.
    """

    context: torch.Tensor
    targets: torch.Tensor

    def as_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(masks_enc, masks_pred) as ijepa's ``MaskCollator`` returns them: lists of (B, K)."""
        return list(self.context.unbind(1)), list(self.targets.unbind(1))


def _gen_device(generator, device):
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _out_device(generator, device):
    return torch.device(device) if device is not None else _gen_device(generator, None)


def _split(t: torch.Tensor, B: int, M: int) -> torch.Tensor:
    return t.reshape(B, M, *t.shape[1:]) if M > 1 else t


def _check_batch(op, batch, num_masks):
    if not isinstance(batch, int) or batch < 0:
        fail(op, f"batch expected a non-negative int, got {batch!r}")
    if not isinstance(num_masks, int) or num_masks < 1:
        fail(op, f"num_masks expected a positive int, got {num_masks!r}")


def _check_grid(op, grid_hw):
    if isinstance(grid_hw, int):
        grid_hw = (grid_hw, grid_hw)
    if len(grid_hw) != 2 or any(not isinstance(s, int) or s < 1 for s in grid_hw):
        fail(op, f"grid_hw expected (height, width) of positive ints, got {grid_hw!r}")
    return tuple(grid_hw)


def masks_from_bool(mask: torch.Tensor, num_keep: int | None = None) -> TokenMasks:
    """Index sets for a boolean mask ``(R, N)`` (True = removed).

    Kept positions ascending, then removed ones ascending. Rows that keep different
    numbers of tokens are cut to ``num_keep`` (default: the batch minimum, as I-JEPA does);
    ``ids_restore`` then ranks the dropped kept tokens after ``num_keep``, so a restore puts
    the fill value there, and the returned ``mask`` marks them removed.
    """
    R, N = mask.shape
    kept = (~mask).sum(1)
    k = int(kept.min()) if num_keep is None and R > 0 else (num_keep or 0)
    order, ids_restore = _kept_first_order(mask)
    return TokenMasks(order[:, :k].contiguous(), ids_restore, ids_restore >= k)


def _kept_first_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, ids_restore) listing kept positions ascending, then removed ones ascending.

    Ranks come from two prefix sums (no sort): a kept position's rank is the number of kept
    positions before it; a removed one's is (kept count) + (removed before it).
    """
    keep = (~mask).long()
    n_keep = keep.sum(-1, keepdim=True)
    ranks_keep = keep.cumsum(-1) - 1
    ranks_drop = n_keep + (1 - keep).cumsum(-1) - 1
    ids_restore = torch.where(mask, ranks_drop, ranks_keep)
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(ids_restore)
    order = torch.empty_like(ids_restore).scatter_(-1, ids_restore, pos)
    return order, ids_restore


def _ranks(keys: torch.Tensor) -> torch.Tensor:
    """Rank of every element within its row (0 = smallest): one sort and a scatter."""
    order = torch.argsort(keys, dim=-1)
    pos = torch.arange(keys.shape[-1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


# ---------------------------------------------------------------------------------------
def random_mask(batch: int, num_tokens: int, mask_ratio: float, *, num_masks: int = 1,
                generator: torch.Generator | None = None, device=None) -> TokenMasks:
    """MAE ``random_masking``: keep ``int(N·(1 − mask_ratio))`` tokens uniformly at random.

    mae ``models_mae.py``: ``noise ~ U(0, 1)``, ``ids_shuffle = argsort(noise)``,
    ``ids_restore = argsort(ids_shuffle)``, ``ids_keep = ids_shuffle[:, :len_keep]``.
    """
    op = "masks.random_mask"
    _check_batch(op, batch, num_masks)
    if not isinstance(num_tokens, int) or num_tokens < 1:
        fail(op, f"num_tokens expected a positive int, got {num_tokens!r}")
    check_range(op, "mask_ratio", mask_ratio, 0.0, 1.0, hi_open=True)
    R = batch * num_masks
    len_keep = int(num_tokens * (1 - mask_ratio))
    noise = torch.rand(R, num_tokens, generator=generator, device=_gen_device(generator, device))
    ids_shuffle = torch.argsort(noise, dim=1)
    pos = torch.arange(num_tokens, device=noise.device).expand_as(ids_shuffle)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, pos)  # = argsort(ids_shuffle)
    out = _out_device(generator, device)
    ids_keep = ids_shuffle[:, :len_keep].contiguous()
    mask = ids_restore >= len_keep
    return TokenMasks(*(_split(t.to(out), batch, num_masks) for t in (ids_keep, ids_restore, mask)))


# ---------------------------------------------------------------------------------------
def block_mask(batch: int, grid_hw, mask_ratio=(0.1, 0.5), *, mask_probability: float = 1.0,
               min_num_patches: int = 4, max_num_patches: float | None = None, min_aspect: float = 0.3,
               max_aspect: float | None = None, num_keep: int | None = None,
               generator: torch.Generator | None = None, device=None) -> TokenMasks:
    """BEiT / iBOT / DINOv2 block masking (dinov2 ``dinov2/data/masking.py: MaskingGenerator``
    with the per-image ratios of ``dinov2/data/collate.py: collate_data_and_cast``).

    The first ``int(batch·mask_probability)`` images get target counts
    ``int(N·U(r_i, r_{i+1}))`` with ``r = linspace(lo, hi, n + 1)`` (``mask_ratio = (lo, hi)``
    or one float), the others none; the images are then shuffled. Each masked image adds
    blocks until its target is met: up to 10 tries per block, area ``U(min_num_patches,
    remaining)`` (capped by ``max_num_patches``, default ``0.5·N`` as dinov2's trainer),
    aspect log-uniform in ``(min_aspect, max_aspect or 1/min_aspect)``, accepted if it adds
    between 1 and ``remaining`` new tokens; an image stops when 10 tries add nothing.

    ``mask`` is the exact per-image block mask (what iBOT needs); kept counts differ per
    image, so ``ids_keep`` has ``num_keep`` (default: the batch minimum) ascending indices
    and the returned ``mask`` equals ``ids_restore >= num_keep`` only when the counts agree;
    ``TokenMasks.mask`` here is the generated block mask.
    """
    op = "masks.block_mask"
    _check_batch(op, batch, 1)
    H, W = _check_grid(op, grid_hw)
    N = H * W
    lo, hi = (mask_ratio, mask_ratio) if isinstance(mask_ratio, (int, float)) else tuple(mask_ratio)
    check_range(op, "mask_ratio", lo, 0.0, 1.0)
    check_range(op, "mask_ratio", hi, lo, 1.0)
    check_range(op, "mask_probability", mask_probability, 0.0, 1.0)
    gdev = _gen_device(generator, device)
    max_patches = 0.5 * N if max_num_patches is None else float(max_num_patches)
    log_ar = (math.log(min_aspect), math.log(max_aspect or 1.0 / min_aspect))

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=gdev, dtype=torch.float64)

    n_masked = int(batch * mask_probability)
    edges = torch.linspace(lo, hi, n_masked + 1, dtype=torch.float64, device=gdev)
    target = torch.zeros(batch, dtype=torch.int64, device=gdev)
    if n_masked:
        r = edges[:-1] + (edges[1:] - edges[:-1]) * rand(n_masked)
        target[:n_masked] = (N * r).long()
    target = target[torch.randperm(batch, generator=generator, device=gdev)]

    mask = torch.zeros(batch, H, W, dtype=torch.bool, device=gdev)
    count = torch.zeros(batch, dtype=torch.int64, device=gdev)
    active = count < target
    rows = torch.arange(H, device=gdev).view(1, 1, H, 1)
    cols = torch.arange(W, device=gdev).view(1, 1, 1, W)
    while bool(active.any()):
        # One block per image still below its target (dinov2 _mask). Its up-to-10 tries
        # do not change the mask until one succeeds, so all 10 are drawn at once and the
        # first acceptable one is used; an image with none stops (delta == 0 → break).
        remaining = torch.clamp(target - count, max=max_patches).to(torch.float64)
        u = rand(4, 10, batch)
        area = min_num_patches + (remaining - min_num_patches) * u[0]
        aspect = torch.exp(log_ar[0] + (log_ar[1] - log_ar[0]) * u[1])
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (w < W) & (h < H)
        top = torch.floor(u[2] * (H - h + 1).clamp(min=1)).long()      # randint(0, H - h)
        left = torch.floor(u[3] * (W - w + 1).clamp(min=1)).long()
        # tokens already masked inside each candidate, from a summed-area table
        sat = torch.zeros(batch, H + 1, W + 1, dtype=torch.int64, device=gdev)
        sat[:, 1:, 1:] = mask.long().cumsum(1).cumsum(2)
        sat = sat.view(1, batch, -1).expand(10, batch, -1)
        r0, c0 = top.clamp(max=H), left.clamp(max=W)
        r1, c1 = (top + h).clamp(max=H), (left + w).clamp(max=W)

        def corner(r, c):
            return sat.gather(2, (r * (W + 1) + c).unsqueeze(-1)).squeeze(-1)

        inside = corner(r1, c1) - corner(r0, c1) - corner(r1, c0) + corner(r0, c0)
        new = h * w - inside                                                  # (10, B)
        ok = fits & (new > 0) & (new.to(torch.float64) <= remaining)
        first = torch.argmax(ok.to(torch.uint8), dim=0, keepdim=True)         # first acceptable try
        hit = active & ok.any(0)
        pick = lambda v: v.gather(0, first)[0].view(batch, 1, 1)  # noqa: E731
        t0, l0 = pick(top), pick(left)
        chosen = ((rows[0] >= t0) & (rows[0] < t0 + pick(h)) & (cols[0] >= l0) & (cols[0] < l0 + pick(w)))
        mask |= chosen & hit.view(-1, 1, 1)
        count += torch.where(hit, new.gather(0, first)[0], 0)
        active = hit & (count < target)
    mask = mask.flatten(1)
    tm = masks_from_bool(mask, num_keep)
    out = _out_device(generator, device)
    return TokenMasks(tm.ids_keep.to(out), tm.ids_restore.to(out), mask.to(out))


# ---------------------------------------------------------------------------------------
def inverse_block_mask(batch: int, grid_hw, mask_prob: float, *, mask_length: int = 3, mask_prob_adjust: float = 0.07,
                       num_masks: int = 1, generator: torch.Generator | None = None, device=None) -> TokenMasks:
    """data2vec 2.0 image masks: fairseq ``compute_block_mask_2d(..., inverse_mask=True)``.

    With keep probability ``p = 1 − mask_prob``: ``int(N·(p + mask_prob_adjust)/mask_length²)``
    centers drawn uniformly (with repeats), a ``mask_length × mask_length`` block around each
    (offset ``mask_length // 2``, clamped to the grid) is *kept*; then random kept tokens are
    dropped, or random other tokens kept, until exactly ``int(N·p)`` are kept. Every row
    therefore masks exactly ``N − int(N·p)`` tokens. ``ids_keep`` is ascending.
    """
    op = "masks.inverse_block_mask"
    _check_batch(op, batch, num_masks)
    H, W = _check_grid(op, grid_hw)
    check_range(op, "mask_prob", mask_prob, 0.0, 1.0)
    if not isinstance(mask_length, int) or mask_length < 2:
        fail(op, f"mask_length expected an int >= 2 (as fairseq asserts), got {mask_length!r}")
    N = H * W
    R = batch * num_masks
    gdev = _gen_device(generator, device)
    p = 1 - mask_prob
    n_centers = int(N * ((p + mask_prob_adjust) / mask_length ** 2))
    n_keep = int(N * p)

    keep = torch.zeros(R, N, dtype=torch.bool, device=gdev)
    if n_centers > 0:
        centers = torch.randint(0, N, (R, n_centers), generator=generator, device=gdev)
        cr, cc = centers // W, centers % W
        off = torch.arange(mask_length, device=gdev) - mask_length // 2
        rr = (cr.unsqueeze(-1) + off).clamp(0, H - 1)                     # (R, C, ml)
        cc2 = (cc.unsqueeze(-1) + off).clamp(0, W - 1)
        flat = (rr.unsqueeze(-1) * W + cc2.unsqueeze(-2)).reshape(R, -1)  # (R, C·ml²)
        keep.scatter_(1, flat, True)
    # exact count: drop a uniform random subset of the surplus, or keep a uniform random
    # subset of the rest (= torch.multinomial over the 0/1 weights, without replacement)
    # One random order with the kept tokens first: a surplus drops the first n − n_keep
    # of them, a deficit adds the first n_keep − n others, i.e. keep ranks [s, s + n_keep).
    n = keep.sum(1, keepdim=True)
    noise = torch.rand(R, N, generator=generator, device=gdev)
    rank = _ranks(torch.where(keep, noise, noise + 2.0))
    start = (n - n_keep).clamp(min=0)
    mask = ~((rank >= start) & (rank < start + n_keep))
    order, ids_restore = _kept_first_order(mask)
    out = _out_device(generator, device)
    ids_keep = order[:, :n_keep].contiguous()
    return TokenMasks(*(_split(t.to(out), batch, num_masks) for t in (ids_keep, ids_restore, mask)))


# ---------------------------------------------------------------------------------------
def _block_size(u: float, H: int, W: int, scale, aspect):
    # ijepa _sample_block_size: one uniform draw sets both the scale and the aspect ratio
    s = scale[0] + u * (scale[1] - scale[0])
    max_keep = int(H * W * s)
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(max_keep * ar)))
    w = int(round(math.sqrt(max_keep / ar)))
    return min(h, H - 1), min(w, W - 1)


def multiblock_masks(batch: int, grid_hw, *, num_targets: int = 4, target_scale=(0.15, 0.2),
                     target_aspect=(0.75, 1.5), num_context: int = 1, context_scale=(0.85, 1.0),
                     context_aspect=(1.0, 1.0), min_keep: int = 4, allow_overlap: bool = False,
                     generator: torch.Generator | None = None, device=None) -> MultiBlockMasks:
    """I-JEPA multi-block masks (ijepa ``src/masks/multiblock.py: MaskCollator``).

    One target block size and one context block size per batch (a single uniform draw
    sets scale and aspect, as ijepa does); per image ``num_targets`` target blocks at random
    positions (``top ~ randint(0, H − h)``); the context block minus the union of that
    image's targets (unless ``allow_overlap``), re-drawn until it keeps more than
    ``min_keep`` tokens — after 20 failed draws one more target stops being excluded
    (ijepa's ``tries``/``timeout``). Index sets are ascending and cut to the batch minimum.
    """
    op = "masks.multiblock_masks"
    _check_batch(op, batch, 1)
    H, W = _check_grid(op, grid_hw)
    if H < 2 or W < 2:
        fail(op, f"grid_hw expected at least (2, 2), got {(H, W)}")
    for name, v in (("num_targets", num_targets), ("num_context", num_context)):
        if not isinstance(v, int) or v < 1:
            fail(op, f"{name} expected a positive int, got {v!r}")
    gdev = _gen_device(generator, device)
    u = torch.rand(2, generator=generator, dtype=torch.float64, device=gdev).tolist()
    th, tw = _block_size(u[0], H, W, target_scale, target_aspect)
    ch, cw = _block_size(u[1], H, W, context_scale, context_aspect)
    if th * tw <= min_keep:
        fail(op, f"target blocks of {th}x{tw} cannot keep more than min_keep={min_keep} tokens")
    rows = torch.arange(H, device=gdev).view(1, 1, H, 1)
    cols = torch.arange(W, device=gdev).view(1, 1, 1, W)

    def boxes(n, h, w):
        top = torch.randint(0, H - h, (batch, n), generator=generator, device=gdev).view(batch, n, 1, 1)
        left = torch.randint(0, W - w, (batch, n), generator=generator, device=gdev).view(batch, n, 1, 1)
        return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, n, H, W)

    targets = boxes(num_targets, th, tw).flatten(2)                       # (B, T, N)
    context = torch.zeros(batch, num_context, H * W, dtype=torch.bool, device=gdev)
    for c in range(num_context):
        done = torch.zeros(batch, dtype=torch.bool, device=gdev)
        fails = torch.zeros(batch, dtype=torch.int64, device=gdev)
        while not bool(done.all()):
            cand = boxes(1, ch, cw).flatten(2)[:, 0]                       # (B, N)
            if not allow_overlap:
                # targets 0..T-1-tries stay excluded (tries = failed draws // 20)
                n_excl = (num_targets - fails // 20).clamp(min=0)
                excl = targets & (torch.arange(num_targets, device=gdev).view(1, -1, 1) < n_excl.view(-1, 1, 1))
                cand = cand & ~excl.any(1)
            ok = ~done & (cand.sum(1) > min_keep)
            context[:, c] = torch.where(ok.view(-1, 1), cand, context[:, c])
            fails = fails + (~done & ~ok).long()
            done = done | ok

    def cut(sets):  # (B, n, N) bool of kept → ascending indices cut to the batch minimum
        k = int(sets.sum(-1).min())
        return _kept_first_order(~sets)[0][..., :k].contiguous()

    out = _out_device(generator, device)
    return MultiBlockMasks(cut(context).to(out), cut(targets).to(out))


def simmim_mask(batch: int, grid: int, scale: int, ratio: float, *, generator: torch.Generator) -> torch.Tensor:
    """SimMIM ``MaskGenerator``: (batch, (grid·scale)²) bool token mask, True = masked.
    ``ceil(ratio·grid²)`` of the grid² mask patches masked at random per image, each one
    covering scale×scale tokens (row-major). The signature of a ``ctx.per_sample`` draw."""
    n = grid * grid
    keep = n - math.ceil(ratio * n)
    m = random_mask(batch, n, 1 - keep / n - 1e-9, generator=generator, device=generator.device).mask
    m = m.view(batch, grid, 1, grid, 1).expand(batch, grid, scale, grid, scale)
    return m.reshape(batch, n * scale * scale)


# ---------------------------------------------------------------------------------------
# Context-encoder regions: R (predicted, (B, 1, H, W) bool) and the hole (filled) = R shrunk by `overlap`
# ---------------------------------------------------------------------------------------
def center_region(batch: int, size: int, overlap: int, device=None):
    """train.lua: R = the centre square of side size/2; the hole = R less an `overlap` border."""
    r = torch.zeros(batch, 1, size, size, dtype=torch.bool, device=device)
    q = size // 4
    r[:, :, q:q + size // 2, q:q + size // 2] = True
    return r, shrink(r, overlap)


def random_region(batch: int, size: int, overlap: int, *, generator: torch.Generator, area=(0.2, 0.3),
                  cells: int = 4):
    """Random blobs: uniform noise on a cells x cells grid upsampled (bilinear) to the image, kept above
    the per-image quantile that leaves a fraction U(area) of the pixels (``ctx.per_sample`` calls it
    for the global batch)."""
    dev = generator.device
    noise = torch.rand(batch, 1, cells, cells, generator=generator, device=dev)
    frac = area[0] + (area[1] - area[0]) * torch.rand(batch, generator=generator, device=dev)
    field = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False).flatten(1)
    k = (frac * size * size).round().long().clamp(1, size * size)
    thresh = field.sort(1, descending=True).values.gather(1, (k - 1)[:, None])
    r = (field >= thresh).view(batch, 1, size, size)
    return r, shrink(r, overlap)


def shrink(region: torch.Tensor, overlap: int) -> torch.Tensor:
    """Pixels of the region whose (2·overlap + 1)² neighbourhood lies inside it (binary erosion; beyond
    the image border counts as inside, so a region at the border keeps its hole up to the border)."""
    if overlap == 0:
        return region.clone()
    outside = (~region).float()
    return ~(F.max_pool2d(outside, 2 * overlap + 1, stride=1, padding=overlap) > 0) & region
