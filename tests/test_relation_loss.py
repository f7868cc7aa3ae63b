"""relation_loss: every backend against the port of RelViT's code (``relvit_losses``: its
``encode_locations.py`` matrices, ``MultiHeadAttentionScores`` heads, ``F.cross_entropy`` /
``F.mse_loss``), and against the op's eager reference."""
import math

import pytest
import torch

import sslkern
from sslkern.ops.relation_loss import dispatch
from sslkern.reference import relation_loss as ref_relation_loss
from sslkern.reference.relation_loss import (relation_labels, relvit_angle_matrix, relvit_angle_matrix_loop,
                                             relvit_connectivity_matrix, relvit_losses)

from conftest import backend_params

BACKENDS = backend_params(dispatch)
ON_GPU = torch.cuda.is_available()

# Tolerances against RelViT's code run in fp64 on the same (upcast) inputs. fp32: summation
# order only. fp16 / bf16: the projections z·Wᵀ are torch GEMMs in the input dtype (rounded
# there, as RelViT's nn.Linear in that dtype), the scores and softmax are fp32, gradients are
# rounded to the input dtype once.
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-4),
       torch.float16: dict(atol=3e-3, rtol=2e-2), torch.bfloat16: dict(atol=2e-2, rtol=6e-2)}
TOL_LOSS = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5),
            torch.float16: dict(atol=5e-3, rtol=5e-3), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _inputs(B, side, D, dh, dtype=torch.float64, prefix=0, reg_dim=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    N = side * side
    z = torch.randn(B, prefix + N, D, generator=g, dtype=torch.float64)
    wq = torch.randn(9, dh, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    wk = torch.randn(9, dh, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    regs = None
    if reg_dim:
        regs = [torch.randn(1, reg_dim, D, generator=g, dtype=torch.float64) / math.sqrt(D) for _ in range(4)]
    perms = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return cast(z), cast(wq), cast(wk), (None if regs is None else [cast(r) for r in regs]), perms.to(device)


def _run(fn, z, wq, wk, regs):
    """(total, relation, distance, angle, accuracy) and grads to z, wq, wk (+ the regression weights)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in [z, wq, wk] + (regs or [])]
    out = fn(*leaves)
    grads = torch.autograd.grad(out[0], leaves)
    return [None if v is None else v.detach() for v in out], grads


def _ours(backend, perms, smooth, prefix):
    def f(z, wq, wk, *regs):
        r = sslkern.relation_loss(z, wq, wk, perms, distance=tuple(regs[:2]) if regs else None,
                                  angle=tuple(regs[2:]) if regs else None, label_smoothing=smooth,
                                  num_prefix_tokens=prefix, backend=backend)
        return r.loss, r.relation, r.distance, r.angle, r.accuracy
    return f


def _relvit(perms, side, smooth, prefix):
    def f(z, wq, wk, *regs):
        o = relvit_losses(z[:, prefix:], wq, wk, perms.cpu(), side, regs[:2] if regs else None,
                          regs[2:] if regs else None, smooth)
        total = o["rel"] + (o["dist"] + o["angle"] if regs else 0)
        return total, o["rel"], o.get("dist"), o.get("angle"), o["acc"]
    return f


def _skip_unsupported(name, dtype):
    if name == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes fp32/fp16/bf16 (fp64 runs on cpu/reference)")


# ---------------------------------------------------------------------------------------
# RelViT's matrices
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [2, 3, 4, 7, 14])
def test_in_kernel_labels_are_relvits_connectivity_matrix(side):
    assert torch.equal(relation_labels(torch.arange(side * side)[None], side)[0], relvit_connectivity_matrix(side))


@pytest.mark.parametrize("side", [2, 3, 4, 5])
def test_vectorised_angle_matrix_is_relvits_loop(side):
    assert torch.equal(relvit_angle_matrix(side), relvit_angle_matrix_loop(side))


# ---------------------------------------------------------------------------------------
# Every backend vs RelViT's code
# ---------------------------------------------------------------------------------------
# (B, side, D, dh, prefix, regression width, smoothing): odd sizes; side 7 → N = 49 (~50),
# 14 → 196 (+1 CLS = 197 tokens); D odd; the interpreter gets small ones
CPU_CASES = [(1, 2, 3, 1, 0, None, 0.0), (3, 5, 37, 4, 0, 9, 0.0), (2, 7, 33, 3, 1, None, 0.1),
             (2, 14, 45, 5, 1, 45, 0.0), (5, 6, 19, 2, 0, 19, 0.2)]
TRITON_CASES = [(1, 2, 3, 1, 0, None, 0.0), (2, 5, 13, 4, 1, 7, 0.1), (1, 7, 9, 17, 0, 21, 0.0)]


def _case_params():
    out = []
    for p in BACKENDS:
        cases = TRITON_CASES if p.values[0][0] == "triton" and not ON_GPU else CPU_CASES
        out += [pytest.param(p.values[0], c, marks=p.marks, id=f"{p.id}-{c}") for c in cases]
    return out


@pytest.mark.parametrize("backend, case", _case_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_relvit(backend, case, dtype):
    name, device = backend
    _skip_unsupported(name, dtype)
    B, side, D, dh, prefix, reg, smooth = case
    z, wq, wk, regs, perms = _inputs(B, side, D, dh, dtype, prefix, reg, device=device)
    got, g_got = _run(_ours(name, perms, smooth, prefix), z, wq, wk, regs)
    want, g_want = _run(_relvit(perms, side, smooth, prefix), z.double(), wq.double(), wk.double(),
                        None if regs is None else [r.double() for r in regs])
    for n, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            tol = dict(atol=1e-6, rtol=0) if n == 4 else TOL_LOSS[dtype]  # accuracy: RelViT's is an fp32 mean
            torch.testing.assert_close(a.double(), b.double(), **tol)
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=lambda m: f"grad {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    name, device = backend
    B, side, D, dh, reg = (2, 5, 24, 4, 8) if name == "triton" and not ON_GPU else (3, 7, 48, 5, 48)
    z, wq, wk, regs, perms = _inputs(B, side, D, dh, dtype, 0, reg, seed=3, device=device)
    got, g_got = _run(_ours(name, perms, 0.0, 0), z, wq, wk, regs)
    # the oracle on the same rounded inputs, in fp64 (the projections there are exact)
    want, g_want = _run(_relvit(perms, side, 0.0, 0), z.double(), wq.double(), wk.double(),
                        [r.double() for r in regs])
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a.double(), b.double(), **TOL_LOSS[dtype])
    for a, b in zip(g_got, g_want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_subset_of_cells_and_rectangular_grid(backend):
    """N = 37 tokens drawn from a 5 x 8 grid (not every cell present, not square): vs the op's reference."""
    name, device = backend
    g = torch.Generator().manual_seed(5)
    B, N, D, dh = 3, 37, 21, 3
    z = torch.randn(B, N, D, generator=g).to(device)
    wq, wk = (torch.randn(9, dh, D, generator=g).to(device) for _ in range(2))
    pos = torch.stack([torch.randperm(40, generator=g)[:N] for _ in range(B)]).to(device)
    got, g_got = _run(lambda *t: sslkern.relation_loss(*t, pos, grid=(5, 8), backend=name), z, wq, wk, None)
    want, g_want = _run(lambda *t: ref_relation_loss(*t, pos, grid=(5, 8)), z, wq, wk, None)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, **TOL_LOSS[torch.float32])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_accuracy_counts_argmax_hits():
    """All scores 0: the argmax is the first class (LU, as torch.argmax breaks ties), the loss log 9."""
    z, wq, wk, _, perms = _inputs(2, 4, 8, 3, torch.float32)
    wq, wk = torch.zeros_like(wq), torch.zeros_like(wk)
    lu = (relation_labels(perms, 4) == 0).float().mean()
    assert 0 < float(lu) < 0.5
    for backend in ("cpu", "reference"):
        r = sslkern.relation_loss(z, wq, wk, perms, backend=backend)
        assert float(r.accuracy) == pytest.approx(float(lu), abs=1e-6)
        torch.testing.assert_close(r.relation, torch.tensor(math.log(9.0)))


# ---------------------------------------------------------------------------------------
# gradcheck, opcheck, compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("smooth", [0.0, 0.3])
def test_gradcheck_float64(backend, smooth):
    z, wq, wk, regs, perms = _inputs(2, 3, 5, 2, torch.float64, prefix=1, reg_dim=3)
    leaves = [t.requires_grad_(True) for t in [z, wq, wk] + regs]

    def f(z, wq, wk, a, b, c, d):
        r = sslkern.relation_loss(z, wq, wk, perms, distance=(a, b), angle=(c, d), label_smoothing=smooth,
                                  num_prefix_tokens=1, backend=backend)
        return r.loss
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("regression", [False, True])
def test_opcheck(regression):
    B, N, C, dh = 2, 9, (1 if regression else 9), 3
    q = torch.randn(B, N, C * dh, requires_grad=True)
    k = torch.randn(B, N, C * dh, requires_grad=True)
    pos = torch.stack([torch.randperm(N) for _ in range(B)])
    table = torch.rand(N, N) if regression else None
    torch.library.opcheck(torch.ops.sslkern.relation_loss.default, (q, k, pos, table, 3, 9, C, 0.5, 0.1, ""))
    torch.library.opcheck(torch.ops.sslkern.relation_loss_backward.default,
                          (torch.tensor(1.5), q.detach(), k.detach(), pos, table, 3, 9, C, 0.5, 0.1, ""))


@pytest.mark.parametrize("regression", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_with_grad_op_equals_forward_and_backward(regression, backend):
    """relation_loss_with_grad (one pass) = relation_loss + relation_loss_backward(grad 1); opcheck."""
    B, N, C, dh = 3, 25, (1 if regression else 9), 5
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(B, N, C * dh, generator=g) for _ in range(2))
    pos = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    table = torch.rand(N, N, generator=g) if regression else None
    args = (q, k, pos, table, 5, 25, C, 0.4, 0.0 if regression else 0.2, backend)
    loss, acc, dq, dk = torch.ops.sslkern.relation_loss_with_grad(*args)
    loss_f, acc_f = torch.ops.sslkern.relation_loss(*args)
    dq_b, dk_b = torch.ops.sslkern.relation_loss_backward(torch.tensor(1.0), *args[:9], backend)
    torch.testing.assert_close(loss, loss_f, rtol=1e-6, atol=1e-7)
    assert float(acc) == float(acc_f)
    torch.testing.assert_close(dq, dq_b, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(dk, dk_b, rtol=1e-5, atol=1e-8)
    qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.sslkern.relation_loss_with_grad.default, (qg, kg) + args[2:])
    # the backward scales the saved gradients by the incoming one
    out = torch.ops.sslkern.relation_loss_with_grad(qg, kg, *args[2:])
    gq, gk = torch.autograd.grad(2.5 * out[0], (qg, kg))
    torch.testing.assert_close(gq, 2.5 * dq_b, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gk, 2.5 * dk_b, rtol=1e-5, atol=1e-8)


def test_no_grad_forward_takes_the_loss_only_op():
    z, wq, wk, regs, perms = _inputs(2, 4, 24, 3, torch.float32, prefix=1, reg_dim=24)
    with torch.no_grad():
        a = sslkern.relation_loss(z, wq, wk, perms, num_prefix_tokens=1)
    b = sslkern.relation_loss(z, wq.requires_grad_(True), wk, perms, num_prefix_tokens=1)
    assert b.loss.requires_grad and not a.loss.requires_grad
    torch.testing.assert_close(a.loss, b.loss.detach(), rtol=1e-6, atol=1e-7)
    assert float(a.accuracy) == float(b.accuracy)


def test_compile_fullgraph_equals_eager():
    z, wq, wk, regs, perms = _inputs(2, 4, 24, 3, torch.float32, prefix=1, reg_dim=24)
    leaves = [t.requires_grad_(True) for t in [z, wq, wk] + regs]

    def f(z, wq, wk, a, b, c, d):
        r = sslkern.relation_loss(z, wq, wk, perms, distance=(a, b), angle=(c, d), num_prefix_tokens=1)
        return r.loss, r.accuracy

    eager = f(*leaves)
    e_grads = torch.autograd.grad(eager[0], leaves)
    got = torch.compile(f, fullgraph=True)(*leaves)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
    for g, e in zip(torch.autograd.grad(got[0], leaves), e_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(sslkern._backend.cpu_dnn_linear() is None, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize("needs", ["all", "tokens", "weights", "q only"])
def test_cpu_projections_equal_linear(needs):
    """The fp32 CPU projections (oneDNN forward, MKL backward) against F.linear and its autograd:
    values and every gradient, on a sliced (non-contiguous) token tensor, for each subset of inputs
    that need a gradient, and with only q's output used (dk is None)."""
    from sslkern.ops.relation_loss import _projections
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 1 + 37, 20, generator=g)
    wq, wk = torch.randn(18, 20, generator=g), torch.randn(18, 20, generator=g)
    gq, gk = torch.randn(3, 37, 18, generator=g), torch.randn(3, 37, 18, generator=g)
    outs = {}
    for path in ("fast", "linear"):
        b = base.clone().requires_grad_(needs in ("all", "tokens", "q only"))
        a, c = wq.clone().requires_grad_(needs in ("all", "weights", "q only")), wk.clone().requires_grad_(needs != "tokens")
        z = b[:, 1:]
        q, k = _projections(z, a, c) if path == "fast" else (torch.nn.functional.linear(z, a), torch.nn.functional.linear(z, c))
        assert q.is_contiguous() and k.is_contiguous()
        leaves = [t for t in (b, a, c) if t.requires_grad]
        if needs == "q only":
            grads = torch.autograd.grad(q, leaves, gq, allow_unused=True)
        else:
            grads = torch.autograd.grad([q, k], leaves, [gq, gk])
        outs[path] = (q.detach(), k.detach()) + tuple(grads)
    for x, y in zip(outs["fast"], outs["linear"]):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_gradient_of_a_scaled_loss_and_a_retained_graph():
    """d(3·loss) = 3·d(loss) (the saved gradients scaled), and with a retained graph two backward
    passes give the same gradients (the saved ones returned as they are for grad 1 are not
    accumulated into)."""
    z, wq, wk, regs, perms = _inputs(2, 5, 24, 3, torch.float32, reg_dim=24)
    leaves = [t.requires_grad_(True) for t in [z, wq, wk] + regs]
    loss = sslkern.relation_loss(z, wq, wk, perms, distance=tuple(regs[:2]), angle=tuple(regs[2:])).loss
    once = torch.autograd.grad(loss, leaves, retain_graph=True)
    twice = torch.autograd.grad(loss, leaves, retain_graph=True)
    tripled = torch.autograd.grad(3 * loss, leaves)
    for a, b, c in zip(once, twice, tripled):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(c, 3 * a, atol=1e-7, rtol=1e-5)


def test_first_call_does_not_draw_from_the_random_stream():
    """The one-time oneDNN probe (sslkern._backend.cpu_dnn_linear) uses fixed values: a relation
    loss in between leaves torch's global generator where it was."""
    sslkern._backend._DNN_LINEAR.clear()
    z, wq, wk, regs, perms = _inputs(2, 4, 24, 3, torch.float32)
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    sslkern.relation_loss(z, wq, wk, perms)
    torch.testing.assert_close(torch.rand(3), a, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def _zw(B=2, N=16, D=8, dh=2, dtype=torch.float32):
    return torch.randn(B, N, D, dtype=dtype), torch.randn(9, dh, D, dtype=dtype), torch.randn(9, dh, D, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda z, q, k: sslkern.relation_loss(z[0], q, k), ValueError, "tokens expected 3 dims"),
    (lambda z, q, k: sslkern.relation_loss(z.long(), q, k), TypeError, "tokens expected dtype"),
    (lambda z, q, k: sslkern.relation_loss(z, q[:8], k), ValueError, r"wq expected shape \(9, d_head, 8\)"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k[..., :4]), ValueError, r"wk expected shape \(9, d_head, 8\)"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k.double()), TypeError, "wk expected dtype float32"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k[:, :1]), ValueError, r"wk expected shape \(9, 2, 8\)"),
    (lambda z, q, k: sslkern.relation_loss(z[:, :15], q, k), ValueError, "grid expected when N = 15"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, grid=(4, 5)), ValueError, "positions expected when N = 16"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, torch.zeros(2, 15, dtype=torch.long)), ValueError,
     r"positions expected shape \(2, 16\)"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, torch.zeros(2, 16)), TypeError, "positions expected dtype"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, torch.full((2, 16), 16)), IndexError,
     r"positions expected values in \[0, 16\)"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, num_prefix_tokens=16), ValueError, "tokens expected"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, distance=q), TypeError, "distance expected a"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, angle=(q, k)), ValueError, "angle expected two weights"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, grid=(2, 8), distance=(q[:1], k[:1])), ValueError,
     "distance expected a square grid"),
    (lambda z, q, k: sslkern.relation_loss(z, q, k, grid="4"), TypeError, "grid expected an int"),
])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_input_names_the_argument(call, exc, match, backend):
    with sslkern.use_backend(backend):
        with pytest.raises(exc, match="sslkern.relation_loss: " + match):
            call(*_zw())
