"""sslkern.masks: exact counts, index consistency, and the same distributions as
straightforward ports of the reference loops (sslkern/reference/masks.py)."""
import math
import random

import pytest
import torch

from sslkern import masks
from sslkern.reference import masks as ref


def gen(seed):
    return torch.Generator().manual_seed(seed)


def check_index_sets(tm, n_tokens):
    """ids_keep / ids_restore / mask describe one permutation (rows flattened over M)."""
    ids_keep = tm.ids_keep.reshape(-1, tm.ids_keep.shape[-1])
    ids_restore = tm.ids_restore.reshape(-1, n_tokens)
    mask = tm.mask.reshape(-1, n_tokens)
    Nk = ids_keep.shape[1]
    assert ids_keep.dtype == torch.int64 and ids_restore.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(ids_restore.sort(1).values, torch.arange(n_tokens).expand_as(ids_restore))
    assert torch.equal(ids_restore.gather(1, ids_keep), torch.arange(Nk).expand_as(ids_keep))
    assert not mask.gather(1, ids_keep).any()  # kept tokens are never marked removed


def adjacency(mask_rows, H, W):
    """Mean number of horizontally + vertically adjacent True pairs per row (block-ness)."""
    m = mask_rows.reshape(-1, H, W).float()
    return ((m[:, :, 1:] * m[:, :, :-1]).sum((1, 2)) + (m[:, 1:] * m[:, :-1]).sum((1, 2)))


def span(mask_rows, H, W):
    """Rows touched + columns touched per image (larger for elongated or scattered blocks)."""
    m = mask_rows.reshape(-1, H, W)
    return m.any(2).sum(1) + m.any(1).sum(1)


def elongation(mask_rows, H, W):
    """|rows touched − columns touched| per image (sensitive to the aspect-ratio range)."""
    m = mask_rows.reshape(-1, H, W)
    return (m.any(2).sum(1) - m.any(1).sum(1)).abs()


def assert_same_mean(a, b, n_se=5.0):
    a, b = a.double(), b.double()
    se = math.sqrt(a.var() / a.numel() + b.var() / b.numel()) + 1e-12
    assert abs(a.mean() - b.mean()) < n_se * se, (a.mean().item(), b.mean().item(), se)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,ratio,M", [(196, 0.75, 1), (49, 0.6, 4), (37, 0.5, 1), (10, 0.0, 2)])
def test_random_mask_counts_and_consistency(N, ratio, M):
    B = 5
    tm = masks.random_mask(B, N, ratio, num_masks=M, generator=gen(0))
    Nk = int(N * (1 - ratio))
    lead = (B, M) if M > 1 else (B,)
    assert tm.ids_keep.shape == lead + (Nk,) and tm.ids_restore.shape == lead + (N,) and tm.mask.shape == lead + (N,)
    assert (tm.mask.sum(-1) == N - Nk).all()
    assert torch.equal(tm.mask, tm.ids_restore >= Nk)
    check_index_sets(tm, N)


def test_random_mask_seeded_and_uniform():
    a = masks.random_mask(4, 49, 0.75, generator=gen(3))
    b = masks.random_mask(4, 49, 0.75, generator=gen(3))
    assert torch.equal(a.ids_keep, b.ids_keep)
    clones = masks.random_mask(2, 49, 0.75, num_masks=8, generator=gen(4))
    assert len({tuple(r.tolist()) for r in clones.mask.reshape(16, -1)}) == 16  # every clone differs
    # every position kept with probability 1/4: 4000 rows, binomial se = 0.0068
    freq = (~masks.random_mask(4000, 49, 0.75, generator=gen(5)).mask).float().mean(0)
    assert (freq - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / 4000)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,mask_prob,ml,M", [((14, 14), 0.8, 3, 1), ((8, 8), 0.5, 2, 3), ((6, 10), 0.65, 3, 2),
                                                 ((14, 14), 0.0, 3, 1)])
def test_inverse_block_mask_exact_count(grid, mask_prob, ml, M):
    H, W = grid
    N = H * W
    tm = masks.inverse_block_mask(17, grid, mask_prob, mask_length=ml, num_masks=M, generator=gen(1))
    n_keep = int(N * (1 - mask_prob))
    assert tm.ids_keep.shape[-1] == n_keep
    assert (tm.mask.sum(-1) == N - n_keep).all()
    assert (tm.ids_keep.diff(dim=-1) > 0).all()  # ascending
    check_index_sets(tm, N)


def test_inverse_block_mask_matches_fairseq_distribution():
    H = W = 14
    mine = masks.inverse_block_mask(3000, (H, W), 0.8, generator=gen(2)).mask
    theirs = ref.fairseq_inverse_block_mask(3000, H, W, 0.8, generator=gen(9))
    assert (theirs.sum(1) == mine.sum(1)).all()  # same exact count as the reference
    # same block structure: adjacent kept pairs per image, and per-position keep frequency
    assert_same_mean(adjacency(~mine, H, W), adjacency(~theirs, H, W))  # tells mask_length 2 from 3
    assert_same_mean(span(~mine, H, W), span(~theirs, H, W))
    f_mine, f_theirs = (~mine).float().mean(0), (~theirs).float().mean(0)
    assert (f_mine - f_theirs).abs().max() < 0.05  # se of a difference ~0.011
    # borders are kept more often than the centre (clamped blocks): both agree on it
    assert_same_mean((~mine).reshape(-1, H, W)[:, 0, 0].float(), (~theirs).reshape(-1, H, W)[:, 0, 0].float())


# ---------------------------------------------------------------------------------------
def test_block_mask_matches_dinov2_distribution():
    H = W = 14
    B = 3000
    mine = masks.block_mask(B, (H, W), (0.1, 0.5), generator=gen(3))
    theirs = ref.dinov2_block_mask(random.Random(11), B, H, W, (0.1, 0.5))
    assert_same_mean(mine.mask.sum(1), theirs.sum(1))
    assert_same_mean(mine.mask.sum(1).float().square(), theirs.sum(1).float().square())  # spread
    assert_same_mean(adjacency(mine.mask, H, W), adjacency(theirs, H, W))
    # block shapes: these two statistics tell min_aspect 0.15 / 0.5 and min_num_patches 8
    # apart from the defaults at this sample size (checked when the test was written)
    assert_same_mean(span(mine.mask, H, W), span(theirs, H, W))
    assert_same_mean(elongation(mine.mask, H, W), elongation(theirs, H, W))
    # at most the largest target int(N * 0.5) is masked; never more (dinov2 stops at the target)
    assert mine.mask.sum(1).max() <= int(H * W * 0.5)
    check_index_sets(mine, H * W)


def test_block_mask_probability_and_fixed_ratio():
    H = W = 8
    tm = masks.block_mask(40, (H, W), 0.3, mask_probability=0.5, generator=gen(4))
    n_masked_images = (tm.mask.sum(1) > 0).sum()
    assert n_masked_images <= 20 and n_masked_images >= 15  # 20 targeted; a block can fail 10 tries
    assert tm.mask.sum(1).max() <= int(64 * 0.3)
    theirs = ref.dinov2_block_mask(random.Random(0), 2000, H, W, (0.3, 0.3))
    mine = masks.block_mask(2000, (H, W), 0.3, generator=gen(5)).mask
    assert_same_mean(mine.sum(1), theirs.sum(1))
    # ids_keep is cut to the batch minimum; kept slots beyond the cut get ranks >= Nk
    Nk = tm.ids_keep.shape[1]
    assert Nk == int((~tm.mask).sum(1).min())
    check_index_sets(masks.TokenMasks(tm.ids_keep, tm.ids_restore, tm.ids_restore >= Nk), H * W)


# ---------------------------------------------------------------------------------------
def test_multiblock_shapes_rectangles_and_disjoint():
    H = W = 14
    mb = masks.multiblock_masks(64, (H, W), generator=gen(6))
    B, T, Kt = mb.targets.shape
    assert (B, T) == (64, 4) and mb.context.shape[:2] == (64, 1)
    assert (mb.targets.diff(dim=-1) > 0).all() and (mb.context.diff(dim=-1) > 0).all()
    # every target is a full rectangle of one size (the size is drawn once per batch)
    r, c = mb.targets // W, mb.targets % W
    h = r.amax(-1) - r.amin(-1) + 1
    w = c.amax(-1) - c.amin(-1) + 1
    assert (h * w == Kt).all() and (h == h[0, 0]).all()
    assert 0.15 * H * W - 2 * max(H, W) <= Kt <= 0.2 * H * W + 1
    # the context avoids the image's targets (no timeouts at these scales)
    for b in range(B):
        assert not set(mb.context[b, 0].tolist()) & set(mb.targets[b].flatten().tolist())
    enc, pred = mb.as_lists()
    assert len(enc) == 1 and len(pred) == 4 and pred[0].shape == (64, Kt)


def test_multiblock_matches_ijepa_distribution():
    H = W = 14
    mine_kt, theirs_kt, mine_kc, theirs_kc = [], [], [], []
    g1, g2 = gen(7), gen(8)
    for _ in range(60):
        mb = masks.multiblock_masks(8, (H, W), generator=g1)
        c, t = ref.ijepa_multiblock(8, H, W, generator=g2)
        mine_kt.append(mb.targets.shape[-1]); theirs_kt.append(t.shape[-1])
        mine_kc.append(mb.context.shape[-1]); theirs_kc.append(c.shape[-1])
    assert_same_mean(torch.tensor(mine_kt), torch.tensor(theirs_kt))
    assert_same_mean(torch.tensor(mine_kc), torch.tensor(theirs_kc))


@pytest.mark.parametrize("call,match", [
    (lambda: masks.random_mask(2, 10, 1.0), "mask_ratio must be in"),
    (lambda: masks.random_mask(2, 0, 0.5), "num_tokens expected a positive int"),
    (lambda: masks.random_mask(2, 10, 0.5, num_masks=0), "num_masks expected a positive int"),
    (lambda: masks.inverse_block_mask(2, (4, 4), 0.5, mask_length=1), "mask_length expected an int >= 2"),
    (lambda: masks.inverse_block_mask(2, (4, 0), 0.5), "grid_hw expected"),
    (lambda: masks.block_mask(2, (4, 4), (0.5, 0.2)), "mask_ratio must be in"),
    (lambda: masks.multiblock_masks(2, (1, 4)), "grid_hw expected at least"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
