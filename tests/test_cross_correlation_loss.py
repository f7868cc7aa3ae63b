"""cross_correlation_loss (Barlow Twins): every backend against the eager reference, the official
barlowtwins code, lightly's BarlowTwinsLoss and solo-learn's barlow_loss_func; the Gram and tiled
forms; the rows contract used across ranks; no (D, D) tensor."""
import pytest
import torch

import sslkern
from sslkern.ops.cross_correlation_loss import dispatch, resolve_method
from sslkern.reference import cross_correlation_loss as ref_loss

from _redundancy_ref import barlowtwins_forward, solo_barlow_loss_func
from conftest import backend_params

BACKENDS = backend_params(dispatch)
ON_GPU = torch.cuda.is_available()

# Against the reference in fp64 on the same (upcast) inputs. fp32: summation order only (the Gram
# form adds ⟨K_a, K_b⟩ over N² terms where the reference adds C² over D²). fp16 / bf16: the inputs
# are read as they are, the arithmetic is fp32, the gradients are rounded once to the input dtype.
TOL_LOSS = {torch.float32: dict(atol=1e-5, rtol=2e-5), torch.float64: dict(atol=1e-11, rtol=1e-11),
            torch.float16: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-4, rtol=1e-4)}
TOL_GRAD = {torch.float32: 3e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # × max |grad|


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


def _inputs(n, d, dtype=torch.float32, device="cpu", corr=0.6):
    za = torch.randn(n, d) * 2 + 0.5
    zb = corr * za + torch.randn(n, d)  # correlated views: C_ii well inside (0, 1)
    return za.to(device, dtype), zb.to(device, dtype)


# (N, D, groups, method): Gram (N < D) and tiled (N >= D), several strips (D > 512), groups,
# ViT-ish sizes; the interpreter gets small ones
CPU_CASES = [(3, 5, 1, "auto"), (37, 50, 1, "gram"), (37, 50, 1, "tiled"), (197, 64, 1, "auto"), (50, 37, 1, "gram"),
             (300, 601, 1, "auto"), (700, 600, 1, "tiled"), (12, 20, 3, "auto"), (64, 24, 4, "tiled"), (64, 200, 2, "gram")]
TRITON_CASES = [(3, 5, 1, "auto"), (37, 50, 1, "gram"), (37, 50, 1, "tiled"), (50, 19, 1, "auto"), (12, 20, 3, "auto"),
                (24, 9, 2, "tiled")]


def _case_params():
    out = []
    for p in BACKENDS:
        name = p.values[0][0]
        cases = CPU_CASES if name == "cpu" or ON_GPU else TRITON_CASES
        out += [pytest.param(p.values[0], c, id=f"{p.id}-N{c[0]}-D{c[1]}-g{c[2]}-{c[3]}", marks=p.marks) for c in cases]
    return out


@pytest.mark.parametrize("backend,case", _case_params())
def test_backend_matches_reference(backend, case):
    name, device = backend
    n, d, groups, method = case
    za, zb = _inputs(n, d, device=device)
    kw = dict(lambd=0.0051, scale=1.0, groups=groups)
    got = _run(sslkern.cross_correlation_loss, za, zb, method=method, backend=name, **kw)
    assert_close(got, _oracle(za.cpu(), zb.cpu(), **kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["gram", "tiled"])
def test_dtypes(backend, dtype, method):
    name, device = backend
    if name == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes fp32/fp16/bf16 (fp64 runs on cpu/reference)")
    n, d = (96, 130) if method == "gram" else (130, 40)
    za, zb = _inputs(n, d, dtype, device)
    got = _run(sslkern.cross_correlation_loss, za, zb, lambd=0.02, method=method, backend=name)
    assert_close(got, _oracle(za.cpu(), zb.cpu(), lambd=0.02), dtype)


@pytest.mark.parametrize("n,d", [(40, 90), (90, 40), (63, 64), (64, 64)])
def test_gram_and_tiled_agree(n, d):
    za, zb = _inputs(n, d, torch.float64)
    g = _run(sslkern.cross_correlation_loss, za, zb, method="gram", backend="cpu")
    t = _run(sslkern.cross_correlation_loss, za, zb, method="tiled", backend="cpu")
    for a, b in zip(g, t):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_auto_method_rule():
    """Fewer flops: Gram 8·r·N·D against tiled 2·p·N·D² + 4·r·D² (r rows wanted, p = 1 for Barlow
    Twins' C, 2 for VICReg's two covariances); the whole batch: N < 3D/4 and N < D."""
    assert resolve_method("auto", 256, 8192, 256) == "gram"
    assert resolve_method("auto", 4096, 2048, 4096) == "tiled"
    assert resolve_method("auto", 383, 512, 383) == "gram" and resolve_method("auto", 384, 512, 384) == "tiled"
    assert resolve_method("auto", 500, 512, 500, 2) == "gram" and resolve_method("auto", 512, 512, 512, 2) == "tiled"
    assert resolve_method("tiled", 256, 8192, 256) == "tiled"
    assert resolve_method("auto", 2048, 8192, 256) == "gram"  # a rank's rows of a gathered batch
    assert resolve_method("auto", 8192, 1024, 1024) == "tiled"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("method,groups", [("gram", 1), ("tiled", 1), ("gram", 2), ("tiled", 3)])
def test_gradcheck_float64(backend, method, groups):
    za, zb = _inputs(6, 7, torch.float64)
    f = lambda a, b: sslkern.cross_correlation_loss(a, b, 0.3, scale=0.7, groups=groups, method=method,  # noqa: E731
                                                    backend=backend)
    assert torch.autograd.gradcheck(f, (za.requires_grad_(), zb.requires_grad_()), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("rows", ["full", "finish", "partial"])
def test_opcheck(grads, rows):
    # rows calls are made on detached gathered batches (their gradients are outputs, not differentiated)
    diff = rows == "full"
    za, zb = torch.randn(12, 9, requires_grad=grads[0] and diff), torch.randn(12, 9, requires_grad=grads[1] and diff)
    groups, r0, r1, finish = {"full": (1, 0, 12, True), "finish": (3, 4, 12, True), "partial": (1, 3, 7, False)}[rows]
    torch.library.opcheck(torch.ops.sslkern.cross_correlation_loss.default,
                          (za, zb, 0.01, 1.0, 1e-5, groups, r0, r1, finish, "gram", grads[0], grads[1], ""))


def test_compile_fullgraph_equals_eager():
    za, zb = (torch.randn(40, 70, requires_grad=True) for _ in range(2))

    def f(a, b):
        return sslkern.cross_correlation_loss(a, b) + 0.5 * sslkern.cross_correlation_loss(a, b, method="tiled")

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
    loss = sslkern.cross_correlation_loss(za, zb, backend=name)
    g1 = torch.autograd.grad(loss, (za, zb), retain_graph=True)
    g3 = torch.autograd.grad(loss * -3.0, (za, zb))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, -3.0 * a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_under_loss_scaler_has_finite_gradients(backend):
    """GradScaler's initial scale, 65,536, is inf in fp16: the stored gradient is multiplied in
    fp32 and rounded once, so the scaled gradient stays finite where it fits."""
    name, device = backend
    za, zb = (t.requires_grad_(True) for t in _inputs(32, 48, torch.float16, device))
    loss = sslkern.cross_correlation_loss(za, zb, backend=name)
    ga, gb = torch.autograd.grad(loss * 65536.0, (za, zb))
    assert bool(torch.isfinite(ga).all() and torch.isfinite(gb).all())
    ref = _oracle(za.detach().cpu(), zb.detach().cpu())
    err = float((ga.double().cpu() / 65536.0 - ref[1]).abs().max() / ref[1].abs().max())
    assert err < 2e-3


# ---------------------------------------------------------------------------------------
# The public code: facebookresearch/barlowtwins, lightly, solo-learn
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", [(64, 256), (256, 64)])
def test_equals_official_barlowtwins(backend, n, d):
    """barlowtwins main.py BarlowTwins.forward (one process: its all-reduce is the identity), λ =
    0.0051, loss and gradients w.r.t. both projections, to fp32 rounding."""
    name, device = backend
    if name == "triton" and not ON_GPU:
        n, d = (24, 40) if n < d else (40, 24)
    za, zb = _inputs(n, d, device=device)
    want = _run(lambda a, b: barlowtwins_forward(a, b, 0.0051, n), za, zb)
    got = _run(sslkern.cross_correlation_loss, za, zb, lambd=0.0051, backend=name)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=2e-5)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=2e-6 * float(w.abs().max()), rtol=1e-4)
    crit = sslkern.nn.BarlowTwinsLoss()  # the module: the official defaults
    torch.testing.assert_close(crit(za, zb), want[0], atol=1e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_lightly_barlow_twins_loss(backend):
    """lightly BarlowTwinsLoss (λ 5e-3, the batch's own statistics), one process."""
    lightly_loss = pytest.importorskip("lightly.loss")
    name, device = backend
    n, d = (32, 48) if name == "triton" and not ON_GPU else (128, 512)
    za, zb = _inputs(n, d, device=device)
    want = _run(lambda a, b: lightly_loss.BarlowTwinsLoss()(a, b), za, zb)
    got = _run(sslkern.cross_correlation_loss, za, zb, lambd=5e-3, backend=name)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=2e-5)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=2e-6 * float(w.abs().max()), rtol=1e-4)
    crit = sslkern.nn.BarlowTwinsLoss(5e-3, statistics="local")
    torch.testing.assert_close(crit(za, zb), want[0], atol=1e-5, rtol=2e-5)


def test_equals_solo_learn_barlow_loss_func():
    """solo-learn barlow_loss_func(lamb=5e-3, scale_loss=0.025) = scale=0.025, lambd=5e-3."""
    za, zb = _inputs(96, 160)
    want = _run(solo_barlow_loss_func, za, zb)
    got = _run(sslkern.cross_correlation_loss, za, zb, lambd=5e-3, scale=0.025)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=2e-5)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=2e-6 * float(w.abs().max()), rtol=1e-4)


def test_identical_views_diagonal_is_var_over_var_plus_eps():
    """With z_b = z_a, C_ii = σ²/(σ² + eps), not 1 (the official code's BatchNorm eps)."""
    z = torch.randn(50, 8, dtype=torch.float64) * torch.tensor([1e-3, 1e-2, 0.1, 1, 2, 3, 4, 5], dtype=torch.float64)
    _, stats = sslkern.cross_correlation_loss(z, z, return_stats=True)
    var = z.var(0, unbiased=False)
    want = var / (var + 1e-5)
    torch.testing.assert_close(stats["mean_diag"], want.mean())
    torch.testing.assert_close(stats["on_diag"], (1 - want).square().sum())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_stats_and_rank_floor(backend):
    n, d = 16, 40
    za, zb = _inputs(n, d, torch.float64)
    loss, st = sslkern.cross_correlation_loss(za, zb, 0.01, return_stats=True, backend=backend)
    ha = torch.nn.functional.batch_norm(za, None, None, training=True)
    hb = torch.nn.functional.batch_norm(zb, None, None, training=True)
    c = ha.T @ hb / n
    off = c.square().sum() - c.diagonal().square().sum()
    torch.testing.assert_close(st["off_diag"], off)
    torch.testing.assert_close(st["mean_diag"], c.diagonal().mean())
    torch.testing.assert_close(loss, st["on_diag"] + 0.01 * st["off_diag"])
    # the floor is a true lower bound (rank C <= N - 1), reached by no real batch but approached
    tr, tr2 = c.diagonal().sum(), c.diagonal().square().sum()
    torch.testing.assert_close(st["off_diag_floor"], tr * tr / (n - 1) - tr2)
    assert float(st["off_diag"]) >= float(st["off_diag_floor"])
    # identical whitened views (C = projection of rank N - 1 with C_ii = 1 up to eps): at the floor
    q, _ = torch.linalg.qr(torch.randn(d, n - 1, dtype=torch.float64))
    u = torch.randn(n, n - 1, dtype=torch.float64)
    u = u - u.mean(0)
    w, _ = torch.linalg.qr(u)  # orthonormal centred columns
    z = w @ q.T * n ** 0.5  # ZᵀZ/N = Q Qᵀ: a projection, C_ii = ‖q_i‖² (not 1), ‖C‖² = tr C
    _, st = sslkern.cross_correlation_loss(z, z, eps=1e-12, return_stats=True, backend=backend)
    assert float(st["off_diag"]) >= float(st["off_diag_floor"]) - 1e-9


# ---------------------------------------------------------------------------------------
# Rows of a gathered batch (what sslkern.nn.BarlowTwinsLoss computes on each rank)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "reference"] + [p for p in BACKENDS if p.values[0][0] == "triton"])
@pytest.mark.parametrize("method", ["gram", "tiled"])
def test_rows_shares_and_gradients(backend, method):
    name, device = backend if isinstance(backend, tuple) else (backend, "cpu")
    n, d, world = 24, 30, 3
    za, zb = _inputs(n, d, device=device)
    loss, ga, gb = _run(sslkern.cross_correlation_loss, za, zb, lambd=0.02, method=method, backend=name)
    m = n // world
    op = torch.ops.sslkern.cross_correlation_loss
    # global statistics: G rows + column sums, summed over "ranks", finished as the module does
    outs = [op(za, zb, 0.02, 1.0, 1e-5, 1, r * m, (r + 1) * m, False, method, True, True, name) for r in range(world)]
    torch.testing.assert_close(sum(o[0] for o in outs), loss, atol=1e-5, rtol=1e-5)
    full_sq = op(za, zb, 0.02, 1.0, 1e-5, 1, 0, n, True, method, False, False, name)[3][1]
    torch.testing.assert_close(sum(o[3][1] for o in outs), full_sq, atol=1e-4, rtol=1e-5)  # shares of ‖C‖²
    sums = sum(o[4][:4] for o in outs) / n
    for r, o in enumerate(outs):
        mean_a, rstd_a, mean_b, rstd_b = o[4][4:]
        ha = (za[r * m:(r + 1) * m] - mean_a) * rstd_a
        hb = (zb[r * m:(r + 1) * m] - mean_b) * rstd_b
        dza = rstd_a * (o[1] - sums[0] - ha * sums[1])
        dzb = rstd_b * (o[2] - sums[2] - hb * sums[3])
        torch.testing.assert_close(dza, ga[r * m:(r + 1) * m], atol=3e-6 * float(ga.abs().max()), rtol=1e-4)
        torch.testing.assert_close(dzb, gb[r * m:(r + 1) * m], atol=3e-6 * float(gb.abs().max()), rtol=1e-4)
    # local statistics (groups = ranks): each rank's rows finished by the op itself
    loss_l, ga_l, gb_l = _run(sslkern.cross_correlation_loss, za, zb, lambd=0.02, groups=world, method=method,
                              backend=name)
    outs = [op(za, zb, 0.02, 1.0, 1e-5, world, r * m, (r + 1) * m, True, method, True, True, name) for r in range(world)]
    torch.testing.assert_close(sum(o[0] for o in outs), loss_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([o[1] for o in outs]), ga_l, atol=3e-6 * float(ga_l.abs().max()), rtol=1e-4)
    torch.testing.assert_close(torch.cat([o[2] for o in outs]), gb_l, atol=3e-6 * float(gb_l.abs().max()), rtol=1e-4)


def test_rows_call_is_not_differentiable():
    za, zb = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    loss = torch.ops.sslkern.cross_correlation_loss(za, zb, 0.01, 1.0, 1e-5, 1, 0, 4, False, "gram", True, True, "")[0]
    with pytest.raises(RuntimeError, match="backward through a call that computed no gradient"):
        loss.backward()


# ---------------------------------------------------------------------------------------
# Memory: no (D, D) tensor
# ---------------------------------------------------------------------------------------
def _allocations(fn):
    """(start, bytes) of every allocation (> 0) and free (< 0) made by fn, in time order."""
    from torch.profiler import ProfilerActivity, profile

    with sslkern.cpu_cache_disabled(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def _peak_bytes(fn):
    live = peak = 0
    for _, nb in _allocations(fn):
        live += nb
        peak = max(peak, live)
    return peak


def largest_allocation(fn):
    return max(nb for _, nb in _allocations(fn))


@pytest.mark.parametrize("n,d,method", [(64, 2048, "gram"), (2100, 2048, "tiled")])
def test_cpu_extra_memory_is_not_d_by_d(n, d, method):
    za, zb = (t.requires_grad_(True) for t in _inputs(n, d))
    peak = _peak_bytes(lambda: sslkern.cross_correlation_loss(za, zb, method=method, backend="cpu").backward())
    # the (D, D) matrix alone would be D²·4 = 16 MiB; what is allowed: O(N·D) (standardised copies,
    # P, Q, gradients) and a (512, D) strip or (N, N) Gram matrices
    assert peak < 6 * n * d * 4 + 512 * d * 4 + 2 * n * n * 4 + (1 << 20), peak
    if n < d:
        assert peak < d * d * 4 / 2, peak


@pytest.mark.parametrize("backend,fits", [("cpu", True), ("reference", False)])
def test_tiled_form_allocates_nothing_of_size_d_by_d(backend, fits):
    """N < D with the tiled form: every buffer is (N, D), a (512, D) strip or smaller, so no
    single allocation reaches D²·4 bytes — the eager reference's C does (the check can fail)."""
    n, d = 1000, 2048
    za, zb = (t.requires_grad_(True) for t in _inputs(n, d))
    big = largest_allocation(lambda: sslkern.cross_correlation_loss(za, zb, method="tiled", backend=backend).backward())
    assert (big < d * d * 4) == fits, big


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def _pair(n=6, d=4, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda a, b: sslkern.cross_correlation_loss(a, b[:, :3]), ValueError, r"z_b expected shape \(6, 4\) \(z_a's shape\), got \(6, 3\)"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b[:5]), ValueError, r"z_b expected shape \(6, 4\)"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b.double()), TypeError, r"z_b expected dtype float32 \(z_a's dtype\)"),
    (lambda a, b: sslkern.cross_correlation_loss(a.long(), b), TypeError, "z_a expected dtype in"),
    (lambda a, b: sslkern.cross_correlation_loss(a[0], b), ValueError, "z_a expected 2 dims"),
    (lambda a, b: sslkern.cross_correlation_loss(a[:1], b[:1]), ValueError, "z_a expected at least 2 rows"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b.to("meta")), ValueError, "z_b expected to be on cpu"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b, groups=4), ValueError, "groups expected a divisor of N = 6"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b, groups=6), ValueError, "at least 2 rows per group"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b, groups=2.0), TypeError, "groups expected an int"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b, method="dense"), ValueError, "method must be one of"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b, eps=0.0), ValueError, r"eps must be in \(0.0, inf\], got 0.0"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b, float("nan")), ValueError, "lambd expected a finite number, got nan"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b, torch.tensor(0.1)), TypeError, "lambd expected a real number, got Tensor"),
    (lambda a, b: sslkern.cross_correlation_loss(a, b, scale=float("inf")), ValueError, "scale expected a finite number, got inf"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_pair())


def test_rows_arguments_checked():
    """The callers' check of a rows call (the public function and sslkern.nn.BarlowTwinsLoss)."""
    from sslkern.ops.cross_correlation_loss import check_rows

    with pytest.raises(ValueError, match=r"rows expected 0 <= row0 < row1 <= N = 12, got \[5, 5\)"):
        check_rows("op", 12, 5, 5, 1, False)
    with pytest.raises(ValueError, match="finish=True expected rows .* whole groups of 4 rows"):
        check_rows("op", 12, 2, 8, 3, True)
    with pytest.raises(ValueError, match="finish=False expected groups = 1"):
        check_rows("op", 12, 0, 4, 3, False)
    check_rows("op", 12, 4, 8, 3, True)


def test_cpu_kernel_checks_direct_calls():
    a, b = _pair(12, 4)
    k = torch.ops.sslkern_C.cross_correlation_loss_cpu
    with pytest.raises(RuntimeError, match="one shape"):
        k(a, b[:, :3], 0.01, 1.0, 1e-5, 1, 0, 12, True, "gram", True, True)
    with pytest.raises(RuntimeError, match="groups expected a divisor"):
        k(a, b, 0.01, 1.0, 1e-5, 5, 0, 12, True, "gram", True, True)
    with pytest.raises(RuntimeError, match="rows expected"):
        k(a, b, 0.01, 1.0, 1e-5, 1, 0, 13, True, "gram", True, True)
    with pytest.raises(RuntimeError, match="method expected 'gram' or 'tiled'"):
        k(a, b, 0.01, 1.0, 1e-5, 1, 0, 12, True, "auto", True, True)
    with pytest.raises(RuntimeError, match="at least 2 rows"):
        k(a[:1], b[:1], 0.01, 1.0, 1e-5, 1, 0, 1, True, "gram", True, True)


def test_triton_rejects_fp64():
    if not dispatch.usable("triton", torch.device("cuda" if ON_GPU else "cpu"))[0]:
        pytest.skip("triton backend not usable here")
    dev = "cuda" if ON_GPU else "cpu"
    a, b = (t.to(dev) for t in _pair(dtype=torch.float64))
    with pytest.raises(TypeError, match="fp64 runs on backend='cpu'"):
        sslkern.cross_correlation_loss(a, b, backend="triton")


def test_triton_strips(monkeypatch):
    """The Triton launcher's tiled form over several strips (STRIP lowered to 16)."""
    if not dispatch.usable("triton", torch.device("cuda" if ON_GPU else "cpu"))[0]:
        pytest.skip("triton backend not usable here")
    import sslkern.triton_ops.cross_correlation_loss as mod

    monkeypatch.setattr(mod, "STRIP", 16)
    za, zb = _inputs(50, 37, device="cuda" if ON_GPU else "cpu")
    got = _run(sslkern.cross_correlation_loss, za, zb, method="tiled", backend="triton")
    assert_close(got, _oracle(za.cpu(), zb.cpu()), torch.float32)
