"""masked_regression_loss's per-element weights and L1 option (context encoders: the ×10 overlap
band; SimMIM: L1 on masked pixels): every backend against the eager formula, gradients, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import sslkern
from sslkern.ops.masked_regression_loss import dispatch

from conftest import backend_params

BACKENDS = backend_params(dispatch, include_reference=True)


def eager(pred, target, mask, ids, weight, beta, l1, scale, reduction):
    """The formula: scale · Σ_{counted tokens} Σ_d w · ℓ(pred − y), clone batch M = R / B."""
    B, T, D = target.shape
    M = pred.shape[0] // B
    cd = torch.float64 if pred.dtype == torch.float64 else torch.float32
    y = target.to(cd).repeat_interleave(M, 0)
    if ids is not None:
        y = y.gather(1, ids.long().unsqueeze(-1).expand(-1, -1, D))
    x = pred.to(cd)
    if l1:
        e = (x - y).abs()
    elif beta == 0:
        e = (x - y) ** 2
    else:
        e = F.smooth_l1_loss(x, y, reduction="none", beta=beta)
    keep = torch.ones(pred.shape[:2], dtype=torch.bool) if mask is None else mask
    e = e * keep.unsqueeze(-1) * (1.0 if weight is None else weight)
    loss = e.sum() * scale
    if reduction == "mean":
        loss = loss / max(int(keep.sum()), 1)
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["mask", "ids", "full"])
@pytest.mark.parametrize("kind", ["l2", "l1", "smooth"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_weights_and_l1_match_the_formula(backend, form, kind, dtype):
    name, device = backend
    B, M, T, D = 3, 2, 37, 48
    target = torch.randn(B, T, D, device=device)
    pred = torch.randn(B * M, T, D, device=device).to(dtype)
    mask = ids = None
    if form == "mask":
        mask = torch.rand(B * M, T, device=device) < 0.4
    elif form == "ids":
        ids = torch.randint(0, T, (B * M, 11), device=device)
        pred = pred[:, :11].contiguous()
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(pred.shape, device=device) * 10).to(cd)
    weight[0] = 0.0
    beta, l1 = (0.3, False) if kind == "smooth" else (0.0, kind == "l1")
    for reduction in ("sum", "mean"):
        p = pred.detach().clone().requires_grad_()
        loss = sslkern.masked_regression_loss(p, target, mask, ids=ids, weight=weight, beta=beta, l1=l1, scale=0.25,
                                              reduction=reduction, backend=name)
        q = pred.detach().clone().double().requires_grad_()
        want = eager(q, target.double(), mask, ids, weight.double(), beta, l1, 0.25, reduction)
        tol = dict(rtol=1e-5, atol=1e-4) if dtype != torch.float64 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(loss.double(), want, **tol)
        loss.backward()
        want.backward()
        gtol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.grad.double(), q.grad, **gtol)
        assert float(p.grad[0].abs().sum()) == 0  # zero weight: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_ones_equals_unweighted(backend):
    name, device = backend
    target = torch.randn(2, 50, 24, device=device)
    pred = torch.randn(2, 50, 24, device=device)
    mask = torch.rand(2, 50, device=device) < 0.5
    a = sslkern.masked_regression_loss(pred, target, mask, backend=name)
    b = sslkern.masked_regression_loss(pred, target, mask, weight=torch.ones_like(pred), backend=name)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l1", [False, True])
def test_gradcheck_float64(backend, l1):
    name, device = backend
    target = torch.randn(2, 5, 3, dtype=torch.float64, device=device)
    pred = torch.randn(4, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(4, 5, device=device) < 0.6
    weight = torch.rand(4, 5, 3, dtype=torch.float64, device=device) + 0.5
    fn = lambda p: sslkern.masked_regression_loss(p, target, mask, weight=weight, l1=l1, reduction="mean",  # noqa: E731
                                                  backend=name)
    assert torch.autograd.gradcheck(fn, (pred,))


def test_opcheck_new_arguments():
    target = torch.randn(2, 9, 7)
    pred = torch.randn(4, 9, 7, requires_grad=True)
    mask = torch.rand(4, 9) < 0.5
    w = torch.rand(4, 9, 7)
    torch.library.opcheck(torch.ops.sslkern.masked_regression_loss.default,
                          (pred, target, mask, None, 0.0, 0.3, False, w, True, ""))
    torch.library.opcheck(torch.ops.sslkern.masked_regression_loss.default,
                          (pred, target, None, None, 0.5, 0.3, True, w, False, ""))
    torch.library.opcheck(torch.ops.sslkern.masked_regression_loss_backward.default,
                          (torch.tensor(1.5), pred.detach(), target, mask, None, 0.0, 0.3, True, w, True, ""))


def test_compile_fullgraph_with_weights():
    target = torch.randn(2, 9, 7)
    pred = torch.randn(2, 9, 7)
    w = torch.rand(2, 9, 7)

    def f(p):
        return sslkern.masked_regression_loss(p * 1.5, target, weight=w, l1=True) + 1.0

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(pred), f(pred), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw,match,exc", [
    (dict(weight=torch.ones(4, 9, 6)), r"weight expected shape \(4, 9, 7\)", ValueError),
    (dict(weight=torch.ones(4, 9, 7, dtype=torch.float64)), r"weight expected dtype in \(float32\)", TypeError),
    (dict(l1=True, beta=0.5), r"l1 expected beta 0", ValueError),
    (dict(l1=1), r"l1 expected a bool", TypeError),
])
def test_bad_new_arguments(kw, match, exc):
    with pytest.raises(exc, match=match):
        sslkern.masked_regression_loss(torch.randn(4, 9, 7), torch.randn(2, 9, 7), **kw)
