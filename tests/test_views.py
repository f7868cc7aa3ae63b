"""sslkern.views: view parameters drawn from caller-given uniforms vs torchvision's samplers.

The crop sampler is checked against ``torchvision.transforms.RandomResizedCrop.get_params``
by two-sample Kolmogorov–Smirnov tests on the crop's area fraction, aspect and position (a
square image, where the first try almost always fits, and a wide one, where the central
fallback crop carries much of the mass), each with a perturbed sampler that the same test must
reject, so a pass is not vacuous. Seeds are fixed (conftest), so the p-values are too.
"""
import math

import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from sslkern import ArgumentError
from sslkern.views import (NUM_UNIFORMS, ViewParams, ViewSpec, dino_multicrop, draw_view_params, single_view,
                           two_views)

N = 4000


def ours(spec, H, W, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, spec.num_uniforms, generator=g, dtype=torch.float64)
    hw = torch.tensor([[H, W]])
    return draw_view_params(spec, hw, u, torch.zeros(n, dtype=torch.long))


def torchvision_boxes(H, W, scale, ratio, n=N):
    img = torch.empty(1, H, W)
    return torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)],
                        dtype=torch.float64)  # (n, 4) top, left, h, w


def stats(box, H, W):
    top, left, h, w = box.double().unbind(1)
    return {"area": h * w / (H * W), "aspect": w / h, "top": top / max(H - 1, 1), "left": left / max(W - 1, 1)}


@pytest.mark.parametrize("H,W", [(64, 64), (24, 200)], ids=["square", "wide"])
def test_crop_distribution_matches_torchvision(H, W):
    spec = ViewSpec(32)
    mine = stats(ours(spec, H, W).box, H, W)
    theirs = stats(torchvision_boxes(H, W, spec.scale, spec.ratio), H, W)
    for key in mine:
        p = ks_2samp(mine[key].numpy(), theirs[key].numpy()).pvalue
        assert p > 1e-3, f"{key}: KS p = {p:.2e}"
    # not vacuous: the same test rejects a sampler with a slightly different range
    wrong = ViewSpec(32, scale=(0.15, 1.0)) if H == W else ViewSpec(32, ratio=(2 / 3, 3 / 2))
    bad = stats(ours(wrong, H, W).box, H, W)
    key = "area" if H == W else "aspect"
    assert ks_2samp(bad[key].numpy(), theirs[key].numpy()).pvalue < 1e-3


def test_wide_image_uses_the_fallback_like_torchvision():
    """On a 24x200 image most tries do not fit: the central 24x32 crop (aspect 4/3, the range's
    top) is taken as often as torchvision takes it."""
    H, W = 24, 200
    spec = ViewSpec(32)
    fallback = torch.tensor([0.0, 84.0, 24.0, 32.0], dtype=torch.float64)
    mine = (ours(spec, H, W).box.double() == fallback).all(1).double().mean()
    theirs = (torchvision_boxes(H, W, spec.scale, spec.ratio) == fallback).all(1).double().mean()
    assert 0.05 < float(theirs) < 0.95
    assert abs(float(mine - theirs)) < 4 * math.sqrt(float(theirs) * (1 - float(theirs)) / N) * math.sqrt(2)


def test_boxes_inside_the_image_and_integer():
    for H, W in [(1, 1), (1, 37), (197, 50), (37, 5), (400, 350)]:
        p = ours(ViewSpec(16, scale=(0.01, 1.0), ratio=(0.2, 5.0)), H, W, n=500)
        top, left, h, w = p.box.unbind(1)
        assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + h <= H).all() and (left + w <= W).all()
        assert torch.equal(p.box, p.box.round())


def test_continuous_boxes():
    """integer_boxes=False: unrounded sub-pixel boxes inside the image; on a large image their
    area distribution matches torchvision's (rounding is negligible there)."""
    H, W = 8, 8
    p = ours(ViewSpec(16, scale=(0.1, 0.3), integer_boxes=False), H, W, n=500)
    top, left, h, w = p.box.double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H + 1e-5).all() and (left + w <= W + 1e-5).all()
    assert not torch.equal(p.box, p.box.round())
    area = h * w / (H * W)
    assert area.min() >= 0.1 - 1e-5 and area.max() <= 0.3 + 1e-5
    H, W = 400, 350
    spec = ViewSpec(16, integer_boxes=False)
    mine = stats(ours(spec, H, W).box, H, W)["area"]
    theirs = stats(torchvision_boxes(H, W, spec.scale, spec.ratio), H, W)["area"]
    assert ks_2samp(mine.numpy(), theirs.numpy()).pvalue > 1e-3


def test_event_rates_and_ranges():
    spec = ViewSpec(16, degrees=10.0, flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.3, saturation=0.2, hue=0.1,
                    gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.2)
    p = ours(spec, 50, 60, n=N)

    def rate_ok(events, prob):
        sd = math.sqrt(prob * (1 - prob) / N)
        return abs(float(events.double().mean()) - prob) < 4 * sd

    jittered = (p.jitter != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1)
    assert rate_ok(p.flip, 0.5) and rate_ok(jittered, 0.8) and rate_ok(p.gray, 0.2)
    assert rate_ok(p.blur_sigma > 0, 0.5) and rate_ok(p.solarize, 0.2)
    j = p.jitter[jittered]
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        assert j[:, k].min() >= lo - 1e-6 and j[:, k].max() <= hi + 1e-6
        assert j[:, k].min() < lo + 0.01 and j[:, k].max() > hi - 0.01      # the whole range is used
    assert torch.equal(p.jitter[~jittered], torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(int((~jittered).sum()), 4))
    sig = p.blur_sigma[p.blur_sigma > 0]
    assert sig.min() >= 0.1 - 1e-6 and sig.max() <= 2.0 + 1e-6 and sig.min() < 0.15 and sig.max() > 1.95
    assert p.angle.abs().max() <= math.radians(10) + 1e-6 and p.angle.abs().max() > math.radians(9.9)
    orders = {tuple(o) for o in p.jitter_order.tolist()}
    assert len(orders) == 24 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    # no jitter / probability 0: identity parameters
    q = ours(ViewSpec(16), 50, 60, n=200)
    assert not q.flip.any() and not q.gray.any() and not q.solarize.any() and (q.blur_sigma == 0).all()
    assert (q.angle == 0).all() and not q.angle.signbit().any()
    assert torch.equal(q.jitter, torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(200, 4))


def test_pure_and_row_independent():
    """Same (spec, hw, u) → same params; any subset of rows gives those rows' params (the loop
    slices a rank's rows of the global batch's uniforms)."""
    spec = dino_multicrop()[1]
    hw = torch.tensor([[400, 350], [120, 500], [37, 197], [1, 1]])
    u = torch.rand(4, spec.num_uniforms, dtype=torch.float64)
    a, b = draw_view_params(spec, hw, u), draw_view_params(spec, hw, u)
    for f in ("src", "box", "angle", "flip", "jitter", "jitter_order", "gray", "blur_sigma", "solarize"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    part = draw_view_params(spec, hw[2:], u[2:])
    full = a.select(slice(2, 4))
    for f in ("box", "jitter", "jitter_order", "blur_sigma"):
        assert torch.equal(getattr(part, f), getattr(full, f))
    assert a.src.dtype == torch.int64 and a.box.dtype == torch.float32 and a.flip.dtype == torch.bool
    assert a.jitter_order.dtype == torch.int64 and a.blur_sigma.dtype == torch.float32


def test_view_params_cat_and_to():
    spec = ViewSpec(8, flip_p=0.5)
    hw = torch.tensor([[10, 12], [20, 9]])
    a = draw_view_params(spec, hw, torch.rand(2, NUM_UNIFORMS, dtype=torch.float64))
    b = draw_view_params(spec, hw, torch.rand(3, NUM_UNIFORMS, dtype=torch.float64), src=torch.tensor([1, 1, 0]))
    c = ViewParams.cat([a, b])
    assert len(c) == 5 and torch.equal(c.src, torch.tensor([0, 1, 1, 1, 0])) and torch.equal(c.box[2:], b.box)
    d = c.to("cpu")
    assert torch.equal(d.box, c.box)
    with pytest.raises(ArgumentError, match="parts expected a non-empty list"):
        ViewParams.cat([])


def test_named_pipelines():
    specs = dino_multicrop()
    assert len(specs) == 12 and [s.size for s in specs] == [224, 224] + [96] * 10
    assert [s.blur_p for s in specs[:3]] == [1.0, 0.1, 0.5] and [s.solarize_p for s in specs[:3]] == [0.0, 0.2, 0.0]
    assert all(s.flip_p == 0.5 and s.jitter_p == 0.8 and s.gray_p == 0.2 for s in specs)
    assert specs[0].scale == (0.4, 1.0) and specs[2].scale == (0.05, 0.4)
    assert (specs[0].brightness, specs[0].contrast, specs[0].saturation, specs[0].hue) == (0.4, 0.4, 0.2, 0.1)
    inv = dino_multicrop(inverted_blur=True, n_local=2)
    assert [s.blur_p for s in inv] == [0.0, 0.9, 0.5, 0.5] and inv[1].solarize_p == 0.2
    plain = dino_multicrop(color=False, n_local=1)
    assert all(s.jitter_p == 0 and s.blur_p == 0 and s.solarize_p == 0 and s.gray_p == 0 for s in plain)
    v1, v2 = two_views(224)
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    s1, s2 = two_views(64, asymmetric=False)
    assert s1 == s2 and s1.blur_p == 0.5 and s1.solarize_p == 0
    (m,) = single_view(224)
    assert m.flip_p == 0.5 and m.jitter_p == 0 and m.scale == (0.2, 1.0)


@pytest.mark.parametrize("make,match", [
    (lambda: ViewSpec(0), r"size expected a positive int"),
    (lambda: ViewSpec(8.0), r"size expected a positive int"),
    (lambda: ViewSpec(8, scale=(0.5, 0.1)), r"scale expected finite min <= max"),
    (lambda: ViewSpec(8, scale=(0.0, 1.0)), r"scale expected"),
    (lambda: ViewSpec(8, ratio=0.75), r"ratio expected a \(min, max\) pair"),
    (lambda: ViewSpec(8, flip_p=1.5), r"flip_p expected a probability"),
    (lambda: ViewSpec(8, hue=0.6), r"hue expected a number in \[0, 0.5\]"),
    (lambda: ViewSpec(8, brightness=-0.1), r"brightness expected"),
    (lambda: ViewSpec(8, blur_sigma=(0.0, 1.0)), r"blur_sigma expected"),
])
def test_bad_spec(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


ONES = torch.ones(2, 2, dtype=torch.long)


@pytest.mark.parametrize("call,match", [
    (lambda: draw_view_params("spec", ONES, torch.rand(2, 37)), r"spec expected a ViewSpec"),
    (lambda: draw_view_params(ViewSpec(8), ONES.repeat(1, 2)[:, :3], torch.rand(2, 37)), r"hw expected shape"),
    (lambda: draw_view_params(ViewSpec(8), torch.ones(2, 2), torch.rand(2, 37)), r"hw expected dtype"),
    (lambda: draw_view_params(ViewSpec(8), ONES, torch.rand(2, 36)), r"u expected shape \(2, 37\)"),
    (lambda: draw_view_params(ViewSpec(8), ONES, torch.rand(2, 37) + 1), r"u expected values in"),
    (lambda: draw_view_params(ViewSpec(8), ONES * 0, torch.rand(2, 37)), r"hw expected positive"),
    (lambda: draw_view_params(ViewSpec(8), ONES, torch.rand(3, 37), torch.tensor([0, 1, 2])),
     r"src expected values in \[0, 2\)"),
])
def test_bad_draw_arguments(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
