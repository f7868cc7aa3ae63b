"""MaskFeat HOG targets: B = 64 RGB images 224x224, patch 16, cells of 8, 9 bins.

Cases: every patch (B, 196, 108), and the masked patches only (40 %: 78 ids per image, the
MaskFeat ratio; SlowFast computes the whole map and selects ``[mask]``). fp32 images, and a bf16
case (bf16 images in, fp32 targets out; HOGLayerC accepts fp32 only, so its provider upcasts
the images inside the timed call, as a user of that code must).

Providers:
  sslkern    sslkern.hog_targets (C++ on CPU, Triton on GPU)
  reference  sslkern.reference.hog_targets (eager: slicing Sobel, one scatter_add_ into the
             cell histograms, normalize, permute)
  compiled   torch.compile of the reference
  hoglayerc  an eager port of SlowFast HOGLayerC + MaskMViT._get_hog_label_2d
             (tests/_slowfast_hog.py): the code the op replaces
Default run: every patch in fp32 against the reference and HOGLayerC; SSLKERN_BENCH_FULL=1 adds
torch.compile, the masked ids and bf16.
"""
import os
import sys

import pytest
import torch

import sslkern
from harness import full_sweep_only, measure, sweep

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _slowfast_hog import HOGLayerC, maskfeat_hog_labels  # noqa: E402

B, C, S, P, POOL, RATIO = 64, 3, 224, 16, 8, 0.4
_data = {}


def data():
    if not _data:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator().manual_seed(0)
        _data["x"] = torch.randn(B, C, S, S, generator=g).to(dev)
        n = (S // P) ** 2
        ids = torch.rand(B, n, generator=g).argsort(1)[:, :int(n * RATIO)].sort(1).values
        _data["ids"] = ids.to(dev)
        _data["mask"] = torch.zeros(B, n, dtype=torch.bool).scatter_(1, ids, True).to(dev)
        _data["hog"] = HOGLayerC(nbins=9, pool=POOL).to(dev)
        _data["x_bf16"] = _data["x"].bfloat16()
    return _data


_compiled = {}


def make_fn(provider, masked, bf16=False):
    d = data()
    x, ids, mask = d["x_bf16" if bf16 else "x"], d["ids"] if masked else None, d["mask"] if masked else None
    if provider == "sslkern":
        return lambda: sslkern.hog_targets(x, P, pool=POOL, ids=ids)
    if provider == "reference":
        return lambda: sslkern.reference.hog_targets(x, P, POOL, 9, 0, ids)
    if provider == "compiled":
        fn = _compiled.setdefault("fn", torch.compile(sslkern.reference.hog_targets))
        return lambda: fn(x, P, POOL, 9, 0, ids)
    if provider == "hoglayerc":
        return lambda: maskfeat_hog_labels(d["hog"], x.float(), S // P, mask)
    raise ValueError(provider)


@pytest.mark.parametrize("provider", sweep(["sslkern", "reference", "compiled", "hoglayerc"], ["sslkern", "reference",
                                                                                           "hoglayerc"]))
@pytest.mark.parametrize("masked", sweep([False, True], [False]), ids=["all", "masked40"])
def test_hog_targets_b64_224(benchmark, provider, masked):
    n = (S // P) ** 2
    rows = int(n * RATIO) if masked else n
    # fewest bytes: read the image once (all patches; the masked share with a 1-pixel halo
    # for ids), write the fp32 targets.
    read = 4 * B * C * S * S * (RATIO * ((P + 2) / P) ** 2 if masked else 1.0)
    bytes_moved = read + 4 * B * rows * C * 4 * 9
    case = f"B={B} {S}x{S} RGB patch {P} cells {POOL} 9 bins " + ("masked 40% ids" if masked else "all patches")
    measure(benchmark, op="hog_targets", case=case, provider=provider, fn=make_fn(provider, masked),
            bytes_moved=bytes_moved, target={"hoglayerc": 3.0}.get(provider), rounds=3, warmup=2)


@full_sweep_only
@pytest.mark.parametrize("provider", ["sslkern", "reference", "hoglayerc"])
def test_hog_targets_b64_224_bf16(benchmark, provider):
    n = (S // P) ** 2
    bytes_moved = 2 * B * C * S * S + 4 * B * n * C * 4 * 9
    case = f"B={B} {S}x{S} RGB patch {P} cells {POOL} 9 bins all patches, bf16 images"
    measure(benchmark, op="hog_targets", case=case, provider=provider, fn=make_fn(provider, False, bf16=True),
            bytes_moved=bytes_moved, target={"hoglayerc": 3.0}.get(provider), rounds=3, warmup=2)
