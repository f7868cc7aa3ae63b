"""colorization_targets (Zhang et al. 2016): every backend against a port of richzhang/colorization's
training layers (tests/_colorization_ref.py: NNEncLayer, PriorBoostLayer, NonGrayMaskLayer with
sklearn's ball tree), away from nearest-bin ties; the in-gamut bins; the prior and its factor;
the soft cross-entropy with the rebalancing weight in the gradient only."""
import numpy as np
import pytest
import torch

import sslkern
from sslkern.ops.colorization_targets import ab_bins, dispatch
from sslkern.reference.colorization_targets import AB_BIN_ROWS, derive_in_gamut_bins, rgb_to_lab

from _colorization_ref import PriorFactor, TrainingLayers, rgb2lab
from conftest import backend_params

BACKENDS = backend_params(dispatch, include_reference=True)

# The released resources/pts_in_hull.npy, row by row (a: first b, last b, every 10), as printed
# from the file by third parties (e.g. the list in duongngockhanh/vgg-reg-colorization
# resources/README.md starts [-90 50], [-90 60] ... and ends [100 -10], [100 0]).
RELEASED_ROWS = [(-90, 50, 90), (-80, 20, 90), (-70, 0, 90), (-60, -20, 90), (-50, -30, 100), (-40, -40, 100),
                 (-30, -50, 100), (-20, -50, 100), (-10, -60, 100), (0, -70, 100), (10, -80, 90), (20, -80, 90),
                 (30, -90, 90), (40, -100, 90), (50, -100, 80), (60, -110, 80), (70, -110, 80), (80, -110, 70),
                 (90, -110, 70), (100, -90, 0)]


def released_bins():
    return np.array([(a, b) for a, lo, hi in RELEASED_ROWS for b in range(lo, hi + 1, 10)], dtype=np.float64)


def test_bins_derived_from_the_gamut_equal_the_released_set():
    derived = derive_in_gamut_bins()
    assert derived.shape == (313, 2)
    assert torch.equal(derived, ab_bins())                             # the shipped table is the derivation
    np.testing.assert_array_equal(ab_bins().numpy(), released_bins())  # and the released set, in its order
    assert sorted(AB_BIN_ROWS) == [a for a, _, _ in RELEASED_ROWS]


def test_rgb_to_lab_matches_skimage_port():
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    x[0, :, 0, 0] = torch.tensor([1.0, 0.0, 1.0])        # magenta, the largest a
    x[0, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0])
    want = rgb2lab(x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(rgb_to_lab(x).permute(0, 2, 3, 1).numpy(), want, atol=1e-9)
    np.testing.assert_allclose(rgb_to_lab(x.float()).permute(0, 2, 3, 1).numpy(), want, atol=2e-3)


def _prior(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(313, generator=g, dtype=torch.float64) + 0.05   # every bin occurs (as the released prior)
    return (p / p.sum()).numpy()


def _images(B, H, W, dtype, device):
    x = torch.rand(B, 3, H, W, device=device)
    x[0, :, :4, :4] = torch.tensor([1.0, 0.0, 1.0], device=device)[:, None, None]   # gamut corners
    x[0, :, 4:8, :4] = torch.tensor([0.0, 1.0, 0.0], device=device)[:, None, None]
    x[0, :, :4, 4:8] = torch.tensor([0.0, 0.0, 1.0], device=device)[:, None, None]
    x[-1] = x[-1, :1]                                                                 # a grey image
    return x.to(dtype)


def _tie_pixels(images, stride):
    """Pixels whose 10th / 11th (or 1st / 2nd) nearest bins are within 1e-3 of a tie (float64)."""
    ab = rgb2lab(images.double().permute(0, 2, 3, 1).numpy())[:, ::stride, ::stride, 1:]
    d = np.sqrt(((ab[..., None, :] - released_bins()) ** 2).sum(-1))
    d.sort(-1)
    return torch.from_numpy((d[..., 10] - d[..., 9] < 1e-3) | (d[..., 1] - d[..., 0] < 1e-3))


def _dense(t, Q=313):
    B, h, w, K = t.bin_ids.shape
    out = torch.zeros(B, h, w, Q, dtype=torch.float64)
    out.scatter_(-1, t.bin_ids.long().cpu(), t.weights.double().cpu())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 37, 50, 4), (2, 16, 16, 4), (2, 13, 9, 1), (2, 56, 56, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_training_layers(backend, dtype, shape):
    name, device = backend
    B, H, W, stride = shape
    if name == "triton" and H * W > 1000:
        H, W = 21, 30  # interpreter
    x = _images(B, H, W, dtype, device)
    prior = _prior()
    factor = sslkern.rebalance_factor(torch.from_numpy(prior)).to(device)
    t = sslkern.colorization_targets(x, factor, stride=stride, backend=name)
    h, w = -(-H // stride), -(-W // stride)
    assert t.bin_ids.shape == (B, h, w, 10) and t.bin_ids.dtype == torch.int16
    assert t.weights.shape == (B, h, w, 10) and t.weights.dtype == torch.float32
    assert t.rebalance.shape == (B, h, w) and t.nongray.shape == (B,) and t.nongray.dtype == torch.bool
    layers = TrainingLayers(released_bins(), prior, stride=stride)
    gt, boost, nongray = layers(x.double().cpu().numpy())      # the port on the exactly upcast image
    tie = _tie_pixels(x.cpu(), stride)
    assert tie[:-1].float().mean() < 0.05          # the grey image (last) is all ties at (0, 0)
    ok = ~tie
    dense = _dense(t)
    gt = torch.from_numpy(gt).permute(0, 2, 3, 1)
    # weights from fp32 Lab vs the port's fp64: ab differs by ~1e-5, the weights by less than 1e-5
    torch.testing.assert_close(dense[ok], gt[ok], atol=1e-5, rtol=0)
    assert torch.equal(t.nongray.cpu(), torch.from_numpy(nongray.reshape(-1)))
    assert not bool(t.nongray[-1])                                                     # the grey image
    boost = torch.from_numpy(boost[:, 0])
    torch.testing.assert_close(t.rebalance.double().cpu()[ok], boost[ok], rtol=1e-6, atol=0)
    # nearest first, weights sorted, summing to 1
    assert (t.weights[..., :-1] >= t.weights[..., 1:]).all()
    torch.testing.assert_close(t.weights.sum(-1), torch.ones(B, h, w, device=device), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])
def test_backends_equal_the_reference(backend):
    """Same ids (away from ties), weights to fp32 rounding; strided (channels-last) input, K and σ other than the defaults."""
    name, device = backend
    base = torch.rand(2, 19, 23, 3, device=device)
    x = base.permute(0, 3, 1, 2)                         # channels-last strides
    factor = torch.rand(313, device=device) + 0.5
    for K, sigma, stride in ((10, 5.0, 4), (1, 5.0, 2), (5, 3.0, 3), (16, 8.0, 1)):
        t = sslkern.colorization_targets(x, factor, stride=stride, num_neighbors=K, sigma=sigma, backend=name)
        r = sslkern.colorization_targets(x.contiguous(), factor, stride=stride, num_neighbors=K, sigma=sigma,
                                         backend="reference")
        ab = rgb_to_lab(x.contiguous().cpu())[:, 1:, ::stride, ::stride].permute(0, 2, 3, 1)
        d = ((ab[..., None, :] - ab_bins()) ** 2).sum(-1).sort(-1).values
        ok = (d[..., K] - d[..., K - 1] > 1e-2) & (d[..., 1] - d[..., 0] > 1e-2)
        assert ok.float().mean() > 0.9
        assert torch.equal(t.bin_ids.cpu()[ok], r.bin_ids.cpu()[ok])
        # Lab in fp32 by different roundings (std::pow / cbrt vs exp2(log2)): a and b differ by up to
        # ~5e-5 (500·(fx − fy) amplifies the ulps); at σ = 3 a weight moves ~0.3 per ab unit
        torch.testing.assert_close(t.weights.cpu()[ok], r.weights.cpu()[ok], atol=3e-5, rtol=0)
        torch.testing.assert_close(t.rebalance.cpu()[ok], r.rebalance.cpu()[ok], atol=0, rtol=1e-6)
        assert torch.equal(t.nongray, r.nongray)


def test_exact_ties_keep_the_lower_bin_id():
    """Pure grey: ab within 1e-2 of (0, 0); the bins (±10, 0), (0, ±10) are equidistant up to that."""
    x = torch.full((1, 3, 4, 4), 0.5)
    t = sslkern.colorization_targets(x, stride=4, backend="cpu")
    r = sslkern.colorization_targets(x, stride=4, backend="reference")
    bins = ab_bins()
    assert bins[t.bin_ids[0, 0, 0, 0].long()].tolist() == [0.0, 0.0]
    assert torch.equal(t.bin_ids, r.bin_ids) and not bool(t.nongray[0]) and float(t.rebalance.abs().sum()) == 0


def test_grey_threshold_and_factor_default():
    x = torch.full((2, 3, 8, 8), 0.5)
    x[1, 0, 4, 4] = 0.7              # one tinted pixel, sampled at stride 4
    x[0, 0, 1, 1] = 0.9              # a tinted pixel that is not sampled
    t = sslkern.colorization_targets(x)
    assert t.nongray.tolist() == [False, True]
    torch.testing.assert_close(t.rebalance[1], torch.ones(2, 2))   # factor defaults to ones
    assert float(t.rebalance[0].abs().sum()) == 0
    t2 = sslkern.colorization_targets(x, grey_threshold=1e6)
    assert t2.nongray.tolist() == [False, False]


def test_prior_and_factor_match_priorfactor():
    x = torch.rand(6, 3, 20, 20)
    prior = sslkern.colorization_prior(x, stride=4, smooth_sigma=0.0)
    t = sslkern.colorization_targets(x, stride=4)
    counts = torch.bincount(t.bin_ids[..., 0].reshape(-1).long(), minlength=313).double()
    torch.testing.assert_close(prior, counts / counts.sum())
    smooth = sslkern.colorization_prior(x, stride=4)
    assert (smooth > 0).all() and abs(float(smooth.sum()) - 1) < 1e-12
    p = _prior(1)
    pf = PriorFactor(1.0, gamma=0.5, prior_probs=p)
    factor = sslkern.rebalance_factor(torch.from_numpy(p), gamma=0.5)
    np.testing.assert_allclose(factor.numpy(), pf.prior_factor, rtol=1e-6)
    assert abs(float((torch.from_numpy(p) * factor.double()).sum()) - 1) < 1e-6    # E_p[factor] = 1
    # a bin the training set never shows keeps a finite factor (uniform part over all bins)
    p0 = p.copy()
    p0[:10] = 0
    p0 /= p0.sum()
    assert torch.isfinite(sslkern.rebalance_factor(torch.from_numpy(p0))).all()


def test_no_grad_and_detached():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    t = sslkern.colorization_targets(x)
    assert not t.weights.requires_grad and t.weights.grad_fn is None


def test_opcheck():
    x = torch.rand(2, 3, 9, 13)
    bins = ab_bins()
    f = torch.rand(313) + 0.5
    for args in [(x, bins, f, 4, 10, 5.0, 5.0, ""), (x.bfloat16(), bins, f, 2, 3, 4.0, 5.0, "")]:
        torch.library.opcheck(torch.ops.sslkern.colorization_targets.default, args)


def test_compile_fullgraph_equals_eager():
    x = torch.rand(2, 3, 16, 20)
    f = torch.rand(313) + 0.5

    def run(x):
        t = sslkern.colorization_targets(x * 0.9, f)
        return t.weights * 2.0, t.bin_ids, t.rebalance

    eager = run(x)
    compiled = torch.compile(run, fullgraph=True, backend="inductor")(x)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("call,match", [
    (lambda: sslkern.colorization_targets(torch.rand(2, 16, 16)), r"images expected 4 dims"),
    (lambda: sslkern.colorization_targets(torch.rand(2, 1, 16, 16)), r"images expected 3 channels"),
    (lambda: sslkern.colorization_targets(torch.rand(2, 3, 8, 8).double()), r"images expected dtype"),
    (lambda: sslkern.colorization_targets(torch.rand(2, 3, 8, 8), stride=0), r"stride must be in"),
    (lambda: sslkern.colorization_targets(torch.rand(2, 3, 8, 8), stride=2.0), r"stride expected an int"),
    (lambda: sslkern.colorization_targets(torch.rand(2, 3, 8, 8), num_neighbors=17), r"num_neighbors must be in"),
    (lambda: sslkern.colorization_targets(torch.rand(2, 3, 8, 8), sigma=0.0), r"sigma must be in"),
    (lambda: sslkern.colorization_targets(torch.rand(2, 3, 8, 8), sigma=float("nan")), r"sigma expected a finite"),
    (lambda: sslkern.colorization_targets(torch.rand(2, 3, 8, 8), torch.ones(312)), r"factor expected shape \(313,\)"),
    (lambda: sslkern.colorization_targets(torch.rand(2, 3, 8, 8), torch.ones(313, dtype=torch.int64)),
     r"factor expected dtype"),
    (lambda: sslkern.rebalance_factor(torch.ones(313)), r"prior expected non-negative probabilities summing to 1"),
    (lambda: sslkern.rebalance_factor(torch.ones(313) / 313, gamma=1.5), r"gamma must be in"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------------------------------
# The soft cross-entropy with the rebalancing weight in the gradient only
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_rebalanced_soft_cross_entropy(dtype):
    x = _images(3, 12, 16, torch.float32, "cpu")
    factor = torch.rand(313) * 3 + 0.1
    t = sslkern.colorization_targets(x, factor, stride=4)
    logits = (torch.randn(3, 3, 4, 313) * 2).to(dtype).requires_grad_()
    loss = sslkern.nn.rebalanced_soft_cross_entropy(logits, t.bin_ids, t.weights, t.rebalance)
    dense = _dense(t)                                                     # (B, h, w, 313) fp64
    logp = torch.log_softmax(logits.detach().double(), -1)
    want = -(dense * logp).sum(-1).mean()                                # logged: UNweighted
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    z = logits.detach().double().requires_grad_()
    weighted = -(dense * torch.log_softmax(z, -1)).sum(-1) * t.rebalance.double()
    weighted.mean().backward()                                            # gradient: weighted per pixel
    tol = dict(rtol=1e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(logits.grad.double(), z.grad, **tol)
    assert float(logits.grad[-1].abs().sum()) == 0                        # the grey image: no gradient


def test_rebalanced_soft_cross_entropy_under_loss_scaling():
    """fp16 logits, loss × 65,536: the gradient (at most 65,536 / N per logit here) is finite and
    equals the fp32 computation rounded once."""
    t = sslkern.colorization_targets(torch.rand(2, 3, 16, 16))                 # factor 1, 32 pixels
    logits = torch.randn(2, 4, 4, 313).half().requires_grad_()
    loss = sslkern.nn.rebalanced_soft_cross_entropy(logits, t.bin_ids, t.weights, t.rebalance)
    (loss * 65536.0).backward()
    assert torch.isfinite(logits.grad).all()
    z = logits.detach().float().requires_grad_()
    (sslkern.nn.rebalanced_soft_cross_entropy(z, t.bin_ids, t.weights, t.rebalance) * 65536.0).backward()
    torch.testing.assert_close(logits.grad, z.grad.half(), rtol=1e-3, atol=1e-3)


def test_rebalanced_soft_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="bin_ids expected shape"):
        sslkern.nn.rebalanced_soft_cross_entropy(torch.randn(4, 313), torch.zeros(3, 10, dtype=torch.long),
                                                 torch.zeros(3, 10), torch.zeros(3))
    with pytest.raises(TypeError, match="weights expected dtype"):
        sslkern.nn.rebalanced_soft_cross_entropy(torch.randn(4, 313), torch.zeros(4, 10, dtype=torch.long),
                                                 torch.zeros(4, 10, dtype=torch.long), torch.zeros(4))
