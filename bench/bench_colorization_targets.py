"""Colorization targets: B = 64 RGB images 224x224, ab sampled at stride 4 (56x56), 10 of 313 bins.

Providers, timed round-robin in one run (the VM drifts over minutes):
  sslkern           sslkern.colorization_targets (C++ on CPU, Triton on GPU): ids, weights, rebalance, grey mask
  reference         sslkern.reference.colorization_targets (eager: Lab of the sampled pixels, distances
                    to all 313 bins, a stable sort)
  training_layers   the port of richzhang/colorization's training layers (tests/_colorization_ref.py):
                    skimage-style rgb2lab of the whole image (float64), ab sampled at stride 4, NNEncode
                    (sklearn NearestNeighbors, ball tree) into the dense (B, 313, 56, 56) float64 encoding,
                    PriorBoost (argmax) and NonGrayMask: the code the op replaces
  compiled          torch.compile of the reference (SSLKERN_BENCH_FULL=1 only: its compile takes minutes here)

Memory: the sparse targets (int16 ids + fp32 weights, (B, 56, 56, 10)) against the dense fp32
(B, 313, 56, 56) encoding, and with the per-pixel rebalancing weight (fp32 on both sides):
``test_colorization_targets_memory`` prints both ratios (bar: <= 5 %).
"""
import os
import sys

import numpy as np
import pytest
import torch

import sslkern
from harness import measure_interleaved
from sslkern.ops.colorization_targets import ab_bins

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _colorization_ref import TrainingLayers  # noqa: E402

B, S, STRIDE = 64, 224, 4
FULL = os.environ.get("SSLKERN_BENCH_FULL") == "1"
_data = {}


def data():
    if not _data:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator().manual_seed(0)
        # smooth random colour images (pixels of natural-like structure, not white noise)
        low = torch.rand(B, 3, S // 16, S // 16, generator=g)
        x = torch.nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
        _data["x"] = x.clamp(0, 1).to(dev)
        prior = torch.rand(313, generator=g, dtype=torch.float64) + 0.05
        prior = prior / prior.sum()
        _data["prior"] = prior
        _data["factor"] = sslkern.rebalance_factor(prior).to(dev)
        _data["layers"] = TrainingLayers(ab_bins().double().numpy(), prior.numpy(), stride=STRIDE)
        _data["x_np"] = x.double().numpy()
    return _data


def fns(full=False):
    d = data()
    x, f = d["x"], d["factor"]
    out = {
        "sslkern": lambda: sslkern.colorization_targets(x, f, stride=STRIDE),
        "reference": lambda: sslkern.reference.colorization_targets(x, f, STRIDE),
        "training_layers": lambda: d["layers"](d["x_np"]),
    }
    if full:
        comp = torch.compile(sslkern.reference.colorization_targets)
        out["compiled"] = lambda: comp(x, f, STRIDE)
    return out


def test_colorization_targets_b64_224(benchmark):
    times = measure_interleaved(benchmark, op="colorization_targets",
                                case=f"B={B} {S}x{S} RGB fp32 stride {STRIDE} K=10 of 313 bins", fns=fns(FULL), rounds=10)
    if times:
        print("\n  " + ", ".join(f"{k} {1e3 * v:.1f} ms ({v / times['sslkern']:.1f}x)" for k, v in times.items()))


def test_colorization_targets_memory():
    d = data()
    t = sslkern.colorization_targets(d["x"], d["factor"], stride=STRIDE)
    h = S // STRIDE
    sparse = t.bin_ids.numel() * t.bin_ids.element_size() + t.weights.numel() * t.weights.element_size()
    dense = B * 313 * h * h * 4                                    # fp32 (B, 313, h, w), as the Caffe blob
    per_pixel = t.rebalance.numel() * 4
    gt, boost, _ = d["layers"](d["x_np"][:2])                      # the port's own arrays (2 images)
    port_bytes_per_image = (gt.nbytes + boost.nbytes) / 2
    ratio, ratio_with = sparse / dense, (sparse + per_pixel) / (dense + per_pixel)
    print(f"\n  sparse {sparse / 2**20:.1f} MiB vs dense fp32 {dense / 2**20:.1f} MiB: {100 * ratio:.2f} %; "
          f"with the rebalancing weight on both sides {100 * ratio_with:.2f} %; the port's float64 arrays "
          f"{B * port_bytes_per_image / 2**20:.1f} MiB ({100 * (sparse + per_pixel) / (B * port_bytes_per_image):.2f} %)")
    assert ratio <= 0.05
    np.testing.assert_allclose(ratio, (10 * 2 + 10 * 4) / (313 * 4))


@pytest.mark.skipif(not FULL, reason="SSLKERN_BENCH_FULL=1")
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_colorization_targets_b64_224_half(benchmark, dtype):
    d = data()
    x = d["x"].to(dtype)
    measure_interleaved(benchmark, op="colorization_targets",
                        case=f"B={B} {S}x{S} RGB bf16 stride {STRIDE} K=10 of 313 bins",
                        fns={"sslkern": lambda: sslkern.colorization_targets(x, d["factor"], stride=STRIDE),
                             "reference": lambda: sslkern.reference.colorization_targets(x, d["factor"], STRIDE)},
                        rounds=10)
