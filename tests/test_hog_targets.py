"""hog_targets (MaskFeat HOG targets): every backend against an eager port of SlowFast's
``HOGLayerC`` + MaskFeat's unfolding (tests/_slowfast_hog.py), odd sizes, ids, dtypes."""
from unittest import mock

import pytest
import torch

import sslkern
from sslkern.ops.hog_targets import dispatch

import _slowfast_hog
from _slowfast_hog import HOGLayerC, maskfeat_hog_labels
from conftest import backend_params

BACKENDS = backend_params(dispatch, include_reference=True)


def _sobel_conv2d_exact(x, weight, **kwargs):
    """HOGLayerC's Sobel ``conv2d`` summed in fp64 (exact for fp32 images and integer taps), then
    rounded once to fp32. torch's fp32 ``conv2d`` can leave a rounding residual (seen: ±2.4e-7)
    where the exact Sobel response is 0 — at every reflect-padded border column gx = a − a — and
    atan2 then bins that pixel by the residual's sign (bin 8 instead of 0), so the oracle would
    depend on which convolution algorithm torch picks for the shape."""
    return _CONV2D(x.double(), weight.double(), **kwargs).float()


_CONV2D = torch.nn.functional.conv2d


def slowfast(images, patch_size, pool, nbins=9, gaussian_window=0, mask=None):
    """MaskFeat's targets from the fp32 image (HOGLayerC refuses other dtypes), Sobel sums exact."""
    hog = HOGLayerC(nbins=nbins, pool=pool, gaussian_window=gaussian_window, channels=images.shape[1])
    with mock.patch.object(_slowfast_hog.F, "conv2d", _sobel_conv2d_exact):
        return maskfeat_hog_labels(hog.to(images.device), images.float(), images.shape[-1] // patch_size, mask)


# Tolerances: outputs are L2-normalised histograms (entries in [0, 1]); the backends differ
# from HOGLayerC by summation order (conv2d vs the explicit Sobel sums, the cell sums, the
# norm): a few fp32 ulp, 1e-5 absolute. The same pixel bins are used by every backend;
# HOGLayerC's atan2 could bin a pixel within a few ulp of an edge differently (none does on
# these seeded inputs; the test would say so). fp16/bf16 inputs are upcast exactly, so the
# same tolerance holds against HOGLayerC on the upcast image.
TOL = dict(atol=1e-5, rtol=1e-5)

SHAPES = [  # (B, C, H, W, patch, pool, gaussian_window)
    (3, 3, 32, 48, 16, 8, 0),     # MaskFeat geometry (2x2 cells of 8 per 16-pixel patch), non-square
    (5, 1, 20, 12, 4, 2, 0),      # the recipe's geometry, odd batch, one channel
    (2, 3, 18, 30, 6, 3, 0),      # odd cell size
    (1, 2, 15, 25, 5, 5, 0),      # odd image sides, one cell per patch
    (2, 3, 32, 32, 16, 4, 0),     # 4x4 cells per patch
    (2, 3, 32, 32, 16, 8, 16),    # Gaussian window (HOGLayerC needs a square image for it)
    (3, 1, 12, 12, 4, 2, 6),
]


def small(name):
    return name == "triton"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_hoglayerc(backend, shape):
    name, device = backend
    B, C, H, W, p, pool, gw = shape
    if small(name):  # the interpreter runs one program per patch: one image, at most 2 channels
        B, C = 1, min(C, 2)
    x = torch.randn(B, C, H, W, device=device)
    out = sslkern.hog_targets(x, p, pool=pool, gaussian_window=gw, backend=name)
    want = slowfast(x, p, pool, gaussian_window=gw)
    assert out.shape == (B, (H // p) * (W // p), C * (p // pool) ** 2 * 9) and out.dtype == torch.float32
    torch.testing.assert_close(out, want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_ids_subset_and_dtypes(backend, dtype):
    """Masked patches only (ids, any order, repeats allowed) == HOGLayerC's rows at those ids;
    with a fixed count per image that is MaskFeat's ``hog[output_mask]``."""
    name, device = backend
    B, C, H, W, p, pool = (2, 2, 16, 24, 8, 4) if small(name) else (7, 3, 40, 56, 8, 4)
    x = (torch.randn(B, C, H, W, device=device) * 2 + 0.5).to(dtype)
    N = (H // p) * (W // p)
    full = slowfast(x, p, pool)
    noise = torch.rand(B, N, device=device)
    nm = int(0.4 * N)
    ids = noise.argsort(1)[:, :nm]
    out = sslkern.hog_targets(x, p, pool=pool, ids=ids.int(), backend=name)
    torch.testing.assert_close(out, full.gather(1, ids.unsqueeze(-1).expand(-1, -1, full.shape[-1])), **TOL)
    mask = torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, ids, True)
    sorted_ids = ids.sort(1).values
    out_sorted = sslkern.hog_targets(x, p, pool=pool, ids=sorted_ids, backend=name)
    torch.testing.assert_close(out_sorted.flatten(0, 1), slowfast(x, p, pool, mask=mask), **TOL)
    rep = torch.zeros(B, 3, dtype=torch.long, device=device)  # repeats; empty ids
    torch.testing.assert_close(sslkern.hog_targets(x, p, pool=pool, ids=rep, backend=name), full[:, :1].expand(-1, 3, -1),
                               **TOL)
    assert sslkern.hog_targets(x, p, pool=pool, ids=rep[:, :0], backend=name).shape == (B, 0, full.shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_and_nbins(backend):
    name, device = backend
    base = torch.randn(*((1, 8, 12, 5) if small(name) else (2, 20, 24, 5)), device=device)
    x = base.permute(0, 3, 1, 2)[:, 1:4]  # (B, 3, H, W), channels-last strides
    for nbins in (9,) if small(name) else (9, 5, 1):  # odd counts: even ones put the axes on bin edges, see test_ties_at_bin_edges
        out = sslkern.hog_targets(x, 4, pool=2, nbins=nbins, backend=name)
        torch.testing.assert_close(out, slowfast(x.contiguous(), 4, 2, nbins=nbins), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases_flat_and_axis_aligned(backend):
    """Flat cells (zero histograms stay 0: F.normalize's eps), and exact axis-aligned
    gradients (gx = 0 → bin 0 for both signs of gy; gy = 0 → bin nbins // 2) as atan2 gives."""
    name, device = backend
    x = torch.zeros(2, 1, 8, 8, device=device)
    x[0, 0, :, 4:] = 1.0   # vertical edge: gy = 0
    x[1, 0, 4:, :] = 1.0   # horizontal edge: gx = 0
    out = sslkern.hog_targets(x, 4, pool=2, backend=name)
    torch.testing.assert_close(out, slowfast(x, 4, 2), atol=0, rtol=0)
    z = sslkern.hog_targets(torch.full((1, 3, 8, 8), 2.5, device=device), 8, pool=4, backend=name)
    assert torch.equal(z, torch.zeros_like(z))


def test_ties_at_bin_edges():
    """Integer images (like uint8 pixels) have exact gradients, many with gx = 0 and gy != 0:
    exactly on the 0/π bin edge. sslkern bins them exactly (atan2(±0, gy) → bin 0, every
    backend alike); HOGLayerC's grouped conv2d sums the 9 taps in its own order, leaves a
    rounding residue of either sign in gx, and so puts some of them in bin 0 and some in bin 8.
    Everywhere else the two agree: the cells that differ are exactly cells holding such a
    tie pixel, and there sslkern equals the exact rule (the reference)."""
    x = torch.randint(0, 256, (4, 3, 32, 32)).float()
    cpu = sslkern.hog_targets(x, 16, backend="cpu")
    torch.testing.assert_close(cpu, sslkern.hog_targets(x, 16, backend="reference"), **TOL)
    want = slowfast(x, 16, 8)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect").double()
    d = xp[..., :-2] - xp[..., 2:]
    gx = d[:, :, :-2] + 2 * d[:, :, 1:-1] + d[:, :, 2:]          # exact in fp64 (integers)
    s = xp[..., :-2] + 2 * xp[..., 1:-1] + xp[..., 2:]
    gy = s[:, :, :-2] - s[:, :, 2:]
    tie = (gx == 0) & (gy != 0)                                   # (B, C, H, W)
    tie_cell = tie.view(4, 3, 2, 2, 8, 2, 2, 8).any(-1).any(-3)   # (B, C, patch row, cell row, patch col, cell col)
    tie_feat = tie_cell.permute(0, 2, 4, 1, 3, 5).reshape(4, 4, 3, 1, 4).expand(4, 4, 3, 9, 4).reshape(4, 4, 108)
    assert tie.any()
    differs = (cpu - want).abs() > 1e-4
    assert not (differs & ~tie_feat).any()                        # every difference is in a tie cell
    torch.testing.assert_close(cpu[~tie_feat], want[~tie_feat], **TOL)


def test_no_grad_and_detached():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = sslkern.hog_targets(x, 8, pool=4)
    assert not out.requires_grad and out.grad_fn is None


def test_opcheck():
    x = torch.randn(2, 3, 12, 20)
    ids = torch.tensor([[0, 5, 14], [3, 3, 1]])
    from sslkern.reference.hog_targets import gaussian_window

    win = gaussian_window(4)
    for args in [(x, None, None, 4, 2, 9, ""), (x, ids, None, 4, 2, 9, ""), (x.half(), ids, win, 4, 4, 6, "")]:
        torch.library.opcheck(torch.ops.sslkern.hog_targets.default, args)


def test_compile_fullgraph_equals_eager():
    x = torch.randn(3, 3, 16, 24)
    ids = torch.randint(0, 24, (3, 7))

    def targets(x, ids):
        return sslkern.hog_targets(x * 2.0, 4, pool=2, ids=ids) + 1.0

    eager = targets(x, ids)
    compiled = torch.compile(targets, fullgraph=True, backend="inductor")(x, ids)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)  # same kernel; the glue is exact


def _t(*shape, **kw):
    return torch.randn(*shape, **kw)


@pytest.mark.parametrize("call,match", [
    (lambda: sslkern.hog_targets(_t(2, 16, 16), 4), r"images expected 4 dims"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16).double(), 4), r"images expected dtype"),
    (lambda: sslkern.hog_targets(_t(2, 3, 18, 16), 4, pool=2), r"images expected H and W multiples of patch_size 4"),
    (lambda: sslkern.hog_targets(_t(2, 3, 1, 1), 1, pool=1), r"images expected .* at least 2"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 4, pool=3), r"patch_size expected a multiple of pool 3"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 0, pool=1), r"patch_size must be in"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 4.0, pool=2), r"patch_size expected an int"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 4, pool=0), r"pool must be in"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 4, pool=2, nbins=0), r"nbins must be in"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 4, pool=2, gaussian_window=5), r"gaussian_window expected 0 or a size"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 4, pool=2, gaussian_window=1), r"gaussian_window expected 0 or a size"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 4, pool=2, ids=torch.zeros(3, 2, dtype=torch.long)),
     r"ids expected shape \(2, \*\)"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 4, pool=2, ids=torch.zeros(2, 2)), r"ids expected dtype"),
    (lambda: sslkern.hog_targets(_t(2, 3, 16, 16), 4, pool=2, ids=torch.zeros(2, dtype=torch.long)), r"ids expected 2 dims"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])
@pytest.mark.parametrize("bad", [-1, 16, 1 << 40])
def test_ids_out_of_range(backend, bad):
    name, device = backend
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    ids[1, 2] = bad
    x = torch.randn(2, 3, 16, 16, device=device)
    with pytest.raises(IndexError, match=r"ids expected values in \[0, 16\)"):
        sslkern.hog_targets(x, 4, pool=2, ids=ids, backend=name)
    if name == "cpu":  # unchecked: the kernel refuses them (TORCH_CHECK), nothing is read out of bounds
        with pytest.raises(RuntimeError, match=r"ids expected values in \[0, 16\)"):
            sslkern.hog_targets(x, 4, pool=2, ids=ids, check_indices=False, backend=name)
    else:  # the Triton kernel writes zeros for an out-of-range id
        out = sslkern.hog_targets(x, 4, pool=2, ids=ids, check_indices=False, backend=name)
        assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2]))
        torch.testing.assert_close(out[0], sslkern.hog_targets(x, 4, pool=2, backend="reference")[0, :1].expand(3, -1),
                                   **TOL)
