"""dino_loss / ibot_patch_loss / sinkhorn_knopp_teacher / koleo_loss.

Every backend against the eager references (dino DINOLoss math, dinov2 iBOT / Sinkhorn /
KoLeo) and against lightly's DINOLoss / IBOTPatchLoss, with the loss, the student gradient
and the updated center compared on fresh random inputs.
"""

import pytest
import torch

import sslkern
from sslkern import reference as R
from sslkern.nn.dino import update_center_
from sslkern.ops.dino_loss import dispatch

from conftest import backend_params


def with_center(result, center, n_rows, momentum=0.9):
    """(loss, updated center) from ``(loss, teacher_sum)``: the op's local column sum and the
    center update ``sslkern.nn.DINOLoss`` / ``IBOTPatchLoss`` make of it (one process)."""
    loss, teacher_sum = result
    c = center.clone()
    update_center_(c, teacher_sum, n_rows, momentum)
    return loss, c

BACKENDS = backend_params(dispatch, include_reference=True)
# Tolerances (loss, gradient): fp32 math in every backend; the kernels take the dots
# relative to the row max and use a ~1-ulp polynomial exp, so fp32 agrees to ~1e-5 rel.
# Half inputs are compared with a reference run on the same (rounded) inputs in fp32;
# their gradient is stored in the half dtype (one rounding).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.bfloat16: dict(atol=2e-3, rtol=1e-2), torch.float16: dict(atol=2e-4, rtol=2e-3)}


def _shapes(name):
    # (B, V, T, K): odd sizes, ViT-like counts; the interpreter gets the small ones only.
    small = [(3, 4, 2, 37), (2, 2, 2, 197), (1, 3, 2, 50), (4, 6, 2, 1031)]
    if name == "triton":
        return small[:3] + [(2, 5, 2, 2500)]
    # the C++ kernel takes whole images when (V + T)·K <= 65,536, or when T·K <= 2^18 and
    # B >= 2·threads, and column chunks otherwise: with 2 threads (5, 8, 2, 7001) runs whole
    # images of large rows, (3, 8, 2, 7001) and (2, 4, 2, 11000) the chunked path
    # (test_cpu_paths_agree pins the thread count)
    return small + [(5, 8, 2, 4099), (2, 3, 1, 197), (3, 5, 3, 300), (3, 8, 2, 7001), (2, 4, 2, 11000)]


def make(B, V, T, K, dtype, device, scale=3.0):
    student = (torch.randn(V * B, K, device=device) * scale).to(dtype)
    teacher = (torch.randn(T * B, K, device=device) * scale).to(dtype)
    center = torch.randn(K, device=device) * 0.5
    return student, teacher, center


def reference_all(student, teacher, center, ts, tt, T, momentum=0.9):
    s = student.detach().float() if student.dtype != torch.float64 else student.detach().clone()
    s.requires_grad_(True)
    t = teacher.float() if teacher.dtype != torch.float64 else teacher
    loss = R.dino_loss(s, t, center.to(s.dtype), ts, tt, T)
    loss.backward()
    new_center = R.center_update(center.reshape(1, -1).to(s.dtype), t, 0.9).reshape(-1)
    return loss.detach(), s.grad, new_center


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_dino_reference(backend, dtype):
    name, device = backend
    for B, V, T, K in _shapes(name):
        student, teacher, center = make(B, V, T, K, dtype, device)
        ts, tt = 0.1, 0.04 + 0.03 * torch.rand(()).item()
        want_loss, want_grad, want_center = reference_all(student, teacher, center, ts, tt, T)
        s = student.clone().requires_grad_(True)
        loss, new_center = with_center(sslkern.dino_loss(s, teacher, center, student_temp=ts, teacher_temp=tt,
                                                         n_global_crops=T, return_teacher_sum=True, backend=name),
                                       center, teacher.shape[0])
        loss.backward()
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert s.grad.dtype == dtype and new_center.shape == center.shape
        tol = TOL[dtype]
        torch.testing.assert_close(loss, want_loss.to(loss.dtype), **tol)
        # gradients are O(1/(P·B)) per row sum; compare on that scale
        g_scale = 1.0 / (ts * B)
        torch.testing.assert_close(s.grad.double() / g_scale, want_grad.double() / g_scale,
                                   atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
        torch.testing.assert_close(new_center.double(), want_center.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_lightly(backend):
    lightly_loss = pytest.importorskip("lightly.loss")
    name, device = backend
    B, V, T, K = (3, 6, 2, 197) if name == "triton" else (4, 8, 2, 1000)
    crit = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                 warmup_teacher_temp_epochs=0)
    with torch.no_grad():
        crit.center.copy_(torch.randn(1, 1, K) * 0.3)
    student, teacher, _ = make(B, V, T, K, torch.float32, device)
    center = crit.center.reshape(-1).clone()
    s_ref = student.clone().requires_grad_(True)
    want = crit(list(teacher.chunk(T)), list(s_ref.chunk(V)), epoch=0)
    want.backward()
    s = student.clone().requires_grad_(True)
    loss, new_center = with_center(sslkern.dino_loss(s, teacher, center, student_temp=0.1, teacher_temp=0.04,
                                                     n_global_crops=T, return_teacher_sum=True, backend=name),
                                   center, teacher.shape[0])
    loss.backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.grad, s_ref.grad, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(new_center, crit.center.reshape(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_paths_agree(dtype):
    # (3, 8, 2, 7001): 1 thread takes whole rows (exponentials stored in the gradient for
    # fp32, in a float scratch row for bf16 / fp16), 3 threads take column chunks; both match
    # the reference.
    B, V, T, K = 3, 8, 2, 7001
    student, teacher, center = make(B, V, T, K, dtype, "cpu")
    want_loss, want_grad, want_center = reference_all(student, teacher, center, 0.1, 0.05, T)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            s = student.clone().requires_grad_(True)
            loss, c = with_center(sslkern.dino_loss(s, teacher, center, teacher_temp=0.05, n_global_crops=T,
                                                    return_teacher_sum=True, backend="cpu"), center, teacher.shape[0])
            loss.backward()
            tol = TOL[dtype]
            torch.testing.assert_close(loss, want_loss, **tol)
            g_scale = 1.0 / (0.1 * B)
            torch.testing.assert_close(s.grad.double() / g_scale, want_grad.double() / g_scale,
                                       atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
            torch.testing.assert_close(c, want_center, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_large_k_cpu():
    # K beyond one chunk per thread (bounded scratch): 131,077 columns, odd.
    B, V, T, K = 2, 3, 2, 131077
    student, teacher, center = make(B, V, T, K, torch.float32, "cpu")
    want_loss, want_grad, want_center = reference_all(student, teacher, center, 0.1, 0.04, T)
    s = student.clone().requires_grad_(True)
    loss, c = with_center(sslkern.dino_loss(s, teacher, center, n_global_crops=T, return_teacher_sum=True), center,
                          teacher.shape[0])
    loss.backward()
    torch.testing.assert_close(loss, want_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s.grad, want_grad, atol=1e-9, rtol=1e-4)
    torch.testing.assert_close(c, want_center, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """±1e4 logits, τt = 0.01, all-equal rows: finite and equal to the float64 reference."""
    name, device = backend
    B, V, T, K = 3, 4, 2, 300
    student = (torch.randint(-1, 2, (V * B, K), device=device) * 1e4).float()
    teacher = (torch.randint(-1, 2, (T * B, K), device=device) * 1e4).float()
    student[0] = 7.0   # all equal
    teacher[1] = -3.0  # all equal
    center = torch.zeros(K, device=device)
    want_loss, want_grad, _ = reference_all(student.double(), teacher.double(), center.double(), 0.1, 0.01, T)
    s = student.clone().requires_grad_(True)
    loss = sslkern.dino_loss(s, teacher, center, teacher_temp=0.01, n_global_crops=T, backend=name)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # loss ~1e5 (log-probabilities of -2e5): fp32 relative accuracy
    torch.testing.assert_close(loss.double(), want_loss, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(s.grad.double(), want_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_reference(backend):
    name, device = backend
    B, V, T, K = 2, 4, 2, 64
    student, teacher, center = make(B, V, T, K, torch.float32, device)
    student[5, 3] = float("nan")   # crop 2, image 1
    teacher[0, 7] = float("nan")   # crop 0, image 0
    s_ref = student.clone().requires_grad_(True)
    R.dino_loss(s_ref, teacher, center, 0.1, 0.04, T).backward()
    s = student.clone().requires_grad_(True)
    loss = sslkern.dino_loss(s, teacher, center, n_global_crops=T, backend=name)
    loss.backward()
    assert torch.isnan(loss)
    # the same rows are NaN as in the reference (student row 5; rows paired with teacher row 0)
    assert torch.equal(torch.isnan(s.grad).any(1), torch.isnan(s_ref.grad).any(1))
    finite = ~torch.isnan(s_ref.grad).any(1)
    torch.testing.assert_close(s.grad[finite], s_ref.grad[finite], atol=1e-7, rtol=1e-4)


def test_single_crop_and_bad_input():
    K = 16
    s, t, c = make(2, 1, 1, K, torch.float32, "cpu")
    with pytest.raises(ValueError, match="no .teacher, student. pairs"):
        sslkern.dino_loss(s, t, c, n_global_crops=1)
    s, t, c = make(2, 4, 2, K, torch.float32, "cpu")
    with pytest.raises(ValueError, match="teacher expected 16 columns"):
        sslkern.dino_loss(s, t[:, :-1], c)
    with pytest.raises(ValueError, match="student expected V·B rows"):
        sslkern.dino_loss(s[:-1], t, c)
    with pytest.raises(ValueError, match="teacher expected T·B rows"):
        sslkern.dino_loss(s, t[:-1], c)
    with pytest.raises(ValueError, match=r"center expected shape \(16,\)"):
        sslkern.dino_loss(s, t, c[:-1])
    with pytest.raises(ValueError, match="center expected a tensor"):
        sslkern.dino_loss(s, t, None)
    with pytest.raises(TypeError, match="student expected dtype"):
        sslkern.dino_loss(s.long(), t, c)
    with pytest.raises(TypeError, match="teacher expected dtype"):
        sslkern.dino_loss(s, t.int(), c)
    with pytest.raises(ValueError, match="student_temp must be in"):
        sslkern.dino_loss(s, t, c, student_temp=0.0)
    for bad in (float("nan"), float("inf")):  # refused here, not by the kernel
        with pytest.raises(ValueError, match="teacher_temp expected a finite number"):
            sslkern.dino_loss(s, t, c, teacher_temp=bad)
    with pytest.raises(TypeError, match="student_temp expected a real number"):
        sslkern.dino_loss(s, t, c, student_temp="0.1")
    with pytest.raises(TypeError, match="n_global_crops expected an int"):
        sslkern.dino_loss(s, t, c, n_global_crops=2.0)
    with pytest.raises(ValueError, match="sinkhorn_iterations must be in"):
        sslkern.dino_loss(s, t, c, teacher_mode="sinkhorn", sinkhorn_iterations=-1)
    with pytest.raises(ValueError, match="return_teacher_sum must be one of"):
        sslkern.dino_loss(s, t, c, return_teacher_sum="yes")
    with pytest.raises(ValueError, match="teacher_mode must be one of"):
        sslkern.dino_loss(s, t, c, teacher_mode="softmax")
    with pytest.raises(ValueError, match="masks expected 3 set entries"):
        m = torch.zeros(2, 5, dtype=torch.bool)
        m[0, :2] = True
        sslkern.ibot_patch_loss(s[:3], t[:3], m, c)
    # the C++ kernel checks sizes itself too
    with pytest.raises(RuntimeError, match="teacher must have"):
        torch.ops.sslkern_C.dino_loss_cpu(s, t[:2], c, None, 1.0, 0.1, 0.04, 4, 2, True, False, False, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    name, device = backend
    for B, V, T, K in [(2, 3, 2, 7), (3, 1, 1, 5)]:
        s, t, c = make(B, V, T, K, torch.float64, device, scale=1.0)
        s.requires_grad_(True)
        if V == 1:  # iBOT form: per-token weights, no skipped pairs
            masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool, device=device)[:, :4]
            masks = torch.zeros(2, 4, dtype=torch.bool, device=device)
            masks.view(-1)[torch.randperm(8)[:B]] = True
            fn = lambda x: sslkern.ibot_patch_loss(x, t, masks, c, backend=name)  # noqa: E731
        else:
            fn = lambda x: sslkern.dino_loss(x, t, c, n_global_crops=T, backend=name)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8)


def test_opcheck():
    s, t, c = make(3, 4, 2, 37, torch.float32, "cpu")
    w = torch.rand(3)
    for args in [
        (s.requires_grad_(True), t, c, None, 1 / 18, 0.1, 0.04, 4, 2, True, False, True, True, ""),
        (s.detach(), t, c, w, 0.5, 0.1, 0.04, 4, 2, False, False, False, False, ""),
        (s.detach().requires_grad_(True), t.softmax(-1), None, None, 1 / 18, 0.1, 0.04, 4, 2, True, True, True, False, ""),
    ]:
        torch.library.opcheck(torch.ops.sslkern.dino_loss.default, args)


def test_compile_fullgraph_matches_eager():
    B, V, T, K = 3, 4, 2, 101
    s, t, c = make(B, V, T, K, torch.float32, "cpu")
    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks.view(-1)[torch.randperm(24)[:7]] = True
    ps, pt = torch.randn(7, K), torch.randn(7, K)

    def step(s, t, c, ps, pt):
        loss, nc = sslkern.dino_loss(s, t, c, n_global_crops=T, return_teacher_sum=True)
        ploss, pc = sslkern.ibot_patch_loss(ps, pt, masks, c, return_teacher_sum=True)
        return loss + ploss, nc, pc

    s1, ps1 = s.clone().requires_grad_(True), ps.clone().requires_grad_(True)
    s2, ps2 = s.clone().requires_grad_(True), ps.clone().requires_grad_(True)
    eager = step(s1, t, c, ps1, pt)
    eager[0].backward()
    compiled = torch.compile(step, fullgraph=True)(s2, t, c, ps2, pt)
    compiled[0].backward()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(ps1.grad, ps2.grad, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# iBOT patch loss
# ---------------------------------------------------------------------------------------
def make_masks(B_g, H, W, device):
    # half the images masked at 10-50 %, the rest unmasked (dinov2's mask sampling shape)
    masks = torch.zeros(B_g, H * W, dtype=torch.bool, device=device)
    for i in range(0, B_g, 2):
        n = int(H * W * (0.1 + 0.4 * torch.rand(()).item()))
        masks[i, torch.randperm(H * W, device=device)[:max(n, 1)]] = True
    return masks.view(B_g, H, W)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ibot_matches_reference_and_lightly(backend, dtype):
    lightly_loss = pytest.importorskip("lightly.loss")
    name, device = backend
    B_g, H, W, K = (4, 3, 5, 37) if name == "triton" else (6, 7, 7, 197)
    masks = make_masks(B_g, H, W, device)
    M = int(masks.sum())
    student = (torch.randn(M, K, device=device) * 3).to(dtype)
    teacher = (torch.randn(M, K, device=device) * 3).to(dtype)
    crit = lightly_loss.IBOTPatchLoss(output_dim=K, teacher_temp=0.05, student_temp=0.1)
    with torch.no_grad():
        crit.center.value.copy_(torch.randn(1, K) * 0.3) if hasattr(crit.center, "value") else None
    center = crit.center.value.reshape(-1).clone()
    s_ref = student.float().clone().requires_grad_(True)
    want = crit(teacher.float(), s_ref, masks)
    want.backward()
    want2 = R.ibot_patch_loss(student.float(), teacher.float(), masks, center, 0.1, 0.05)
    torch.testing.assert_close(want2, want, atol=1e-5, rtol=1e-5)  # the two references agree
    s = student.clone().requires_grad_(True)
    loss, new_center = with_center(sslkern.ibot_patch_loss(s, teacher, masks, center, student_temp=0.1,
                                                           teacher_temp=0.05, return_teacher_sum=True, backend=name),
                                   center, M)
    loss.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss, want, **tol)
    g_scale = 1.0 / (0.1 * B_g)
    torch.testing.assert_close(s.grad.float() / g_scale, s_ref.grad / g_scale, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
    torch.testing.assert_close(new_center, crit.center.value.reshape(-1), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Sinkhorn-Knopp teacher (DINOv2)
# ---------------------------------------------------------------------------------------
def test_sinkhorn_matches_dinov2_where_finite():
    for N, K in [(6, 37), (64, 1000), (1, 5)]:
        t = torch.randn(N, K)  # t/τt below ~60: the reference stays finite
        want = R.sinkhorn_knopp_teacher(t, 0.07)
        got = sslkern.sinkhorn_knopp_teacher(t, 0.07)
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)
    # large logits: the reference overflows, ours stays finite with unit rows
    t = torch.randn(8, 50) * 1e4
    assert not torch.isfinite(R.sinkhorn_knopp_teacher(t, 0.04)).all()
    p = sslkern.sinkhorn_knopp_teacher(t, 0.04)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(1), torch.ones(8), atol=1e-5, rtol=0)
    # float64 reference on the same inputs (finite there for moderate scale)
    t = torch.randn(8, 50) * 1.5
    torch.testing.assert_close(sslkern.sinkhorn_knopp_teacher(t.double(), 0.04).double(),
                               R.sinkhorn_knopp_teacher(t.double(), 0.04).double(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,scale", [(64, 5000, 3.0), (7, 1025, 0.3), (1, 3, 1.0), (97, 2049, 1.0)])
def test_sinkhorn_cpu_kernel_equals_log_domain(dtype, N, K, scale):
    """The C++ Sinkhorn (potentials, 1,024-column tasks: K = 1025 / 2049 leave a 1- / 1-column
    last task) equals the eager log-domain iterations on the same rounded logits; no
    subnormal probabilities."""
    from sslkern.ops.dino_loss import _sinkhorn_log_domain

    t = (torch.randn(N, K) * scale).to(dtype)
    for iters in (1, 3):  # (0 iterations is exp(t / tt) unnormalized: it overflows in both)
        got = sslkern.sinkhorn_knopp_teacher(t, 0.04, iters, backend="cpu")
        want = _sinkhorn_log_domain(t, 0.04, iters)
        assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(got, want, **tol)
        ref = sslkern.sinkhorn_knopp_teacher(t, 0.04, iters, backend="reference")
        torch.testing.assert_close(ref, want, atol=0, rtol=0)
        if dtype != torch.float64:
            tiny = (got != 0) & (got < torch.finfo(torch.float32).tiny)
            assert not bool(tiny.any())


def test_sinkhorn_custom_op_and_bad_input():
    t = torch.randn(6, 40)
    torch.library.opcheck(torch.ops.sslkern.sinkhorn_teacher.default, (t, 0.05, 3, 0, "cpu"))
    compiled = torch.compile(lambda x: sslkern.sinkhorn_knopp_teacher(x, 0.05), fullgraph=True)
    torch.testing.assert_close(compiled(t), sslkern.sinkhorn_knopp_teacher(t, 0.05), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"n_iterations must be in \[0, inf\], got -1"):
        sslkern.sinkhorn_knopp_teacher(t, 0.05, -1)
    with pytest.raises(TypeError, match="n_iterations expected an int, got float"):
        sslkern.sinkhorn_knopp_teacher(t, 0.05, 2.5)
    with pytest.raises(ValueError, match="teacher_temp"):
        sslkern.sinkhorn_knopp_teacher(t, 0.0)
    nan = t.clone()
    nan[2, 5] = float("nan")
    assert torch.isnan(sslkern.sinkhorn_knopp_teacher(nan, 0.05, backend="cpu")).any()
    with sslkern.use_backend("triton"):  # no Triton Sinkhorn: the default rule, not an error
        torch.testing.assert_close(sslkern.sinkhorn_knopp_teacher(t, 0.05), sslkern.sinkhorn_knopp_teacher(t, 0.05))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_loss_sinkhorn_mode(backend):
    name, device = backend
    B, V, T, K = 4, 5, 2, 97
    s, t, c = make(B, V, T, K, torch.float32, device, scale=1.0)  # reference finite
    p = R.sinkhorn_knopp_teacher(t, 0.05)
    assert torch.isfinite(p).all()
    s_ref = s.clone().requires_grad_(True)
    want = R.dino_loss(s_ref, t, None, 0.1, 0.05, T, teacher_probs=p)
    want.backward()
    s2 = s.clone().requires_grad_(True)
    loss = sslkern.dino_loss(s2, t, None, teacher_temp=0.05, n_global_crops=T, teacher_mode="sinkhorn", backend=name)
    loss.backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2.grad, s_ref.grad, atol=1e-7, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# KoLeo and the nn modules
# ---------------------------------------------------------------------------------------
def test_koleo_matches_reference():
    for N, D in [(16, 8), (33, 197)]:
        x = torch.randn(N, D)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        want = R.koleo_loss(x1)
        got = sslkern.koleo_loss(x2)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        want.backward()
        got.backward()
        torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 rows"):
        sslkern.koleo_loss(torch.randn(1, 4))


def test_nn_dino_loss_schedule_and_center():
    lightly_loss = pytest.importorskip("lightly.loss")
    K, B, ncrops = 64, 3, 6
    ours = sslkern.nn.DINOLoss(K, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                               nepochs=5)
    theirs = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                   warmup_teacher_temp_epochs=3)
    assert ours.center.shape == (1, K)
    for epoch in range(5):
        s = torch.randn(ncrops * B, K) * 2
        t = torch.randn(2 * B, K) * 2
        got = ours(s, t, epoch)
        # lightly's warm-up uses the same linspace over warmup epochs
        want = theirs(list(t.chunk(2)), list(s.chunk(ncrops)), epoch=epoch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.center.reshape(-1), theirs.center.reshape(-1), atol=1e-6, rtol=1e-5)
    assert set(ours.state_dict()) == {"center"}


def test_nn_ibot_patch_loss():
    K = 40
    mod = sslkern.nn.IBOTPatchLoss(K)
    assert mod.center.shape == (1, 1, K)
    masks = make_masks(4, 4, 4, "cpu").flatten(1)
    M = int(masks.sum())
    s, t = torch.randn(M, K), torch.randn(M, K)
    c0 = mod.center.reshape(-1).clone()
    loss = mod(s, t, masks)
    torch.testing.assert_close(loss, R.ibot_patch_loss(s, t, masks, c0, 0.1, 0.04), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.center.reshape(-1), 0.9 * c0 + 0.1 * t.mean(0), atol=1e-6, rtol=1e-5)


def test_aot_configs_cover_launcher_choices():
    from sslkern.triton_ops import dino_loss as tmod

    names = {c["name"] for c in tmod.AOT_CONFIGS}
    for K in (5, 2048, 2049, 8192, 8193, 65536):
        assert f"dino_row_stats_kernel x=fp32 compute=fp32 BLOCK={tmod._stats_block(K)}" in names
        for sn in ("fp32", "bf16", "fp16", "fp64"):
            for tn in ("fp32", "bf16", "fp16", "fp64"):
                assert f"dino_pairs_kernel s={sn} t={tn} BLOCK={tmod._pairs_block(K)}" in names


def test_ibot_chunked_path_cpu():
    # 2·K > 65,536: the C++ kernel's column-chunked path with per-token weights
    B_g, K = 5, 40001
    masks = make_masks(B_g, 3, 4, "cpu")
    M = int(masks.sum())
    s, t, c = torch.randn(M, K) * 3, torch.randn(M, K) * 3, torch.randn(K) * 0.3
    s_ref = s.clone().requires_grad_(True)
    want = R.ibot_patch_loss(s_ref, t, masks, c, 0.1, 0.04)
    want.backward()
    s2 = s.clone().requires_grad_(True)
    loss, new_c = with_center(sslkern.ibot_patch_loss(s2, t, masks, c, return_teacher_sum=True, backend="cpu"), c, M)
    loss.backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2.grad, s_ref.grad, atol=1e-9, rtol=1e-4)
    torch.testing.assert_close(new_c, 0.9 * c + 0.1 * t.mean(0), atol=1e-6, rtol=1e-5)


def _distributed_worker(rank, world, port, result_queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(123)  # same full batch on every rank; each takes its shard
        B, V, T, K = 4, 3, 2, 33
        s_all, t_all = torch.randn(V, world * B, K), torch.randn(T, world * B, K)
        c = torch.randn(K)
        sl = slice(rank * B, (rank + 1) * B)
        s, t = s_all[:, sl].reshape(V * B, K), t_all[:, sl].reshape(T * B, K)
        # the functional op is local: its teacher sum covers this rank's rows only
        _, local_sum = sslkern.dino_loss(s, t, c, n_global_crops=T, return_teacher_sum=True)
        assert torch.allclose(local_sum, t.sum(0), atol=1e-5)
        # the module all-reduces it for the center
        module = sslkern.nn.DINOLoss(K, V, 0.04, 0.04, 0, 1, center_momentum=0.9, n_global_crops=T)
        module.center.copy_(c.reshape(1, K))
        module(s, t, 0)
        p = sslkern.sinkhorn_knopp_teacher(t_all[0, sl], 0.1)
        # plain lists: the worker exits right after
        result_queue.put((rank, module.center.reshape(-1).tolist(), p.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_center_and_sinkhorn():
    """Two gloo ranks: sslkern.nn.DINOLoss's center and the Sinkhorn teacher equal the
    single-process result on the full batch (dino all-reduces the center sum in its loss
    module, dinov2 the Sinkhorn sums); the functional loss's teacher sum stays local."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_distributed_worker, args=(r, 2, port, q)) for r in range(2)]
    for pr in procs:
        pr.start()
    results = {r: (torch.tensor(c), torch.tensor(p)) for r, c, p in (q.get(timeout=120) for _ in procs)}
    for pr in procs:
        pr.join(timeout=60)
    torch.manual_seed(123)
    B, V, T, K, world = 4, 3, 2, 33, 2
    s_all, t_all = torch.randn(V, world * B, K), torch.randn(T, world * B, K)
    c = torch.randn(K)
    want_c = R.center_update(c.reshape(1, K), t_all.reshape(-1, K), 0.9).reshape(-1)
    want_p = R.sinkhorn_knopp_teacher(t_all[0], 0.1)
    for r in range(world):
        torch.testing.assert_close(results[r][0], want_c, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(results[r][1], want_p[r * B:(r + 1) * B], atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_bf16_student_fp32_teacher(backend):
    # bf16 student with an fp32 teacher (e.g. fp32 Sinkhorn probabilities); compared with the
    # fp32 reference on the rounded student. Tolerance: bf16 gradient storage (one rounding).
    name, device = backend
    B, V, T, K = 3, 4, 2, 150
    s, t, c = make(B, V, T, K, torch.float32, device, scale=1.0)
    s = s.to(torch.bfloat16)
    for mode in ("center", "sinkhorn"):
        s_ref = s.float().requires_grad_(True)
        p = R.sinkhorn_knopp_teacher(t, 0.05) if mode == "sinkhorn" else None
        want = R.dino_loss(s_ref, t, c, 0.1, 0.05, T, teacher_probs=p)
        want.backward()
        s2 = s.clone().requires_grad_(True)
        loss = sslkern.dino_loss(s2, t, c, teacher_temp=0.05, n_global_crops=T, teacher_mode=mode, backend=name)
        loss.backward()
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s2.grad.float(), s_ref.grad, atol=1e-5, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_grad_scaler_scale_gives_scaled_finite_gradients(backend):
    """GradScaler's initial scale 65,536 is inf in fp16: the backward must multiply in fp32.
    Scaled gradients are finite and exactly 65,536 × the unscaled ones (a power of two).
    Sizes keep every |gradient| below 1, so its scaled value fits fp16 (max 65,504)."""
    name, device = backend
    B, V, T, K = 8, 4, 2, 197
    student, teacher, center = make(B, V, T, K, torch.float16, device)
    grads = []
    for factor in (None, 65536.0):
        s = student.clone().requires_grad_(True)
        loss = sslkern.dino_loss(s, teacher, center, n_global_crops=T, backend=name)
        (loss if factor is None else loss * factor).backward()
        grads.append(s.grad)
    assert torch.isfinite(grads[1]).all() and grads[1].abs().max() > 0
    assert torch.equal(grads[1], grads[0] * 65536)
    # the iBOT loss runs the same op
    masks = make_masks(16, 3, 3, device)
    M = int(masks.sum())
    st = (torch.randn(M, 37, device=device) * 3).half()
    te = (torch.randn(M, 37, device=device) * 3).half()
    c = torch.zeros(37, device=device)
    igrads = []
    for factor in (1.0, 65536.0):
        s = st.clone().requires_grad_(True)
        (sslkern.ibot_patch_loss(s, te, masks, c, backend=name) * factor).backward()
        igrads.append(s.grad)
    assert torch.isfinite(igrads[1]).all() and torch.equal(igrads[1], igrads[0] * 65536)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_prototypes_leading_the_row(backend):
    """Teacher logits of -inf (masked prototypes) filling the first column blocks: the online
    logsumexp must not compute -inf - (-inf); loss and gradient equal the reference."""
    name, device = backend
    B, V, T, K = 2, 3, 2, 1100  # the Triton row-stats block is 1024 columns at this K
    student, teacher, center = make(B, V, T, K, torch.float32, device)
    teacher[:, :1030] = float("-inf")
    want_loss, want_grad, _ = reference_all(student, teacher, center, 0.1, 0.04, T)
    assert torch.isfinite(want_loss)
    s = student.clone().requires_grad_(True)
    loss = sslkern.dino_loss(s, teacher, center, n_global_crops=T, backend=name)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss, want_loss, **TOL[torch.float32])
    torch.testing.assert_close(s.grad, want_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not [b for b in BACKENDS if b.id == "triton" and not b.marks],
                    reason="triton backend unavailable")
def test_deterministic_mode_center_sum_without_atomics(monkeypatch):
    """Deterministic mode: the Triton pairs kernel does not accumulate the center's column sum
    with atomics (center_sum flag 0); a torch.sum over the teacher gives it, so the new center
    is bitwise repeatable and equals the eager formula on the same sum."""
    from sslkern.triton_ops import dino_loss as td
    flags = []
    real = td.dino_pairs_kernel

    class Rec:
        def __getitem__(self, grid):
            return lambda *a, **k: (flags.append(a[-1]), real[grid](*a, **k))

    monkeypatch.setattr(td, "dino_pairs_kernel", Rec())
    B, V, T, K = 3, 4, 2, 37
    student, teacher, center = make(B, V, T, K, torch.float32, "cpu")
    old = torch.are_deterministic_algorithms_enabled()
    outs = []
    try:
        for det in (True, True, False):
            torch.use_deterministic_algorithms(det)
            outs.append(with_center(sslkern.dino_loss(student, teacher, center, n_global_crops=T,
                                                      return_teacher_sum=True, backend="triton"),
                                    center, teacher.shape[0]))
    finally:
        torch.use_deterministic_algorithms(old)
    assert flags == [0, 0, 1]
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][0], outs[1][0])
    want = center * 0.9 + teacher.sum(0) / (T * B) * 0.1
    torch.testing.assert_close(outs[0][1], want, atol=0, rtol=0)
    torch.testing.assert_close(outs[2][1], want, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not [b for b in BACKENDS if b.id == "triton" and not b.marks],
                    reason="triton backend unavailable")
def test_ibot_check_masks_false_has_no_host_sync():
    from conftest import SyncCounter
    masks = make_masks(4, 3, 5, "cpu")
    M = int(masks.sum())
    s, t = torch.randn(M, 37), torch.randn(M, 37)
    c = torch.zeros(37)
    counts, losses = [], []
    for check in (True, False):
        with SyncCounter() as sc:
            losses.append(sslkern.ibot_patch_loss(s, t, masks, c, check_masks=check, backend="triton"))
        counts.append(sc.n)
    assert counts == [1, 0] and torch.equal(losses[0], losses[1])
