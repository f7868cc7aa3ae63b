"""sslkern.train.tokenizer: the k-means patch tokenizer (BEiT recipe's stand-in for DALL-E's dVAE)."""
import math

import pytest
import torch

from sslkern.train.tokenizer import PatchKMeansTokenizer, patchify, perplexity


def _blobs(k=5, per=40, p=2, c=1, seed=0):
    """Images whose every patch is one of k well-separated constant-ish patterns plus small noise."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, p * p * c, generator=g) * 5
    ids = torch.randint(k, (per, 16), generator=g)  # 16 patches per image (4x4 grid)
    patches = centers[ids] + 0.01 * torch.randn(per, 16, p * p * c, generator=g)
    # patches → images (inverse of patchify)
    img = patches.reshape(per, 4, 4, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(per, c, 4 * p, 4 * p)
    return img, ids, centers


def test_patchify_order_is_row_major_pixels_row_col_channel():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 = rows 0-1, cols 2-3; first pixel (0, 2) channels 0, 1, 2
    assert p[0, 1, :3].tolist() == [x[0, 0, 0, 2], x[0, 1, 0, 2], x[0, 2, 0, 2]]
    assert p[1, 2, 3:6].tolist() == [x[1, 0, 2, 1], x[1, 1, 2, 1], x[1, 2, 2, 1]]
    with pytest.raises(ValueError, match="multiple of patch_size 3"):
        patchify(x, 3)


def test_fit_recovers_separated_clusters_and_tokens_are_nearest_centroid():
    img, ids, centers = _blobs()
    tok = PatchKMeansTokenizer(5, 2, 1)
    info = tok.fit(img, torch.Generator().manual_seed(0))
    assert info["patches"] == 40 * 16 and info["inertia"] < 1e-3
    got = tok(img)
    assert got.shape == ids.shape and got.dtype == torch.int64
    # same partition as the true ids (up to relabelling)
    mapping = {}
    for t, g in zip(ids.flatten().tolist(), got.flatten().tolist()):
        assert mapping.setdefault(t, g) == g
    assert len(set(mapping.values())) == 5
    # every token is the brute-force nearest centroid of its patch
    x = torch.randn(3, 1, 8, 8)
    ref = torch.cdist(patchify(x, 2).reshape(-1, 4), tok.codebook).argmin(1).reshape(3, 16)
    assert torch.equal(tok(x), ref)


def test_fit_is_deterministic_per_seed():
    img = torch.randn(30, 1, 8, 8)
    a, b, c = (PatchKMeansTokenizer(8, 4, 1) for _ in range(3))
    a.fit(img, torch.Generator().manual_seed(3))
    b.fit(img, torch.Generator().manual_seed(3))
    c.fit(img, torch.Generator().manual_seed(4))
    assert torch.equal(a.codebook, b.codebook) and not torch.equal(a.codebook, c.codebook)


def test_fewer_distinct_patches_than_codes_and_too_few_patches():
    img = torch.zeros(4, 1, 8, 8)
    img[:2] = 1.0  # two distinct patch values for 6 codes: seeding repeats points, empty clusters keep centroids
    tok = PatchKMeansTokenizer(6, 4, 1)
    info = tok.fit(img, torch.Generator().manual_seed(0))
    assert info["inertia"] == 0.0 and torch.isfinite(tok.codebook).all()
    assert info["perplexity"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="16 patches for 32 codes"):
        PatchKMeansTokenizer(32, 4, 1).fit(img, torch.Generator())


def test_perplexity():
    assert perplexity(torch.arange(8), 8) == pytest.approx(8.0)
    assert perplexity(torch.zeros(10, dtype=torch.long), 8) == pytest.approx(1.0)
    assert perplexity(torch.tensor([0, 0, 1, 1]), 4) == pytest.approx(2.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert perplexity(torch.tensor([0, 0, 1, 2]), 3) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_save_load_round_trip_and_errors(tmp_path):
    tok = PatchKMeansTokenizer(4, 2, 3)
    tok.fit(torch.randn(5, 3, 4, 4), torch.Generator().manual_seed(0))
    path = str(tmp_path / "tok.safetensors")
    tok.save(path, dataset="x", seed=0)
    back, meta = PatchKMeansTokenizer.load(path)
    assert torch.equal(back.codebook, tok.codebook) and back.settings == tok.settings
    assert meta["dataset"] == "x" and meta["num_codes"] == 4
    img = torch.randn(2, 3, 6, 6)
    assert torch.equal(back(img), tok(img))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PatchKMeansTokenizer.load(str(tmp_path / "missing.safetensors"))
    from sslkern.train import checkpoint as ckpt
    ckpt.save_tensors(str(tmp_path / "other.safetensors"), {"w": torch.zeros(2)}, {})
    with pytest.raises(ValueError, match="not a PatchKMeansTokenizer file"):
        PatchKMeansTokenizer.load(str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"images expected \(B, 3, H, W\)"):
        tok(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="num_codes expected >= 2"):
        PatchKMeansTokenizer(1, 2, 1)


def test_patch_windows_context_is_the_zero_padded_neighbourhood():
    from sslkern.train.tokenizer import patch_windows
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 9, generator=g)  # 2x3 grid of 3x3 patches
    assert torch.equal(patch_windows(x, 3, 0), patchify(x, 3))
    w = patch_windows(x, 3, 1)
    assert w.shape == (2, 6, 3 * 9 * 9)
    pad = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for n in range(6):
        r, c = divmod(n, 3)
        ref = pad[:, :, 3 * r:3 * r + 9, 3 * c:3 * c + 9].reshape(2, -1)  # window centred on patch n
        assert torch.equal(w[:, n], ref)
    with pytest.raises(ValueError, match="context expected >= 0"):
        patch_windows(x, 3, -1)
    with pytest.raises(ValueError, match="multiple of patch_size 4"):
        patch_windows(x, 4, 1)


def test_context_tokenizer_fits_saves_and_loads(tmp_path):
    img, _, _ = _blobs(k=5, per=40, p=2)
    tok = PatchKMeansTokenizer(6, 2, 1, context=1)
    assert tok.codebook.shape == (6, 36) and tok.settings["context"] == 1
    info = tok.fit(img, torch.Generator().manual_seed(0), iters=10)
    ids = tok(img)
    assert ids.shape == (40, 16) and int(ids.max()) < 6 and info["perplexity"] > 1
    path = str(tmp_path / "tok.safetensors")
    tok.save(path)
    back, meta = PatchKMeansTokenizer.load(path)
    assert back.settings == tok.settings and torch.equal(back(img), ids)
    with pytest.raises(ValueError, match="context expected >= 0"):
        PatchKMeansTokenizer(6, 2, 1, context=-1)
