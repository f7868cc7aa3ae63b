"""sslkern.prototype_loss: the DINO / iBOT prototype layer fused with the loss.

Every backend against the unfused composition it replaces — the weight-normalised last
layer (``sslkern.nn.DINOHead.last_layer``) → ``dino_loss`` / ``ibot_patch_loss`` with
autograd — and against dino's original ``DINOHead`` (``nn.utils.weight_norm``) + ``DINOLoss``
code: loss, center update and the gradients to the features, ``v`` and ``g``. Odd K and Db,
tile counts that do not divide K, bf16, float64 gradcheck, opcheck, torch.compile, bad input.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sslkern
from sslkern.nn.dino import update_center_
from sslkern.ops.prototype_loss import dispatch

BACKENDS = ["reference", "cpu", "triton"]


def _skip_unavailable(backend, device="cpu"):
    ok, why = dispatch.usable(backend, torch.device(device))
    if not ok:
        pytest.skip(why)


def make(B, V, T, K, D, dtype=torch.float32, seed=0, gain_grad=True):
    g = torch.Generator().manual_seed(seed)
    zs = F.normalize(torch.randn(V * B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()
    zt = F.normalize(torch.randn(T * B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    v = torch.randn(K, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    gain = (1 + 0.2 * torch.randn(K, 1, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(gain_grad)
    vt = v.detach() + 0.2 * torch.randn(K, D, generator=g, dtype=torch.float64).to(dtype)
    gt = (1 + 0.1 * torch.randn(K, 1, generator=g, dtype=torch.float64)).to(dtype)
    c = 0.3 * torch.randn(K, generator=g, dtype=torch.float64).to(dtype)
    return zs, zt, v, gain, vt, gt, c


def _w(v, g):
    return v if g is None else g * v / v.norm(dim=1, keepdim=True)


def unfused(zs, zt, v, gain, vt, gt, c, *, masks=None, T=2, ts=0.1, tt=0.04, backend="reference"):
    """The head's last layer with autograd → the (fused-logits) loss: what the op replaces."""
    s, t = zs @ _w(v, gain).t(), zt @ _w(vt, gt).t()
    if masks is None:
        return sslkern.dino_loss(s, t, c, student_temp=ts, teacher_temp=tt, n_global_crops=T,
                                 return_teacher_sum=True, backend=backend)
    return sslkern.ibot_patch_loss(s, t, masks, c, student_temp=ts, teacher_temp=tt, return_teacher_sum=True,
                                   backend=backend)


def fused(zs, zt, v, gain, vt, gt, c, *, masks=None, T=2, ts=0.1, tt=0.04, backend=None):
    return sslkern.prototype_loss(zs, zt, v, vt, c, gain=gain, teacher_gain=gt, masks=masks, student_temp=ts,
                                  teacher_temp=tt, n_global_crops=T, return_teacher_sum=True, backend=backend)


def _grads(loss, x):
    ins = [t for t in (x[0], x[2], x[3]) if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, ins)


def _close(a, b, rtol, atol_frac):
    """max |a - b| <= rtol·|b| + atol_frac·max|b| elementwise."""
    a, b = a.double(), b.double()
    tol = rtol * b.abs() + atol_frac * b.abs().max()
    assert bool(((a - b).abs() <= tol).all()), float((a - b).abs().max() / b.abs().max())


# shapes: (B, V, T, K, Db): odd K and Db; K not a multiple of any tile (CPU tiles of 16·j,
# 1024 at most); few and many rows (the CPU tile width follows the row count)
SHAPES = [(3, 5, 2, 1000, 37), (2, 3, 2, 4099, 16), (4, 2, 1, 77, 5), (1, 4, 2, 33, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dino_form_matches_unfused_head_and_loss(backend, shape):
    _skip_unavailable(backend)
    B, V, T, K, D = shape
    if backend == "triton" and K > 1100:
        pytest.skip("interpreter: small shapes only")
    x = make(B, V, T, K, D, seed=K)
    l0, c0 = unfused(*x, T=T)
    g0 = _grads(l0, x)
    l1, c1 = fused(*x, T=T, backend=backend)
    g1 = _grads(l1, x)
    assert l1.dtype == torch.float32 and l1.shape == ()
    # fp32 tolerances: the logits are formed by other GEMM orders (tiles) than the unfused layer
    assert float(l1) == pytest.approx(float(l0), rel=2e-6, abs=2e-6)
    _close(c1, c0, 1e-6, 1e-6)
    assert c1.shape == c0.shape
    for a, b in zip(g1, g0):
        assert a.shape == b.shape and a.dtype == b.dtype
        _close(a, b, 1e-4, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_gain_is_plain_linear(backend):
    _skip_unavailable(backend)
    zs, zt, v, _, vt, _, c = make(3, 4, 2, 301, 19, seed=5)
    l0, c0 = unfused(zs, zt, v, None, vt, None, c)
    g0 = torch.autograd.grad(l0, [zs, v])
    l1, c1 = fused(zs, zt, v, None, vt, None, c, backend=backend)
    g1 = torch.autograd.grad(l1, [zs, v])
    assert float(l1) == pytest.approx(float(l0), rel=2e-6)
    _close(c1, c0, 1e-6, 1e-6)
    for a, b in zip(g1, g0):
        _close(a, b, 1e-4, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_gain_and_weight_only_grad(backend):
    """norm_last_layer: g frozen (no g gradient); features without grad: only dv."""
    _skip_unavailable(backend)
    zs, zt, v, gain, vt, gt, c = make(2, 4, 2, 129, 11, seed=7, gain_grad=False)
    zs = zs.detach()
    l0, _ = unfused(zs, zt, v, gain, vt, gt, c)
    (g0,) = torch.autograd.grad(l0, [v])
    l1, _ = fused(zs, zt, v, gain, vt, gt, c, backend=backend)
    (g1,) = torch.autograd.grad(l1, [v])
    _close(g1, g0, 1e-4, 2e-5)


def make_masks(B_g, L, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B_g, L, generator=g) < torch.rand(B_g, 1, generator=g) * 0.6
    m[0] = False  # an image with no masked token still counts in B_g
    m[1, :2] = True
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,D", [(517, 13), (64, 8)])
def test_ibot_form_matches_unfused_head_and_loss(backend, K, D):
    _skip_unavailable(backend)
    masks = make_masks(6, 25, seed=K)
    M = int(masks.sum())
    x = make(M, 1, 1, K, D, seed=D)
    l0, c0 = unfused(*x, masks=masks)
    g0 = _grads(l0, x)
    l1, c1 = fused(*x, masks=masks, backend=backend)
    g1 = _grads(l1, x)
    assert float(l1) == pytest.approx(float(l0), rel=2e-6, abs=2e-6)
    _close(c1, c0, 1e-6, 1e-6)
    for a, b in zip(g1, g0):
        _close(a, b, 1e-4, 2e-5)


# ---------------------------------------------------------------------------------------
# dino's original code (facebookresearch/dino, vision_transformer.py DINOHead's last layer,
# main_dino.py DINOLoss), transcribed for comparison
# ---------------------------------------------------------------------------------------
class _DinoOriginalLoss(nn.Module):
    def __init__(self, out_dim, ncrops, teacher_temp, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops, self.teacher_temp = student_temp, center_momentum, ncrops, teacher_temp
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        with torch.no_grad():
            batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total_loss


def _dino_last_layer(D, K, norm_last_layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = nn.utils.weight_norm(nn.Linear(D, K, bias=False))
    layer.weight_g.data.fill_(1)
    if norm_last_layer:
        layer.weight_g.requires_grad = False
    return layer


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_matches_dino_original_head_and_loss(norm_last_layer):
    torch.manual_seed(0)
    B, ncrops, K, D = 3, 6, 515, 24
    ours = sslkern.nn.DINOHead(40, K, nlayers=2, hidden_dim=32, bottleneck_dim=D, norm_last_layer=norm_last_layer)
    theirs_layer = _dino_last_layer(D, K, norm_last_layer)
    with torch.no_grad():
        theirs_layer.weight_v.copy_(ours.last_layer.weight_v)
        if not norm_last_layer:  # a gain that is not 1 everywhere
            ours.last_layer.weight_g.mul_(1 + 0.3 * torch.rand(K, 1))
            theirs_layer.weight_g.copy_(ours.last_layer.weight_g)
    teacher = copy.deepcopy(ours).requires_grad_(False)
    with torch.no_grad():
        teacher.last_layer.weight_v.add_(0.1 * torch.randn(K, D))
    x = torch.randn(ncrops * B, 40)
    crit = _DinoOriginalLoss(K, ncrops, teacher_temp=0.04)
    crit.center.copy_(0.1 * torch.randn(1, K))
    center = crit.center.clone()
    # theirs: our MLP trunk (shared), dino's weight_norm last layer, dino's DINOLoss
    zs = ours.bottleneck(x)
    with torch.no_grad():
        zt = teacher.bottleneck(x[:2 * B])
        t_logits = F.linear(zt, teacher.last_layer.weight)
    loss0 = crit(theirs_layer(zs), t_logits)
    params = [p for p in ours.mlp.parameters()]
    theirs_params = [theirs_layer.weight_v] + ([theirs_layer.weight_g] if not norm_last_layer else [])
    g0 = torch.autograd.grad(loss0, params + theirs_params)
    # ours: the fused path on the head's bottleneck features and last layers
    zs1 = ours.bottleneck(x)
    with torch.no_grad():
        zt1 = teacher.bottleneck(x[:2 * B])
    loss1, teacher_sum = sslkern.prototype_loss(
        zs1, zt1, ours.last_layer.weight_v, teacher.last_layer.weight_v, center, gain=ours.last_layer.weight_g,
        teacher_gain=teacher.last_layer.weight_g, student_temp=0.1, teacher_temp=0.04, return_teacher_sum=True)
    new_center = center.clone()
    update_center_(new_center, teacher_sum, 2 * B, 0.9)
    our_params = [ours.last_layer.weight_v] + ([ours.last_layer.weight_g] if not norm_last_layer else [])
    g1 = torch.autograd.grad(loss1, params + our_params)
    assert float(loss1) == pytest.approx(float(loss0), rel=2e-6)
    _close(new_center.reshape(1, K), crit.center, 1e-6, 1e-6)
    for a, b in zip(g1, g0):
        _close(a, b, 1e-4, 2e-5)


# ---------------------------------------------------------------------------------------
# dtypes, autograd machinery, compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(backend, dtype):
    """fp16 / bf16 features and weights: the fused op forms the logits in fp32 from the
    stored values, so it equals the fp32 composition on the same (rounded) inputs; the
    gradients come back in the inputs' dtypes."""
    _skip_unavailable(backend)
    if backend == "triton" and dtype == torch.bfloat16:
        pass  # the Triton kernels upcast tiles to fp32 before tl.dot
    x = make(3, 4, 2, 203, 17, dtype=dtype, seed=3)
    x32 = [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in x]
    l0, c0 = unfused(*x32)
    g0 = _grads(l0, x32)
    l1, c1 = fused(*x, backend=backend)
    g1 = _grads(l1, x)
    assert l1.dtype == torch.float32
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)
    assert c1.dtype == torch.float32  # the teacher column sum is accumulated (and returned) in fp32
    _close(c1, c0, 1e-4, 1e-4)
    for a, b in zip(g1, g0):
        assert a.dtype == dtype
        _close(a.float(), b, 1e-2, 1e-2)  # one rounding to the storage dtype


def test_bf16_head_close_to_unfused_bf16():
    """Against the unfused head in bf16 (logits rounded to bf16 there): loose agreement."""
    x = make(4, 4, 2, 1000, 64, dtype=torch.bfloat16, seed=11)
    l0, _ = unfused(*x)
    l1, _ = fused(*x)
    assert float(l1) == pytest.approx(float(l0), rel=2e-2)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    _skip_unavailable(backend)
    zs, zt, v, gain, vt, gt, c = make(2, 3, 2, 23, 4, dtype=torch.float64, seed=1)

    def f(zs, v, gain):
        return sslkern.prototype_loss(zs, zt, v, vt, c, gain=gain, teacher_gain=gt, backend=backend)

    assert torch.autograd.gradcheck(f, (zs, v, gain), eps=1e-6, atol=1e-7)
    masks = make_masks(3, 8, seed=2)
    M = int(masks.sum())
    zs, zt, v, gain, vt, gt, c = make(M, 1, 1, 19, 3, dtype=torch.float64, seed=4)

    def fi(zs, v, gain):
        return sslkern.prototype_loss(zs, zt, v, vt, c, gain=gain, teacher_gain=gt, masks=masks, backend=backend)

    assert torch.autograd.gradcheck(fi, (zs, v, gain), eps=1e-6, atol=1e-7)


def test_backward_scales_with_upstream_gradient():
    x = make(2, 3, 2, 57, 6, seed=9)
    l1, _ = fused(*x)
    g1 = _grads(l1, x)
    l2, _ = fused(*x)
    g2 = _grads(l2 * 3.5, x)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, 3.5 * b)


def test_opcheck():
    zs, zt, v, gain, vt, gt, c = make(2, 3, 2, 41, 7, seed=2)
    for backend in ("reference", "cpu"):
        if not dispatch.usable(backend, torch.device("cpu"))[0] or (
                backend == "cpu" and not hasattr(torch.ops.sslkern_C, "prototype_loss_cpu")):
            continue
        args = (zs, zt, v, gain, vt, gt.detach(), c, None, 1.0 / 8, 0.1, 0.04, 3, 2, True, True, True, True, backend)
        torch.library.opcheck(torch.ops.sslkern.prototype_loss.default, args)
        w = torch.rand(6, dtype=torch.float32)
        args = (zs, zt[:2].repeat(3, 1), v, None, vt, None, c, w, 0.5, 0.1, 0.04, 1, 1, False, True, False, False,
                backend)
        torch.library.opcheck(torch.ops.sslkern.prototype_loss.default, args)


def test_compile_fullgraph_matches_eager():
    x = make(2, 4, 2, 97, 9, seed=6)
    masks = make_masks(4, 9, seed=1)
    xi = make(int(masks.sum()), 1, 1, 97, 9, seed=8)

    def step(zs, zt, v, gain, vt, gt, c):
        loss, nc = sslkern.prototype_loss(zs, zt, v, vt, c, gain=gain, teacher_gain=gt, return_teacher_sum=True)
        return loss, nc

    def step_ibot(zs, zt, v, gain, vt, gt, c):
        return sslkern.prototype_loss(zs, zt, v, vt, c, gain=gain, teacher_gain=gt, masks=masks, check_masks=False,
                                      return_teacher_sum=True)

    for fn, args in ((step, x), (step_ibot, xi)):
        l0, c0 = fn(*args)
        g0 = _grads(l0, args)
        l1, c1 = torch.compile(fn, fullgraph=True)(*args)
        g1 = _grads(l1, args)
        torch.testing.assert_close(l1, l0)
        torch.testing.assert_close(c1, c0)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b)


def test_no_grad_forward_only():
    x = make(2, 3, 2, 65, 8, seed=12)
    with torch.no_grad():
        l1, c1 = fused(*x)
    l0, c0 = unfused(*x)
    assert not l1.requires_grad
    assert float(l1) == pytest.approx(float(l0), rel=2e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_in_teacher_row_reaches_paired_students_only(backend):
    _skip_unavailable(backend)
    zs, zt, v, gain, vt, gt, c = make(3, 4, 2, 50, 6, seed=13)
    zt = zt.clone()
    zt[0, 1] = float("nan")  # teacher crop 0, image 0
    l1 = sslkern.prototype_loss(zs, zt, v, vt, c, gain=gain, teacher_gain=gt, backend=backend)
    (g,) = torch.autograd.grad(l1, [zs])
    assert torch.isnan(l1)
    bad = torch.isnan(g).any(1).view(4, 3)  # (crop, image)
    expect = torch.zeros(4, 3, dtype=torch.bool)
    expect[1:, 0] = True  # every student crop of image 0 but crop 0 itself
    assert torch.equal(bad, expect)


def test_bad_input():
    zs, zt, v, gain, vt, gt, c = make(2, 3, 2, 40, 6)
    E = sslkern.ArgumentError
    with pytest.raises(E, match="teacher expected 6 columns"):
        sslkern.prototype_loss(zs, zt[:, :5], v, vt, c)
    with pytest.raises(E, match="weight expected shape"):
        sslkern.prototype_loss(zs, zt, v[:, :5], vt, c)
    with pytest.raises(E, match="teacher_weight expected 40 rows"):
        sslkern.prototype_loss(zs, zt, v, vt[:39], c)
    with pytest.raises(E, match="center expected shape"):
        sslkern.prototype_loss(zs, zt, v, vt, c[:39])
    with pytest.raises(E, match="gain expected shape"):
        sslkern.prototype_loss(zs, zt, v, vt, c, gain=gain[:39])
    with pytest.raises(E, match="teacher_gain expected shape"):
        sslkern.prototype_loss(zs, zt, v, vt, c, teacher_gain=torch.ones(40, 2))
    with pytest.raises(E, match="teacher_mode expected 'center'"):
        sslkern.prototype_loss(zs, zt, v, vt, c, teacher_mode="sinkhorn")
    with pytest.raises(E, match="student_temp"):
        sslkern.prototype_loss(zs, zt, v, vt, c, student_temp=0.0)
    with pytest.raises(E, match="teacher expected T·B rows"):
        sslkern.prototype_loss(zs, zt[:3], v, vt, c)
    with pytest.raises(E, match="no \\(teacher, student\\) pairs"):
        sslkern.prototype_loss(zs[:2], zt[:2], v, vt, c, n_global_crops=1)
    with pytest.raises(E, match="masks expected 3 set entries"):
        m = torch.zeros(2, 4, dtype=torch.bool)
        m[0, :3] = True
        m[1, 0] = True
        sslkern.prototype_loss(zs[:3], zt[:3], v, vt, c, masks=m)
    with pytest.raises(TypeError, match="student expected dtype"):
        sslkern.prototype_loss(zs.int(), zt, v, vt, c)
    with pytest.raises(E, match="teacher_temp expected a finite number"):
        sslkern.prototype_loss(zs, zt, v, vt, c, teacher_temp=float("nan"))
    with pytest.raises(E, match="return_teacher_sum must be one of"):
        sslkern.prototype_loss(zs, zt, v, vt, c, return_teacher_sum=None)
    with pytest.raises(E, match="check_masks must be one of"):
        sslkern.prototype_loss(zs[:3], zt[:3], v, vt, c, masks=torch.ones(1, 3, dtype=torch.bool), check_masks="no")


def test_nn_losses_fused_match_unfused():
    """sslkern.nn.DINOLoss / IBOTPatchLoss given the prototype layers: same loss and center as on the logits."""
    torch.manual_seed(3)
    K, D, B, ncrops = 300, 16, 3, 5
    head = sslkern.nn.DINOHead(20, K, nlayers=2, hidden_dim=24, bottleneck_dim=D)
    teacher = copy.deepcopy(head).requires_grad_(False)
    x = torch.randn(ncrops * B, 20)
    a = sslkern.nn.DINOLoss(K, ncrops, 0.04, 0.07, 3, 10)
    b = copy.deepcopy(a)
    a.center.normal_()
    b.center.copy_(a.center)
    l0 = a(head(x), teacher(x[:2 * B]), epoch=1)
    l1 = b(head.bottleneck(x), teacher.bottleneck(x[:2 * B]), 1, head.last_layer, teacher.last_layer)
    assert float(l1) == pytest.approx(float(l0), rel=2e-6)
    torch.testing.assert_close(b.center, a.center)
    masks = make_masks(4, 6, seed=3)
    M = int(masks.sum())
    xp = torch.randn(M, 20)
    p = sslkern.nn.IBOTPatchLoss(K)
    q = copy.deepcopy(p)
    l0 = p(head(xp), teacher(xp), masks, teacher_temp=0.05)
    l1 = q(head.bottleneck(xp), teacher.bottleneck(xp), masks, teacher_temp=0.05, student_layer=head.last_layer,
           teacher_layer=teacher.last_layer)
    assert float(l1) == pytest.approx(float(l0), rel=2e-6)
    torch.testing.assert_close(q.center, p.center)
    with pytest.raises(ValueError, match="sinkhorn"):
        s = sslkern.nn.DINOLoss(K, ncrops, 0.04, 0.07, 3, 10, teacher_mode="sinkhorn")
        s(head.bottleneck(x), teacher.bottleneck(x[:2 * B]), 1, head.last_layer, teacher.last_layer)
    with pytest.raises(ValueError, match="both or neither"):
        b(head.bottleneck(x), teacher.bottleneck(x[:2 * B]), 1, head.last_layer)
    assert np.isfinite(float(l1))


def test_matches_sslkern_reference_function():
    """sslkern.reference.prototype_loss (dino's head math + DINOLoss / iBOTPatchLoss math)."""
    x = make(3, 4, 2, 211, 10, seed=21)
    zs, zt, v, gain, vt, gt, c = x
    l0 = sslkern.reference.prototype_loss(zs, zt, v, vt, c, gain, gt)
    g0 = _grads(l0, x)
    l1 = sslkern.prototype_loss(zs, zt, v, vt, c, gain=gain, teacher_gain=gt)
    g1 = _grads(l1, x)
    assert float(l1) == pytest.approx(float(l0), rel=2e-6)
    for a, b in zip(g1, g0):
        _close(a, b, 1e-4, 2e-5)
    masks = make_masks(5, 7, seed=4)
    xi = make(int(masks.sum()), 1, 1, 211, 10, seed=22)
    l0 = sslkern.reference.prototype_loss(xi[0], xi[1], xi[2], xi[4], xi[6], xi[3], xi[5], masks)
    l1 = sslkern.prototype_loss(xi[0], xi[1], xi[2], xi[4], xi[6], gain=xi[3], teacher_gain=xi[5], masks=masks)
    assert float(l1) == pytest.approx(float(l0), rel=2e-6)
