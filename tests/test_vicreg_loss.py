"""vicreg_loss: every backend against the eager reference, the official vicreg code, lightly's
VICRegLoss and solo-learn's vicreg_loss_func; the Gram and tiled forms; the rows contract used
across ranks; no (D, D) tensor."""
import pytest
import torch

import sslkern
from sslkern.ops.vicreg_loss import dispatch
from sslkern.reference import vicreg_loss as ref_loss

from _redundancy_ref import solo_vicreg_loss_func, vicreg_forward
from conftest import backend_params
from test_cross_correlation_loss import _peak_bytes, largest_allocation

BACKENDS = backend_params(dispatch)
ON_GPU = torch.cuda.is_available()

# Against the reference in fp64 on the same (upcast) inputs: fp32 differs by summation order
# (Gram: ‖XXᵀ‖² − Σ s² over N² terms where the reference adds cov² over D²); fp16 / bf16 inputs
# are read as they are, the arithmetic is fp32 and the gradients are rounded once.
TOL_LOSS = {torch.float32: dict(atol=1e-5, rtol=2e-5), torch.float64: dict(atol=1e-11, rtol=1e-11),
            torch.float16: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-4, rtol=1e-4)}
TOL_GRAD = {torch.float32: 3e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # × max |grad|
COEFFS = dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0)


def _run(fn, za, zb, **kw):
    za = za.detach().clone().requires_grad_(True)
    zb = zb.detach().clone().requires_grad_(True)
    loss = fn(za, zb, **kw)
    ga, gb = torch.autograd.grad(loss, (za, zb))
    return loss.detach(), ga, gb


def _oracle(za, zb, **kw):
    kw.pop("method", None)
    return _run(ref_loss, za.double(), zb.double(), **kw)


def assert_close(got, want, dtype):
    loss, ga, gb = got
    lr, gar, gbr = want
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ga.dtype == dtype and gb.dtype == dtype
    torch.testing.assert_close(loss.double(), lr, **TOL_LOSS[dtype])
    for g, r, name in ((ga, gar, "dz_a"), (gb, gbr, "dz_b")):
        err = float((g.double() - r).abs().max() / r.abs().max())
        assert err <= TOL_GRAD[dtype], f"{name}: max error {err:.2e} of max |grad|"


def _inputs(n, d, dtype=torch.float32, device="cpu"):
    # per-dimension scales on both sides of 1, so the std hinge is active on some dimensions only
    scale = torch.linspace(0.3, 2.0, d)
    za = torch.randn(n, d) * scale + 0.5
    zb = 0.7 * za + 0.5 * torch.randn(n, d) * scale
    return za.to(device, dtype), zb.to(device, dtype)


CPU_CASES = [(3, 5, "auto"), (37, 50, "gram"), (37, 50, "tiled"), (197, 64, "auto"), (50, 37, "gram"),
             (300, 601, "auto"), (700, 600, "tiled")]
TRITON_CASES = [(3, 5, "auto"), (37, 50, "gram"), (37, 50, "tiled"), (50, 19, "auto")]


def _case_params():
    out = []
    for p in BACKENDS:
        name = p.values[0][0]
        cases = CPU_CASES if name == "cpu" or ON_GPU else TRITON_CASES
        out += [pytest.param(p.values[0], c, id=f"{p.id}-N{c[0]}-D{c[1]}-{c[2]}", marks=p.marks) for c in cases]
    return out


@pytest.mark.parametrize("backend,case", _case_params())
@pytest.mark.parametrize("std_scale", [0.5, 1.0])
def test_backend_matches_reference(backend, case, std_scale):
    name, device = backend
    n, d, method = case
    za, zb = _inputs(n, d, device=device)
    got = _run(sslkern.vicreg_loss, za, zb, std_scale=std_scale, method=method, backend=name, **COEFFS)
    assert_close(got, _oracle(za.cpu(), zb.cpu(), std_scale=std_scale, **COEFFS), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["gram", "tiled"])
def test_dtypes(backend, dtype, method):
    name, device = backend
    if name == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes fp32/fp16/bf16 (fp64 runs on cpu/reference)")
    n, d = (96, 130) if method == "gram" else (130, 40)
    za, zb = _inputs(n, d, dtype, device)
    got = _run(sslkern.vicreg_loss, za, zb, method=method, backend=name)
    assert_close(got, _oracle(za.cpu(), zb.cpu()), dtype)


@pytest.mark.parametrize("n,d", [(40, 90), (90, 40), (64, 64)])
def test_gram_and_tiled_agree(n, d):
    za, zb = _inputs(n, d, torch.float64)
    g = _run(sslkern.vicreg_loss, za, zb, method="gram", backend="cpu")
    t = _run(sslkern.vicreg_loss, za, zb, method="tiled", backend="cpu")
    for a, b in zip(g, t):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("method", ["gram", "tiled"])
def test_gradcheck_float64(backend, method):
    za, zb = _inputs(6, 7, torch.float64)
    f = lambda a, b: sslkern.vicreg_loss(a, b, sim_coeff=2.0, std_coeff=3.0, cov_coeff=1.5,  # noqa: E731
                                         method=method, backend=backend)
    assert torch.autograd.gradcheck(f, (za.requires_grad_(), zb.requires_grad_()), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("rows", [(0, 12), (3, 7)])
def test_opcheck(grads, rows):
    diff = rows == (0, 12)  # rows calls are made on detached gathered batches
    za, zb = torch.randn(12, 9, requires_grad=grads[0] and diff), torch.randn(12, 9, requires_grad=grads[1] and diff)
    torch.library.opcheck(torch.ops.sslkern.vicreg_loss.default,
                          (za, zb, 25.0, 25.0, 1.0, 1e-4, 0.5, rows[0], rows[1], "gram", grads[0], grads[1], ""))


def test_compile_fullgraph_equals_eager():
    za, zb = (torch.randn(40, 70, requires_grad=True) for _ in range(2))

    def f(a, b):
        return sslkern.vicreg_loss(a, b) + 0.5 * sslkern.vicreg_loss(a, b, method="tiled", std_scale=1.0)

    eager = f(za, zb)
    e_grads = torch.autograd.grad(eager, (za, zb))
    got = torch.compile(f, fullgraph=True)(za, zb)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-6)
    for g, e in zip(torch.autograd.grad(got, (za, zb)), e_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_incoming_gradient(backend):
    name, device = backend
    za, zb = (t.requires_grad_(True) for t in _inputs(20, 30, device=device))
    loss = sslkern.vicreg_loss(za, zb, backend=name)
    g1 = torch.autograd.grad(loss, (za, zb), retain_graph=True)
    g3 = torch.autograd.grad(loss * -3.0, (za, zb))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, -3.0 * a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_under_loss_scaler_has_finite_gradients(backend):
    name, device = backend
    za, zb = (t.requires_grad_(True) for t in _inputs(32, 48, torch.float16, device))
    loss = sslkern.vicreg_loss(za, zb, backend=name)
    ga, gb = torch.autograd.grad(loss * 65536.0, (za, zb))
    assert bool(torch.isfinite(ga).all() and torch.isfinite(gb).all())
    ref = _oracle(za.detach().cpu(), zb.detach().cpu())
    err = float((ga.double().cpu() / 65536.0 - ref[1]).abs().max() / ref[1].abs().max())
    assert err < 2e-3


# ---------------------------------------------------------------------------------------
# The public code: facebookresearch/vicreg, lightly, solo-learn
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", [(64, 256), (256, 64)])
def test_equals_official_vicreg(backend, n, d):
    """vicreg main_vicreg.py VICReg.forward (one process), 25 / 25 / 1: loss and gradients."""
    name, device = backend
    if name == "triton" and not ON_GPU:
        n, d = (24, 40) if n < d else (40, 24)
    za, zb = _inputs(n, d, device=device)
    want = _run(lambda a, b: vicreg_forward(a, b, n, d), za, zb)
    got = _run(sslkern.vicreg_loss, za, zb, backend=name)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=2e-5)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=2e-6 * float(w.abs().max()), rtol=1e-4)
    torch.testing.assert_close(sslkern.nn.VICRegLoss()(za, zb), want[0], atol=1e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_lightly_vicreg_loss(backend):
    lightly_loss = pytest.importorskip("lightly.loss")
    name, device = backend
    n, d = (32, 48) if name == "triton" and not ON_GPU else (128, 512)
    za, zb = _inputs(n, d, device=device)
    want = _run(lambda a, b: lightly_loss.VICRegLoss()(a, b), za, zb)
    got = _run(sslkern.vicreg_loss, za, zb, backend=name)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=2e-5)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=2e-6 * float(w.abs().max()), rtol=1e-4)


def test_equals_solo_learn_vicreg_loss_func():
    """solo-learn sums the two std terms: std_scale=1.0."""
    za, zb = _inputs(96, 160)
    want = _run(solo_vicreg_loss_func, za, zb)
    got = _run(sslkern.vicreg_loss, za, zb, std_scale=1.0)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=2e-5)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=2e-6 * float(w.abs().max()), rtol=1e-4)
    assert not torch.allclose(sslkern.vicreg_loss(za, zb), got[0])  # the conventions differ on these inputs


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_stats(backend):
    n, d = 16, 40
    za, zb = _inputs(n, d, torch.float64)
    loss, st = sslkern.vicreg_loss(za, zb, return_stats=True, backend=backend)
    torch.testing.assert_close(loss, 25 * st["invariance"] + 25 * st["variance"] + st["covariance"])
    stds = torch.cat([(za.var(0) + 1e-4).sqrt(), (zb.var(0) + 1e-4).sqrt()])
    torch.testing.assert_close(st["mean_std"], stds.mean())
    torch.testing.assert_close(st["low_std_frac"], (stds < 1).double().mean())
    torch.testing.assert_close(st["invariance"], torch.nn.functional.mse_loss(za, zb))
    floor = 0
    for z in (za, zb):
        var = z.var(0)
        floor = floor + (var.sum() ** 2 / (n - 1) - var.square().sum()) / d
    torch.testing.assert_close(st["covariance_floor"], floor)
    assert float(st["covariance"]) >= float(st["covariance_floor"])


# ---------------------------------------------------------------------------------------
# Rows of a gathered batch (what sslkern.nn.VICRegLoss computes on each rank)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "reference"] + [p for p in BACKENDS if p.values[0][0] == "triton"])
@pytest.mark.parametrize("method", ["gram", "tiled"])
def test_rows_shares_and_gradients(backend, method):
    name, device = backend if isinstance(backend, tuple) else (backend, "cpu")
    n, d, world = 24, 30, 3
    za, zb = _inputs(n, d, device=device)
    loss, ga, gb = _run(sslkern.vicreg_loss, za, zb, method=method, backend=name)
    m = n // world
    op = torch.ops.sslkern.vicreg_loss
    full = op(za, zb, 25.0, 25.0, 1.0, 1e-4, 0.5, 0, n, method, False, False, name)
    outs = [op(za, zb, 25.0, 25.0, 1.0, 1e-4, 0.5, r * m, (r + 1) * m, method, True, True, name) for r in range(world)]
    torch.testing.assert_close(sum(o[0] for o in outs), loss, atol=1e-5, rtol=1e-5)
    for k in (0, 7, 8):  # shares: Σ (z_a − z_b)² and the off-diagonal covariance sums
        torch.testing.assert_close(sum(o[3][k] for o in outs), full[3][k], atol=1e-4, rtol=1e-5)
    for r, o in enumerate(outs):  # exact gradient rows, no reduction needed
        torch.testing.assert_close(o[1], ga[r * m:(r + 1) * m], atol=3e-6 * float(ga.abs().max()), rtol=1e-4)
        torch.testing.assert_close(o[2], gb[r * m:(r + 1) * m], atol=3e-6 * float(gb.abs().max()), rtol=1e-4)


def test_rows_call_is_not_differentiable():
    za, zb = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    loss = torch.ops.sslkern.vicreg_loss(za, zb, 25.0, 25.0, 1.0, 1e-4, 0.5, 0, 4, "gram", True, True, "")[0]
    with pytest.raises(RuntimeError, match="backward through a call that computed no gradient"):
        loss.backward()


@pytest.mark.parametrize("n,d,method", [(64, 2048, "gram"), (2100, 2048, "tiled")])
def test_cpu_extra_memory_is_not_d_by_d(n, d, method):
    za, zb = (t.requires_grad_(True) for t in _inputs(n, d))
    peak = _peak_bytes(lambda: sslkern.vicreg_loss(za, zb, method=method, backend="cpu").backward())
    assert peak < 6 * n * d * 4 + 512 * d * 4 + 2 * n * n * 4 + (1 << 20), peak
    if n < d:
        assert peak < d * d * 4 / 2, peak


@pytest.mark.parametrize("backend,fits", [("cpu", True), ("reference", False)])
def test_tiled_form_allocates_nothing_of_size_d_by_d(backend, fits):
    n, d = 1000, 2048
    za, zb = (t.requires_grad_(True) for t in _inputs(n, d))
    big = largest_allocation(lambda: sslkern.vicreg_loss(za, zb, method="tiled", backend=backend).backward())
    assert (big < d * d * 4) == fits, big


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def _pair(n=6, d=4, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda a, b: sslkern.vicreg_loss(a, b[:, :3]), ValueError, r"z_b expected shape \(6, 4\) \(z_a's shape\), got \(6, 3\)"),
    (lambda a, b: sslkern.vicreg_loss(a, b.half()), TypeError, r"z_b expected dtype float32 \(z_a's dtype\)"),
    (lambda a, b: sslkern.vicreg_loss(a.int(), b), TypeError, "z_a expected dtype in"),
    (lambda a, b: sslkern.vicreg_loss(a[0], b), ValueError, "z_a expected 2 dims"),
    (lambda a, b: sslkern.vicreg_loss(a[:1], b[:1]), ValueError, "z_a expected at least 2 rows"),
    (lambda a, b: sslkern.vicreg_loss(a, b, eps=-1.0), ValueError, r"eps must be in \(0.0, inf\], got -1.0"),
    (lambda a, b: sslkern.vicreg_loss(a, b, sim_coeff=float("inf")), ValueError, "sim_coeff expected a finite number, got inf"),
    (lambda a, b: sslkern.vicreg_loss(a, b, std_coeff="25"), TypeError, "std_coeff expected a real number, got str"),
    (lambda a, b: sslkern.vicreg_loss(a, b, method="full"), ValueError, "method must be one of"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_pair())


def test_cpu_kernel_checks_direct_calls():
    a, b = _pair(12, 4)
    k = torch.ops.sslkern_C.vicreg_loss_cpu
    with pytest.raises(RuntimeError, match="one shape"):
        k(a, b[:, :3], 25.0, 25.0, 1.0, 1e-4, 0.5, 0, 12, "gram", True, True)
    with pytest.raises(RuntimeError, match="rows expected"):
        k(a, b, 25.0, 25.0, 1.0, 1e-4, 0.5, 4, 2, "gram", True, True)
    with pytest.raises(RuntimeError, match="method expected 'gram' or 'tiled'"):
        k(a, b, 25.0, 25.0, 1.0, 1e-4, 0.5, 0, 12, "auto", True, True)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        k(a, b, 25.0, 25.0, 1.0, 0.0, 0.5, 0, 12, "gram", True, True)


def test_triton_rejects_fp64_and_strips(monkeypatch):
    if not dispatch.usable("triton", torch.device("cuda" if ON_GPU else "cpu"))[0]:
        pytest.skip("triton backend not usable here")
    dev = "cuda" if ON_GPU else "cpu"
    a, b = (t.to(dev) for t in _pair(dtype=torch.float64))
    with pytest.raises(TypeError, match="fp64 runs on backend='cpu'"):
        sslkern.vicreg_loss(a, b, backend="triton")
    import sslkern.triton_ops.vicreg_loss as mod

    monkeypatch.setattr(mod, "STRIP", 16)  # the tiled form over several strips
    za, zb = _inputs(50, 37, device=dev)
    got = _run(sslkern.vicreg_loss, za, zb, method="tiled", backend="triton")
    assert_close(got, _oracle(za.cpu(), zb.cpu()), torch.float32)
