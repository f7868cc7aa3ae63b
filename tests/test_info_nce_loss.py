"""info_nce_loss: every backend against the eager reference, MoCo v3's contrastive loss and
lightly's NTXentLoss."""
import math

import pytest
import torch
import torch.nn.functional as F

import sslkern
from sslkern.ops.info_nce_loss import dispatch
from sslkern.reference import info_nce_loss as ref_info_nce_loss

from conftest import backend_params

BACKENDS = backend_params(dispatch)
ON_GPU = torch.cuda.is_available()

# Tolerances vs the reference run in fp64 on the same (upcast) inputs. fp32: summation order
# only. fp16 / bf16: the inputs are normalized in their own dtype (as the public code does),
# the logits and softmax are fp32, and the gradients are rounded to the input dtype once.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.float16: dict(atol=2e-3, rtol=5e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=2e-2)}
TOL_LOSS = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
            torch.float16: dict(atol=3e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


def _skip_unsupported(name, dtype):
    if name == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes fp32/fp16/bf16 (fp64 runs on cpu/reference)")
    if name == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; bf16 Triton runs only on a GPU")


def _run(fn, q, k, **kw):
    """loss, dq, dk of fn on fresh leaf copies of q, k."""
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    loss = fn(q, k, **kw)
    dq, dk = torch.autograd.grad(loss, (q, k))
    return loss.detach(), dq, dk


def _oracle(q, k, **kw):
    return _run(ref_info_nce_loss, q.double(), k.double(), **kw)


def assert_matches(got, want, dtype):
    loss, dq, dk = got
    loss_r, dq_r, dk_r = want
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dq.dtype == dtype and dk.dtype == dtype
    torch.testing.assert_close(loss.double(), loss_r, **TOL_LOSS[dtype])
    torch.testing.assert_close(dq.double(), dq_r, **TOL[dtype], msg=lambda m: f"dq: {m}")
    torch.testing.assert_close(dk.double(), dk_r, **TOL[dtype], msg=lambda m: f"dk: {m}")


# (N, M, D, form): odd sizes, N != M, ViT-ish token counts; the interpreter gets small ones
CPU_CASES = [(1, 1, 3, "diag"), (37, 50, 19, "diag"), (50, 37, 32, "pos"), (197, 197, 64, "diag"),
             (64, 192, 48, "offset"), (37, 301, 256, "exclude"), (50, 50, 33, "nt_xent"), (300, 517, 17, "pos")]
TRITON_CASES = [(1, 1, 3, "diag"), (37, 50, 19, "diag"), (33, 20, 40, "pos"), (20, 60, 72, "offset"),
                (19, 70, 16, "exclude"), (21, 21, 24, "nt_xent"), (9, 13, 300, "diag")]


def _form_kwargs(form, N, M, device):
    if form == "diag":
        return {}
    if form == "pos":
        return dict(pos=torch.randint(0, M, (N,), device=device))
    if form == "offset":
        return dict(pos_offset=M - N if M - N < N else N)  # e.g. rank 1 of 3
    if form == "exclude":
        pos = torch.randint(0, M, (N,), device=device)
        exclude = (pos + torch.randint(1, M, (N,), device=device)) % M
        exclude[::3] = -1
        return dict(pos=pos, exclude=exclude)
    if form == "nt_xent":
        return dict(nt_xent=True)
    raise ValueError(form)


def _case_params():
    out = []
    for p in BACKENDS:
        name = p.values[0][0]
        cases = CPU_CASES if name == "cpu" or ON_GPU else TRITON_CASES
        out += [pytest.param(p.values[0], c, id=f"{p.id}-N{c[0]}-M{c[1]}-D{c[2]}-{c[3]}", marks=p.marks) for c in cases]
    return out


@pytest.mark.parametrize("backend,case", _case_params())
@pytest.mark.parametrize("temperature", [0.2, 0.05])
def test_backend_matches_reference(backend, case, temperature):
    name, device = backend
    N, M, D, form = case
    kw = _form_kwargs(form, N, M, device)
    q = torch.randn(N, D, device=device)
    k = torch.randn(N if form == "nt_xent" else M, D, device=device)
    got = _run(sslkern.info_nce_loss, q, k, temperature=temperature, backend=name, **kw)
    assert_matches(got, _oracle(q, k, temperature=temperature, **kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("form", ["diag", "nt_xent", "exclude"])
def test_dtypes(backend, dtype, form):
    name, device = backend
    _skip_unsupported(name, dtype)
    N, M, D = (197, 260, 64) if name == "cpu" or ON_GPU else (26, 40, 32)
    kw = _form_kwargs(form, N, M, device)
    q = torch.randn(N, D, device=device, dtype=dtype)
    k = torch.randn(N if form == "nt_xent" else M, D, device=device, dtype=dtype)
    got = _run(sslkern.info_nce_loss, q, k, temperature=0.1, backend=name, **kw)
    # the oracle sees what the kernel sees: the inputs normalized in their own dtype
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    want_n = _run(ref_info_nce_loss, qn.double(), kn.double(), temperature=0.1, normalize=False, **kw)
    qd = q.double().requires_grad_(True)
    kd = k.double().requires_grad_(True)
    # chain rule through the normalization in fp64
    nq, nk = F.normalize(qd, dim=1), F.normalize(kd, dim=1)
    dq, dk = torch.autograd.grad((nq * want_n[1]).sum() + (nk * want_n[2]).sum(), (qd, kd))
    assert_matches(got, (want_n[0], dq, dk), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalized_inputs_and_grad_of_one_side(backend):
    """normalize=False on raw embeddings of norm ~10 (logits up to ±500 at τ = 0.1: the max is
    subtracted), and keys without gradient (MoCo: momentum encoder) — only dq is computed."""
    name, device = backend
    N, M, D = (37, 64, 24)
    q = torch.randn(N, D, device=device) * 2
    k = torch.randn(M, D, device=device) * 2
    kw = dict(temperature=0.1, normalize=False)
    qq = q.clone().requires_grad_(True)
    loss = sslkern.info_nce_loss(qq, k, backend=name, **kw)
    (dq,) = torch.autograd.grad(loss, qq)
    want = _oracle(q, k, **kw)
    # fp32 logits of ~|500| carry ~3e-5 absolute rounding, i.e. a relative error of that size in P
    torch.testing.assert_close(loss.double(), want[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dq.double(), want[1], atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(sslkern.info_nce_loss(q, k, backend=name, **kw).double(), want[0],
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_incoming_gradient(backend):
    name, device = backend
    q = torch.randn(20, 16, device=device, requires_grad=True)
    k = torch.randn(30, 16, device=device, requires_grad=True)
    loss = sslkern.info_nce_loss(q, k, 0.2, backend=name)
    g1 = torch.autograd.grad(loss, (q, k), retain_graph=True)
    g3 = torch.autograd.grad(loss * -3.0, (q, k))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, -3.0 * a, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# The public code: MoCo v3 and lightly
# ---------------------------------------------------------------------------------------
def moco_v3_contrastive_loss(q, k, T, rank=0):
    """Test-only transcription of MoCo v3 moco/builder.py (MoCo.contrastive_loss / ctr_loss):
    normalize, einsum('nc,mc->nm') / T, CrossEntropyLoss with labels arange(N) + N·rank, × 2T.
    (k stands for concat_all_gather(k): the keys of every rank, rank-major.)"""
    q = torch.nn.functional.normalize(q, dim=1)
    k = torch.nn.functional.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", [q, k]) / T
    N = logits.shape[0]
    labels = torch.arange(N, dtype=torch.long) + N * rank
    return torch.nn.CrossEntropyLoss()(logits, labels) * (2 * T)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 3)])
def test_equals_moco_v3_contrastive_loss(backend, rank, world):
    """MoCo v3: symmetrized loss ctr(q1, k2) + ctr(q2, k1) at τ = 0.2, keys from the momentum
    encoder (no gradient), gathered over `world` ranks; = 2τ·(sum of two info_nce_loss calls)."""
    name, device = backend
    N, D, T = (24, 32, 0.2) if name == "triton" and not ON_GPU else (64, 256, 0.2)
    q1, q2 = (torch.randn(N, D, device=device, requires_grad=True) for _ in range(2))
    k1, k2 = (torch.randn(world * N, D, device=device) for _ in range(2))
    want = moco_v3_contrastive_loss(q1, k2, T, rank) + moco_v3_contrastive_loss(q2, k1, T, rank)
    w1, w2 = torch.autograd.grad(want, (q1, q2))
    got = 2 * T * (sslkern.info_nce_loss(q1, k2, T, pos_offset=rank * N, backend=name)
                   + sslkern.info_nce_loss(q2, k1, T, pos_offset=rank * N, backend=name))
    g1, g2 = torch.autograd.grad(got, (q1, q2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, w1, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(g2, w2, atol=1e-6, rtol=1e-4)
    # the module, MoCo v3's scale
    crit = sslkern.nn.InfoNCELoss(T, scale=2 * T)
    if rank == 0 and world == 1:
        torch.testing.assert_close(crit(q1, k2) + crit(q2, k1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_equals_lightly_ntxent(backend, temperature):
    """SimCLR NT-Xent: lightly NTXentLoss(out0, out1) (2n views, self-similarity removed), loss
    and gradients w.r.t. both views."""
    lightly_loss = pytest.importorskip("lightly.loss")
    name, device = backend
    n, D = (21, 24) if name == "triton" and not ON_GPU else (100, 128)
    out0 = torch.randn(n, D, device=device)
    out1 = torch.randn(n, D, device=device)
    want = _run(lambda a, b: lightly_loss.NTXentLoss(temperature=temperature)(a, b), out0, out1)
    got = _run(sslkern.info_nce_loss, out0, out1, temperature=temperature, nt_xent=True, backend=name)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-4)
    crit = sslkern.nn.InfoNCELoss(temperature, nt_xent=True)
    torch.testing.assert_close(crit(out0, out1), want[0], atol=1e-5, rtol=1e-5)


def test_cross_rank_ntxent_with_pos_and_exclude_equals_lightly_gather_formula():
    """lightly NTXentLoss(gather_distributed=True) on rank r of `world`, written with pos /
    exclude: local rows cat(z0, z1) against the gathered cat(z0_all, z1_all)."""
    n, D, world, r, T = 16, 20, 3, 1, 0.3
    z0_all, z1_all = torch.randn(world * n, D), torch.randn(world * n, D)
    z0, z1 = z0_all[r * n:(r + 1) * n], z1_all[r * n:(r + 1) * n]
    # lightly's formula (ntx_ent_loss.py, gather branch): logits_00 etc. with diag_mask = eye_rank
    a0, a1, b0, b1 = (F.normalize(t, dim=1) for t in (z0, z1, z0_all, z1_all))
    diag = torch.zeros(n, world * n, dtype=torch.bool)
    diag[torch.arange(n), torch.arange(n) + r * n] = True
    l00 = (a0 @ b0.t() / T)[~diag].view(n, -1)
    l11 = (a1 @ b1.t() / T)[~diag].view(n, -1)
    logits = torch.cat([torch.cat([a0 @ b1.t() / T, l00], 1), torch.cat([a1 @ b0.t() / T, l11], 1)], 0)
    want = F.cross_entropy(logits, (torch.arange(n) + r * n).repeat(2))
    i = torch.arange(n)
    M = world * n
    pos = torch.cat([M + r * n + i, r * n + i])
    exclude = torch.cat([r * n + i, M + r * n + i])
    got = sslkern.info_nce_loss(torch.cat([z0, z1]), torch.cat([z0_all, z1_all]), T, pos=pos, exclude=exclude)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------
def test_cpu_gradient_has_no_subnormals():
    """τ = 0.01 on normalized inputs: logits span ±100, so most probabilities are below the
    float32 normal range; they must be exactly 0, not subnormal (the tile products would
    slow down on them), and the loss must still match."""
    q, k = torch.randn(64, 16), torch.randn(300, 16)
    loss, dq, dk = _run(sslkern.info_nce_loss, q, k, temperature=0.01, backend="cpu")
    tiny = torch.finfo(torch.float32).tiny
    # G itself is not returned: check the one G row-block directly through the op with D = M
    # (dq = G·K with K = identity gives G)
    eye = torch.eye(300)
    qn = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t()  # (64, 300) rows whose dots with eye are the logits
    _, g, _ = torch.ops.sslkern.info_nce_loss(qn.contiguous(), eye, torch.arange(64), None, 100.0, True, False,
                                              False, 0.0, 1.0, "cpu")
    assert bool(((g != 0) & (g.abs() < tiny)).sum() == 0)
    # the case exercises the flush: the exact G (fp64) has entries in the float32 subnormal range
    s = qn.double() * 100.0
    g_exact = torch.softmax(s, dim=1) / 64 * 100.0
    assert bool(((g_exact > 0) & (g_exact < tiny)).sum() > 100)
    want = _oracle(q, k, temperature=0.01)
    torch.testing.assert_close(loss.double(), want[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dq.double(), want[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dk.double(), want[2], atol=1e-5, rtol=1e-4)


def test_cpu_extra_memory_is_not_n_by_m():
    """The CPU kernel allocates O((N + M)·D + threads·rows·M), never the (N, M) logits."""
    from torch.profiler import ProfilerActivity, profile

    N = M = 2048
    D = 32
    q = torch.randn(N, D, requires_grad=True)
    k = torch.randn(M, D, requires_grad=True)
    with sslkern.cpu_cache_disabled(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sslkern.info_nce_loss(q, k, 0.2, backend="cpu").backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nb in events:
        live += nb
        peak = max(peak, live)
    assert peak < N * M * 4 / 2, peak  # the logits alone would be N·M·4 = 16 MiB


# ---------------------------------------------------------------------------------------
# gradcheck, opcheck, compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("form", ["diag", "exclude", "nt_xent", "pos"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(backend, form, normalize):
    N, M, D = 7, 11, 5
    kw = _form_kwargs(form, N, M, "cpu")
    q = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(N if form == "nt_xent" else M, D, dtype=torch.float64, requires_grad=True)
    f = lambda a, b: sslkern.info_nce_loss(a, b, 0.3, normalize=normalize, backend=backend, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, False)])
def test_opcheck(with_exclude, grads):
    N, M, D = 9, 13, 6
    q = torch.randn(N, D, requires_grad=grads[0])
    k = torch.randn(M, D, requires_grad=grads[1])
    pos = torch.randint(0, M, (N,))
    exclude = ((pos + 1) % M) if with_exclude else None
    torch.library.opcheck(torch.ops.sslkern.info_nce_loss.default,
                          (q, k, pos, exclude, 1 / 0.3, grads[0], grads[1], False, 0.0, 1.0, ""))


def test_compile_fullgraph_equals_eager():
    q1, q2 = (torch.randn(40, 24, requires_grad=True) for _ in range(2))
    k1, k2 = torch.randn(40, 24), torch.randn(40, 24)

    def f(q1, q2, k1, k2):  # MoCo v3 symmetrized + SimCLR on the same embeddings
        moco = sslkern.info_nce_loss(q1, k2, 0.2) + sslkern.info_nce_loss(q2, k1, 0.2)
        return moco + sslkern.info_nce_loss(q1, q2, 0.5, nt_xent=True)

    eager = f(q1, q2, k1, k2)
    e_grads = torch.autograd.grad(eager, (q1, q2))
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(q1, q2, k1, k2)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
    for g, e in zip(torch.autograd.grad(got, (q1, q2)), e_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def _qk(N=6, M=8, D=4, dtype=torch.float32):
    return torch.randn(N, D, dtype=dtype), torch.randn(M, D, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, k: sslkern.info_nce_loss(q, k[:, :3]), ValueError, r"k expected 4 columns \(q's D\), got shape \(8, 3\)"),
    (lambda q, k: sslkern.info_nce_loss(q, k.half()), TypeError, r"k expected dtype float32 \(q's dtype\)"),
    (lambda q, k: sslkern.info_nce_loss(q.long(), k), TypeError, "q expected dtype in"),
    (lambda q, k: sslkern.info_nce_loss(q[0], k), ValueError, "q expected 2 dims"),
    (lambda q, k: sslkern.info_nce_loss(q, k.to("meta")), ValueError, "k expected to be on cpu"),
    (lambda q, k: sslkern.info_nce_loss(q, k, 0.0), ValueError, r"temperature must be in \(0.0, inf\], got 0.0"),
    (lambda q, k: sslkern.info_nce_loss(q, k, -0.1), ValueError, "temperature must be in"),
    (lambda q, k: sslkern.info_nce_loss(q, k, float("inf")), ValueError, "temperature expected a finite"),
    (lambda q, k: sslkern.info_nce_loss(q, k, torch.tensor(0.1)), TypeError, "temperature expected a real number"),
    (lambda q, k: sslkern.info_nce_loss(q, k[:5]), ValueError, r"pos_offset expected in \[0, M - N\]"),
    (lambda q, k: sslkern.info_nce_loss(q, k, pos_offset=3), ValueError, r"pos_offset expected in \[0, M - N\] = \[0, 2\]"),
    (lambda q, k: sslkern.info_nce_loss(q, k, pos=torch.zeros(5, dtype=torch.long)), ValueError, r"pos expected shape \(6,\)"),
    (lambda q, k: sslkern.info_nce_loss(q, k, pos=torch.zeros(6)), TypeError, "pos expected dtype in"),
    (lambda q, k: sslkern.info_nce_loss(q, k, pos=torch.zeros(6, dtype=torch.long), pos_offset=1), ValueError,
     "pos_offset expected 0 when pos is given"),
    (lambda q, k: sslkern.info_nce_loss(q, k, exclude=torch.zeros(6)), TypeError, "exclude expected dtype in"),
    (lambda q, k: sslkern.info_nce_loss(q, k, nt_xent=True), ValueError, r"k expected shape \(6, 4\) with nt_xent"),
    (lambda q, k: sslkern.info_nce_loss(q, k[:6], nt_xent=True, pos_offset=1), ValueError, "nt_xent=True builds"),
    (lambda q, k: sslkern.info_nce_loss(q[:0], k), ValueError, "expected non-empty"),
    (lambda q, k: sslkern.info_nce_loss(q, k, pos_offset=1.0), TypeError, "pos_offset expected an int"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_qk())


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("which,value,match", [
    ("pos", 8, r"pos expected values in \[0, 8\) \(column indices of k\), got pos\[2\] = 8"),
    ("pos", -1, r"pos expected values in \[0, 8\).*got pos\[2\] = -1"),
    ("exclude", 8, r"exclude expected values in \[-1, 8\).*got exclude\[2\] = 8"),
    ("exclude", -2, r"exclude expected values in \[-1, 8\).*got exclude\[2\] = -2"),
    ("exclude", "pos", r"exclude expected a column other than the positive, got exclude\[2\] = pos\[2\] = 3"),
])
def test_index_values_out_of_range(backend, which, value, match):
    name, device = backend if isinstance(backend, tuple) else (backend, "cpu")
    q, k = (t.to(device) for t in _qk())
    pos = torch.tensor([0, 1, 3, 3, 4, 5], device=device)
    exclude = torch.full((6,), -1, device=device)
    if which == "pos":
        pos[2] = value
    else:
        exclude[2] = pos[2] if value == "pos" else value
    with pytest.raises((IndexError, RuntimeError, ValueError), match=match):
        sslkern.info_nce_loss(q, k, pos=pos, exclude=exclude, backend=name)


def test_cpu_kernel_checks_direct_calls():
    q, k = _qk()
    with pytest.raises(RuntimeError, match="k expected 4 columns"):
        torch.ops.sslkern_C.info_nce_loss_cpu(q, k[:, :3], torch.arange(6), None, 2.0, True, True, False, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"pos must be a CPU int64 tensor of shape \(6,\)"):
        torch.ops.sslkern_C.info_nce_loss_cpu(q, k, torch.arange(5), None, 2.0, True, True, False, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="temperature must be positive"):
        torch.ops.sslkern_C.info_nce_loss_cpu(q, k, torch.arange(6), None, -2.0, True, True, False, 0.0, 1.0)
    with pytest.raises(IndexError, match="pos expected values"):
        torch.ops.sslkern_C.info_nce_loss_cpu(q, k, torch.arange(6) + 5, None, 2.0, True, True, False, 0.0, 1.0)


# ---------------------------------------------------------------------------------------
# The tied form (NT-Xent, k is q): the CPU kernel walks the (I, J >= I) tiles of the
# symmetric logits; 256-row blocks, so 2n = 260 (a 4-row last block) and 601 (3 blocks)
# cover partial tiles, the diagonal and off-diagonal ones, and 1-3 threads the task split
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,D", [(130, 17), (300, 64), (7, 5)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tied_ntxent_cpu_tiles_and_threads(n, D, threads, dtype):
    q = torch.randn(n, D).to(dtype)
    k = torch.randn(n, D).to(dtype)
    want = _oracle(q, k, temperature=0.1, nt_xent=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run(sslkern.info_nce_loss, q, k, temperature=0.1, nt_xent=True, backend="cpu")
    finally:
        torch.set_num_threads(prev)
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_tied_op_contract(backend, with_exclude):
    """tied=True: dq is the whole gradient G·Z + Gᵀ·Z of loss(Z, Z), dk is empty (any pos,
    own column excluded or nothing excluded)."""
    N, D = 301, 9
    z = F.normalize(torch.randn(N, D, dtype=torch.float64), dim=1)
    pos = torch.randint(0, N, (N,))
    exclude = torch.arange(N) if with_exclude else None
    if with_exclude:
        pos = torch.where(pos == exclude, (pos + 1) % N, pos)
    loss, dz, dk = torch.ops.sslkern.info_nce_loss(z, z, pos, exclude, 4.0, True, True, True, 0.0, 1.0, backend)
    assert dk.numel() == 0
    zl = z.clone().requires_grad_(True)
    s = zl @ zl.t() * 4.0
    if with_exclude:
        s = s.masked_fill(torch.eye(N, dtype=torch.bool), float("-inf"))
    want = F.cross_entropy(s, pos)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dz, zl.grad, atol=1e-12, rtol=1e-10)
    loss_only, dz0, _ = torch.ops.sslkern.info_nce_loss(z, z, pos, exclude, 4.0, False, False, True, 0.0, 1.0, backend)
    assert dz0.numel() == 0
    torch.testing.assert_close(loss_only, want.detach(), atol=1e-12, rtol=1e-12)


def test_tied_opcheck_and_bad_input():
    z = torch.randn(10, 6, requires_grad=True)
    pos, excl = (torch.arange(10) + 5) % 10, torch.arange(10)
    torch.library.opcheck(torch.ops.sslkern.info_nce_loss.default, (z, z, pos, excl, 2.0, True, True, True, 0.0, 1.0, ""))
    with pytest.raises(RuntimeError, match="tied=True expected k to be q itself"):
        torch.ops.sslkern_C.info_nce_loss_cpu(z.detach(), z.detach()[:, :5], pos, excl, 2.0, True, True, True, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"tied=True expected exclude\[i\] = i"):
        torch.ops.sslkern_C.info_nce_loss_cpu(z.detach(), z.detach(), pos, (excl + 1) % 10, 2.0, True, True, True, 0.0, 1.0)
    with pytest.raises(ValueError, match="tied=True expected k to be q itself and grad_q == grad_k"):
        torch.ops.sslkern.info_nce_loss(z, z, pos, excl, 2.0, True, False, True, 0.0, 1.0, "")


def test_tied_cpu_memory_and_no_subnormals():
    """NT-Xent on the tied path: no (2n, 2n) logits, and no subnormal in the gradient at a
    small temperature (most probabilities underflow)."""
    from torch.profiler import ProfilerActivity, profile

    n, D = 1024, 32
    q = torch.randn(n, D, requires_grad=True)
    k = torch.randn(n, D, requires_grad=True)
    with sslkern.cpu_cache_disabled(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = sslkern.info_nce_loss(q, k, 0.01, nt_xent=True, backend="cpu")
        loss.backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nb in events:
        live += nb
        peak = max(peak, live)
    assert peak < (2 * n) ** 2 * 4 / 2, peak  # the logits alone would be (2n)²·4 = 16 MiB
    z = F.normalize(torch.cat([q, k]).detach(), dim=1)
    pos, excl = (torch.arange(2 * n) + n) % (2 * n), torch.arange(2 * n)
    _, dz, _ = torch.ops.sslkern.info_nce_loss(z, z, pos, excl, 100.0, True, True, True, 0.0, 1.0, "cpu")
    tiny = (dz != 0) & (dz.abs() < torch.finfo(torch.float32).tiny)
    assert not bool(tiny.any())


def test_triton_rejects_fp64():
    if not dispatch.usable("triton", torch.device("cuda" if ON_GPU else "cpu"))[0]:
        pytest.skip("triton backend not usable here")
    dev = "cuda" if ON_GPU else "cpu"
    q, k = (t.to(dev) for t in _qk(dtype=torch.float64))
    with pytest.raises(TypeError, match="fp64 runs on backend='cpu'"):
        sslkern.info_nce_loss(q, k, backend="triton")


# ---------------------------------------------------------------------------------------
# Triton: every configuration the launcher can pick is an AOT_CONFIGS entry
# ---------------------------------------------------------------------------------------
class _RecordingKernel:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, dict(kwargs)))
        return launch


@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.float16, False),
                                        (torch.bfloat16, False)])
@pytest.mark.parametrize("D", [3, 64, 100, 128, 256, 600])
def test_triton_launch_configs_are_in_aot_configs(monkeypatch, dtype, tf32, D):
    pytest.importorskip("triton")
    from sslkern.triton_ops import info_nce_loss as tn

    calls = []
    for name in ("info_nce_fwd_kernel", "info_nce_bwd_dq_kernel", "info_nce_bwd_dk_kernel"):
        monkeypatch.setattr(tn, name, _RecordingKernel(name, calls))
    q = torch.zeros(5, D, dtype=dtype)
    matmul, old_tf32 = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    matmul.allow_tf32 = tf32
    try:
        tn.info_nce_loss_triton(q, q, torch.arange(5), None, 2.0, True, True, False, 0.0, 1.0)
    finally:
        matmul.allow_tf32 = old_tf32
    assert [c[0] for c in calls] == ["info_nce_fwd_kernel", "info_nce_bwd_dq_kernel", "info_nce_bwd_dk_kernel"]
    ptr = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    aot = [(c["kernel"].fn.__name__ if hasattr(c["kernel"], "fn") else c["kernel"].__name__, c["signature"]["q_ptr"],
            tuple(sorted(c["constexprs"].items())), c["num_warps"], c["num_stages"]) for c in tn.AOT_CONFIGS]
    for name, kw in calls:
        options = (kw.pop("num_warps"), kw.pop("num_stages"))
        assert kw["DOT_PRECISION"] == ("tf32" if tf32 and dtype == torch.float32 else "ieee")
        if "BLOCK_DO" in kw:
            assert kw["BLOCK_DO"] == min(b for b in tn.BLOCK_DOS if b >= min(D, 256))
        assert (name, ptr, tuple(sorted(kw.items())), *options) in aot, (name, kw, options)


# ---------------------------------------------------------------------------------------
# RINCE (chingyaoc/RINCE): a robust mode of the same op
# ---------------------------------------------------------------------------------------
def rince_moco_v3_contrastive_loss(q, k, T, lam, rq, rank=0):
    """Test-only transcription of chingyaoc/RINCE ``ImageNet/moco-v3/moco/builder.py``
    (``MoCo.contrastive_loss``): normalize; neg = exp(q·kᵀ/T) summed over every gathered key
    (the positive included); pos = exp(q_i·k_{i + N·rank}/T); −pos^q/q + (lam·neg)^q/q, means,
    × 2T. (k stands for concat_all_gather(k).)"""
    q = torch.nn.functional.normalize(q, dim=1)
    k = torch.nn.functional.normalize(k, dim=1)
    neg = torch.exp(q.matmul(k.transpose(0, 1)) / T)
    N = q.shape[0]
    pos = torch.exp(torch.sum(q * k[N * rank:N * (rank + 1)], dim=-1) / T)
    pos = -(pos ** rq) / rq
    neg = ((lam * (neg.sum(1))) ** rq) / rq
    loss = pos.mean() + neg.mean()
    return loss * (2 * T)


def rince_simclr_sym_loss(out_1, out_2, lam, rq, temperature):
    """Test-only transcription of chingyaoc/RINCE ``ImageNet/simclr/simclr_module.py``
    (``SimCLR.sym_loss`` with ``compute_neg_mask``) on one process: the 2n views against
    themselves, the negatives every view but itself and its positive, pos = exp(out_1·out_2/T)
    for both halves; −pos^q/q + (lam·(pos + neg))^q/q, means. Inputs are normalized (its
    ``Projection`` does it)."""
    n = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    similarity = torch.exp(torch.mm(out, out.t()) / temperature)
    neg_mask = torch.zeros(2 * n, 2 * n, dtype=out.dtype)
    all_indices = torch.arange(2 * n)
    pos_members = n * torch.arange(2)
    for anchor in range(2):
        for img_idx in range(n):
            delete = img_idx + pos_members
            keep = all_indices[~torch.isin(all_indices, delete)]
            neg_mask[anchor * n + img_idx, keep] = 1
    neg = torch.sum(similarity * neg_mask, 1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    neg = ((lam * (pos + neg)) ** rq) / rq
    pos = -(pos ** rq) / rq
    return pos.mean() + neg.mean()


def _small(name):
    return name == "triton" and not ON_GPU


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 3)])
@pytest.mark.parametrize("rq,lam", [(0.6, 0.01), (0.1, 0.01)])
def test_rince_equals_chingyaoc_moco_v3(backend, rank, world, rq, lam):
    """RINCE, MoCo v3 form: ctr(q1, k2) + ctr(q2, k1) at τ = 0.2 with RINCE's contrastive_loss;
    loss and the gradients to the queries and the (gathered) keys, against the transcription
    run in fp64 and in fp32 (both within fp32 rounding of ours)."""
    name, device = backend
    N, D, T = (24, 32, 0.2) if _small(name) else (64, 256, 0.2)
    q1, q2 = (torch.randn(N, D, device=device) for _ in range(2))
    k1, k2 = (torch.randn(world * N, D, device=device) for _ in range(2))

    def both(fn, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q1, q2, k1, k2)]
        loss = fn(*leaves)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    ref = lambda a, b, c, d: (rince_moco_v3_contrastive_loss(a, d, T, lam, rq, rank)  # noqa: E731
                              + rince_moco_v3_contrastive_loss(b, c, T, lam, rq, rank))
    ours = lambda a, b, c, d: 2 * T * (  # noqa: E731
        sslkern.info_nce_loss(a, d, T, pos_offset=rank * N, rince=(rq, lam), backend=name)
        + sslkern.info_nce_loss(b, c, T, pos_offset=rank * N, rince=(rq, lam), backend=name))
    got, want64, want32 = both(ours, torch.float32), both(ref, torch.float64), both(ref, torch.float32)
    for g, w64, w32 in zip(got, want64, want32):
        torch.testing.assert_close(g.double(), w64, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(g, w32, atol=2e-6, rtol=1e-5)
    crit = sslkern.nn.InfoNCELoss(T, scale=2 * T, rince=(rq, lam))
    if rank == 0 and world == 1:
        torch.testing.assert_close(crit(q1, k2) + crit(q2, k1), want32[0], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rq,lam,temperature", [(0.1, 0.01, 0.1), (0.5, 0.001, 0.5)])
def test_rince_equals_chingyaoc_simclr(backend, rq, lam, temperature):
    """RINCE, SimCLR form (nt_xent=True): sym_loss on the normalized projections; loss and the
    gradients to both views' raw embeddings."""
    name, device = backend
    n, D = (21, 24) if _small(name) else (100, 128)
    out0, out1 = torch.randn(n, D, device=device), torch.randn(n, D, device=device)
    ref = lambda a, b: rince_simclr_sym_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), lam, rq,  # noqa: E731
                                             temperature)
    got = _run(sslkern.info_nce_loss, out0, out1, temperature=temperature, nt_xent=True, rince=(rq, lam),
               backend=name)
    for want in (_run(ref, out0.double(), out1.double()), _run(ref, out0, out1)):
        torch.testing.assert_close(got[0].double(), want[0].double(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got[1].double(), want[1].double(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got[2].double(), want[2].double(), atol=2e-6, rtol=1e-5)
    crit = sslkern.nn.InfoNCELoss(temperature, nt_xent=True, rince=(rq, lam))
    torch.testing.assert_close(crit(out0, out1).double(), got[0].double(), atol=2e-6, rtol=1e-5)


def _rince_oracle(q, k, **kw):
    return _run(ref_info_nce_loss, q.double(), k.double(), **kw)


@pytest.mark.parametrize("backend,case", _case_params())
@pytest.mark.parametrize("rq,lam", [(0.6, 0.01), (1.0, 1.0), (0.05, 0.3)])
def test_rince_backend_matches_reference(backend, case, rq, lam):
    name, device = backend
    N, M, D, form = case
    kw = _form_kwargs(form, N, M, device)
    q = torch.randn(N, D, device=device)
    k = torch.randn(N if form == "nt_xent" else M, D, device=device)
    got = _run(sslkern.info_nce_loss, q, k, temperature=0.2, rince=(rq, lam), backend=name, **kw)
    assert_matches(got, _rince_oracle(q, k, temperature=0.2, rince=(rq, lam), **kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("form", ["diag", "nt_xent"])
def test_rince_q_to_zero_is_infonce_plus_log_lambda(backend, form):
    """q → 0: ((λZ)^q − e^{q·s})/q → log Z − s + log λ. q = 0 is the limit itself (InfoNCE's
    gradient, loss + log λ); q = 1e-4 is within O(q) of it (expm1 keeps the small-q value exact)."""
    name, device = backend if isinstance(backend, tuple) else (backend, "cpu")
    q, k = torch.randn(30, 16, device=device), torch.randn(30, 16, device=device)
    kw = dict(temperature=0.2, nt_xent=form == "nt_xent", backend=name)
    plain = _run(sslkern.info_nce_loss, q, k, **kw)
    for lam in (1.0, 0.01):
        limit = _run(sslkern.info_nce_loss, q, k, rince=(0.0, lam), **kw)
        torch.testing.assert_close(limit[0], plain[0] + math.log(lam), atol=1e-6, rtol=1e-6)
        for a, b in zip(limit[1:], plain[1:]):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
        near = _run(sslkern.info_nce_loss, q, k, rince=(1e-4, lam), **kw)
        torch.testing.assert_close(near[0], limit[0], atol=5e-3, rtol=1e-3)
        for a, b in zip(near[1:], limit[1:]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_rince_log_domain_does_not_overflow(backend):
    """normalize=False, logits up to ~190 (> 88.7, where fp32 exp overflows): the public code's
    formula gives inf / nan in fp32; the op gives the fp64 value (q·s stays far from overflow)."""
    name, device = backend if isinstance(backend, tuple) else (backend, "cpu")
    q = torch.randn(24, 16, device=device) * 1.6
    k = torch.randn(40, 16, device=device) * 1.6
    kw = dict(temperature=0.1, normalize=False, rince=(0.1, 0.01))
    eager32 = ref_info_nce_loss(q, k, **kw)
    assert not torch.isfinite(eager32)
    want = _rince_oracle(q, k, **kw)
    assert torch.isfinite(want[0])
    got = _run(sslkern.info_nce_loss, q, k, backend=name, **kw)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[1].double(), want[1], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(got[2].double(), want[2], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("form", ["diag", "nt_xent"])
def test_rince_dtypes(backend, dtype, form):
    """Half inputs against the fp64 reference on the same (normalized) values: a row's sum of M
    exponentials can pass fp16's range (its bound M·e^{1/τ} is 5.7e6 at M = 260, τ = 0.1); the
    op's statistics are fp32 and in the log domain."""
    name, device = backend
    _skip_unsupported(name, dtype)
    N, M, D = (197, 260, 64) if name == "cpu" or ON_GPU else (26, 40, 32)
    kw = _form_kwargs(form, N, M, device)
    q = torch.randn(N, D, device=device, dtype=dtype)
    k = torch.randn(N if form == "nt_xent" else M, D, device=device, dtype=dtype)
    got = _run(sslkern.info_nce_loss, q, k, temperature=0.1, backend=name, rince=(0.6, 0.01), **kw)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    want_n = _run(ref_info_nce_loss, qn.double(), kn.double(), temperature=0.1, normalize=False,
                  rince=(0.6, 0.01), **kw)
    qd, kd = q.double().requires_grad_(True), k.double().requires_grad_(True)
    nq, nk = F.normalize(qd, dim=1), F.normalize(kd, dim=1)
    dq, dk = torch.autograd.grad((nq * want_n[1]).sum() + (nk * want_n[2]).sum(), (qd, kd))
    assert_matches(got, (want_n[0], dq, dk), dtype)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("form", ["diag", "exclude", "nt_xent"])
@pytest.mark.parametrize("rq", [0.6, 0.0])
def test_rince_gradcheck_float64(backend, form, rq):
    N, M, D = 7, 11, 5
    kw = _form_kwargs(form, N, M, "cpu")
    q = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(N if form == "nt_xent" else M, D, dtype=torch.float64, requires_grad=True)
    f = lambda a, b: sslkern.info_nce_loss(a, b, 0.3, backend=backend, rince=(rq, 0.05), **kw)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("tied", [False, True])
def test_rince_opcheck(tied):
    N, M, D = 9, 13, 6
    q = torch.randn(N, D, requires_grad=True)
    if tied:
        pos, excl = (torch.arange(N) + 3) % N, torch.arange(N)
        args = (q, q, pos, excl, 1 / 0.3, True, True, True, 0.6, 0.01, "")
    else:
        k = torch.randn(M, D, requires_grad=True)
        args = (q, k, torch.randint(0, M, (N,)), None, 1 / 0.3, True, True, False, 0.6, 0.01, "")
    torch.library.opcheck(torch.ops.sslkern.info_nce_loss.default, args)


def test_rince_compile_fullgraph_equals_eager():
    q1, q2 = (torch.randn(40, 24, requires_grad=True) for _ in range(2))
    k1, k2 = torch.randn(40, 24), torch.randn(40, 24)

    def f(q1, q2, k1, k2):
        moco = sslkern.info_nce_loss(q1, k2, 0.2, rince=(0.6, 0.01)) + sslkern.info_nce_loss(q2, k1, 0.2, rince=(0.6, 0.01))
        return 0.4 * moco + sslkern.info_nce_loss(q1, q2, 0.1, nt_xent=True, rince=(0.1, 0.01))

    eager = f(q1, q2, k1, k2)
    e_grads = torch.autograd.grad(eager, (q1, q2))
    got = torch.compile(f, fullgraph=True)(q1, q2, k1, k2)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
    for g, e in zip(torch.autograd.grad(got, (q1, q2)), e_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rince,exc,match", [
    ((0.6,), TypeError, r"rince expected a pair \(q, lambda\), got \(0.6,\)"),
    (0.6, TypeError, r"rince expected a pair \(q, lambda\), got 0.6"),
    ((0.6, "0.01"), TypeError, "rince lambda expected a real number, got str"),
    ((torch.tensor(0.6), 0.01), TypeError, "rince q expected a real number, got Tensor"),
    ((True, 0.01), TypeError, "rince q expected a real number, got bool"),
    ((-0.1, 0.01), ValueError, r"rince q must be in \[0.0, inf\], got -0.1"),
    ((0.6, 0.0), ValueError, r"rince lambda must be in \(0.0, inf\], got 0.0"),
    ((float("nan"), 0.01), ValueError, "rince q expected a finite number, got nan"),
    ((0.6, float("inf")), ValueError, "rince lambda expected a finite number, got inf"),
])
def test_rince_bad_input(rince, exc, match):
    q, k = _qk()
    with pytest.raises(exc, match=match):
        sslkern.info_nce_loss(q, k, rince=rince)


def test_rince_cpu_kernel_checks_direct_calls():
    q, k = _qk()
    with pytest.raises(RuntimeError, match="rince expected q >= 0 and lambda > 0"):
        torch.ops.sslkern_C.info_nce_loss_cpu(q, k, torch.arange(6), None, 2.0, True, True, False, -1.0, 0.1)
    with pytest.raises(RuntimeError, match="rince expected q >= 0 and lambda > 0"):
        torch.ops.sslkern_C.info_nce_loss_cpu(q, k, torch.arange(6), None, 2.0, True, True, False, 0.5, 0.0)


@pytest.mark.parametrize("nt_xent", [False, True])
def test_rince_cpu_memory_is_infonce_memory(nt_xent):
    """RINCE keeps the kernel's memory: no (N, M) tensor, the same peak as InfoNCE's."""
    from torch.profiler import ProfilerActivity, profile

    N = M = 2048
    n = N // 2 if nt_xent else N
    q = torch.randn(n, 32, requires_grad=True)
    k = torch.randn(n if nt_xent else M, 32, requires_grad=True)

    def peak(**kw):
        with sslkern.cpu_cache_disabled(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sslkern.info_nce_loss(q, k, 0.2, nt_xent=nt_xent, backend="cpu", **kw).backward()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = top = 0
        for _, nb in events:
            live += nb
            top = max(top, live)
        return top

    robust, plain = peak(rince=(0.6, 0.01)), peak()
    assert robust < N * M * 4 / 2, robust
    assert robust <= plain + 64 * 1024, (robust, plain)  # a few row vectors at most


@pytest.mark.parametrize("n,D", [(130, 17), (300, 64)])
@pytest.mark.parametrize("threads", [1, 3])
def test_rince_tied_cpu_tiles_and_threads(n, D, threads):
    q, k = torch.randn(n, D), torch.randn(n, D)
    want = _rince_oracle(q, k, temperature=0.1, nt_xent=True, rince=(0.1, 0.01))
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run(sslkern.info_nce_loss, q, k, temperature=0.1, nt_xent=True, backend="cpu", rince=(0.1, 0.01))
    finally:
        torch.set_num_threads(prev)
    assert_matches(got, want, torch.float32)


def test_rince_tied_and_untied_cpu_gradients_have_no_subnormals():
    """τ = 0.01: most of w·P is below the float32 normal range; it must be exactly 0."""
    n, D = 256, 16
    z = F.normalize(torch.randn(2 * n, D), dim=1)
    pos, excl = (torch.arange(2 * n) + n) % (2 * n), torch.arange(2 * n)
    tiny = torch.finfo(torch.float32).tiny
    _, dz, _ = torch.ops.sslkern.info_nce_loss(z, z, pos, excl, 100.0, True, True, True, 0.1, 0.01, "cpu")
    assert not bool(((dz != 0) & (dz.abs() < tiny)).any())
    eye = torch.eye(2 * n)
    _, g, _ = torch.ops.sslkern.info_nce_loss((z @ z.t()).contiguous(), eye, pos, excl, 100.0, True, False, False,
                                              0.1, 0.01, "cpu")
    assert not bool(((g != 0) & (g.abs() < tiny)).any())
    # the case exercises the flush: the exact w·P (fp64) has entries in the float32 subnormal range
    s = ((z @ z.t()).double() * 100).fill_diagonal_(float("-inf"))
    w_p = torch.exp(s - (1 - 0.1) * torch.logsumexp(s, 1, keepdim=True) + 0.1 * math.log(0.01)) / (2 * n) * 100
    assert bool(((w_p > 0) & (w_p < tiny)).sum() > 100)


def test_rince_triton_launch_configs_are_in_aot_configs(monkeypatch):
    pytest.importorskip("triton")
    from sslkern.triton_ops import info_nce_loss as tn

    calls = []
    for name in ("info_nce_fwd_kernel", "info_nce_bwd_dq_kernel", "info_nce_bwd_dk_kernel"):
        monkeypatch.setattr(tn, name, _RecordingKernel(name, calls))
    q = torch.zeros(5, 64)
    tn.info_nce_loss_triton(q, q, torch.arange(5), None, 2.0, True, True, False, 0.6, 0.01)
    aot = [(c["kernel"].fn.__name__ if hasattr(c["kernel"], "fn") else c["kernel"].__name__,
            tuple(sorted(c["constexprs"].items())), c["num_warps"], c["num_stages"]) for c in tn.AOT_CONFIGS]
    assert len(calls) == 3
    for name, kw in calls:
        options = (kw.pop("num_warps"), kw.pop("num_stages"))
        assert kw["RINCE"] is True
        assert (name, tuple(sorted(kw.items())), *options) in aot, (name, kw, options)
