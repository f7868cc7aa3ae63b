"""swav_loss / sslkern.nn.SwAVLoss: the official swav loss loop (distributed_sinkhorn, queue
included), lightly's SwaVLoss, the eager reference, and sinkhorn_knopp_teacher(keep_last)."""
import pytest
import torch
import torch.nn.functional as F

import sslkern
from sslkern.ops.dino_loss import dispatch as dino_dispatch
from sslkern.reference import swav_loss as ref_swav_loss

from _redundancy_ref import SwAVLossLoop
from conftest import backend_params

BACKENDS = backend_params(dino_dispatch)  # the swapped prediction runs on the dino_loss op


def _scores(b, k, crops, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(crops * b, d, generator=g), dim=1)
    w = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z, w


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("crops,queue", [((2,), False), ((2, 4), False), ((2, 6), True)])
def test_equals_official_swav_loss_loop(backend, crops, queue):
    """swav main_swav.py: the codes of crops 0 and 1 (distributed_sinkhorn, ε 0.05, 3 iterations; the
    queue's scores first when it is full), the swapped prediction over every other crop at τ 0.1;
    loss and gradient w.r.t. the scores."""
    name, device = backend
    b, k, v = 24, 40, sum(crops)
    z, w = _scores(b, k, v)
    scores = (z @ w.t()).requires_grad_(True)
    q_emb = F.normalize(torch.randn(2, 48, 16), dim=2) if queue else None
    loop = SwAVLossLoop(crops, queue=q_emb.clone() if queue else None)
    want = loop.step(z, scores, w, b)
    q_scores = [q_emb[i] @ w.t() for i in range(2)] if queue else None
    got = sslkern.swav_loss(scores.to(device), v, queue_scores=None if q_scores is None else [q.to(device) for q in q_scores],
                            backend=name)
    torch.testing.assert_close(got.cpu(), want.detach(), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(_grad(got, scores), _grad(want, scores), atol=1e-7, rtol=1e-5)
    ref = ref_swav_loss(scores, v, queue_scores=q_scores)
    torch.testing.assert_close(ref.detach(), want.detach(), atol=2e-6, rtol=2e-6)


def test_module_queue_equals_official_over_steps():
    """sslkern.nn.SwAVLoss with a queue of 2 batches vs the official loop with the same queue, over
    4 steps: the queue is filled from step 1 (newest first), read from step 3 (once its last row
    is set); losses and gradients w.r.t. the embeddings and the prototypes."""
    b, k, d, crops = 16, 30, 12, (2, 2)
    v = sum(crops)
    torch.manual_seed(1)
    w0 = torch.randn(k, d)
    protos = sslkern.nn.SwAVPrototypes(d, k)
    with torch.no_grad():
        protos.weight.copy_(w0)
    crit = sslkern.nn.SwAVLoss(v, d, queue_length=2 * b)
    loop = SwAVLossLoop(crops, queue=torch.zeros(2, 2 * b, d))
    for step in range(4):
        x = torch.randn(v * b, d)
        protos.normalize_()
        w_ref = F.normalize(w0 if step == 0 else w_ref.detach(), dim=1).requires_grad_(True)  # noqa: F821
        with torch.no_grad():
            assert torch.allclose(protos.weight, w_ref, atol=1e-6)
        za = F.normalize(x.clone().requires_grad_(True), dim=1)
        zb = F.normalize(x.clone().requires_grad_(True), dim=1)
        got = crit(za, protos, use_queue=True)
        want = loop.step(zb, zb @ w_ref.t(), w_ref.detach(), b)
        torch.testing.assert_close(got, want, atol=3e-6, rtol=3e-6)
        g_got = torch.autograd.grad(got, protos.weight)[0]
        g_want = torch.autograd.grad(want, w_ref)[0]
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-4)
        assert crit.queue_full() == (step >= 1)
        assert loop.use_the_queue == (step >= 2)  # the official reads it from the step after it filled up
        torch.testing.assert_close(crit.queue, loop.queue)
        with torch.no_grad():  # one "optimizer step" on both copies of the prototypes
            protos.weight.sub_(0.5 * g_got)
            w_ref = w_ref - 0.5 * g_want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_queue", [False, True])
def test_equals_lightly_swav_loss(backend, with_queue):
    lightly_loss = pytest.importorskip("lightly.loss")
    name, device = backend
    b, k, v = 20, 32, 6
    z, w = _scores(b, k, v, seed=3)
    scores = (z @ w.t()).to(device).requires_grad_(True)
    hi, lo = [scores[i * b:(i + 1) * b] for i in range(2)], [scores[i * b:(i + 1) * b] for i in range(2, v)]
    queue = [F.normalize(torch.randn(40, 16), dim=1).to(device) @ w.to(device).t() for _ in range(2)] if with_queue \
        else None
    want = lightly_loss.SwaVLoss()(hi, lo, queue)
    got = sslkern.swav_loss(scores, v, queue_scores=queue, backend=name)
    torch.testing.assert_close(got, want.reshape(()), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(_grad(got, scores), _grad(want.sum(), scores), atol=1e-7, rtol=1e-5)


def test_codes_and_stats():
    b, k, v = 32, 16, 4
    z, w = _scores(b, k, v)
    scores = z @ w.t()
    codes = sslkern.swav_codes(scores, v)
    assert codes.shape == (2 * b, k)
    torch.testing.assert_close(codes.sum(1), torch.ones(2 * b))
    # per crop: every prototype gets b/k of each crop's mass after the last row step... up to
    # the last (column) normalisation: the equipartition is per crop, not joint
    for i in range(2):
        col = codes[i * b:(i + 1) * b].sum(0)
        assert float((col - b / k).abs().max()) < 0.5 * b / k
    joint = sslkern.sinkhorn_knopp_teacher(scores[:2 * b], 0.05)
    assert not torch.allclose(joint, codes)  # dinov2's joint Sinkhorn is a different assignment
    loss, st = sslkern.swav_loss(scores, v, return_stats=True)
    torch.testing.assert_close(st["loss_frac"], loss / torch.log(torch.tensor(float(k))))
    ent = -(codes * codes.clamp_min(1e-30).log()).sum(1).mean() / torch.log(torch.tensor(float(k)))
    torch.testing.assert_close(st["code_entropy"], ent)
    # given codes: the same loss
    torch.testing.assert_close(sslkern.swav_loss(scores, v, codes=codes), loss)


def test_collapsed_embeddings_give_uniform_codes_and_loss_ln_k():
    b, k, v = 16, 20, 4
    w = F.normalize(torch.randn(k, 8), dim=1)
    z = F.normalize(torch.ones(v * b, 8), dim=1)
    loss, st = sslkern.swav_loss(z @ w.t(), v, return_stats=True)
    assert float(st["code_entropy"]) > 0.999
    assert float(st["loss_frac"]) >= 1.0 - 1e-6  # cross-entropy of uniform codes >= ln K


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sinkhorn_keep_last(backend):
    t = torch.randn(50, 30) * 3
    full = sslkern.sinkhorn_knopp_teacher(t, 0.05, 3, backend=backend)
    last = sslkern.sinkhorn_knopp_teacher(t, 0.05, 3, keep_last=12, backend=backend)
    assert last.shape == (12, 30)
    torch.testing.assert_close(last, full[-12:], atol=0, rtol=0)
    torch.testing.assert_close(sslkern.sinkhorn_knopp_teacher(t, 0.05, keep_last=50, backend=backend), full)
    with pytest.raises(ValueError, match=r"keep_last must be in \[1, 50\], got"):
        sslkern.sinkhorn_knopp_teacher(t, 0.05, keep_last=0)
    with pytest.raises(ValueError, match=r"keep_last must be in \[1, 50\], got"):
        sslkern.sinkhorn_knopp_teacher(t, 0.05, keep_last=51)


def test_sinkhorn_keep_last_opcheck():
    torch.library.opcheck(torch.ops.sslkern.sinkhorn_teacher.default, (torch.randn(9, 7), 0.1, 3, 4, ""))


def test_prototypes_normalize_in_place():
    p = sslkern.nn.SwAVPrototypes(8, 5)
    ptr = p.weight.data_ptr()
    with torch.no_grad():
        p.weight.mul_(3.0)
    p.normalize_()
    assert p.weight.data_ptr() == ptr and p.weight.requires_grad
    torch.testing.assert_close(p.weight.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("call,exc,match", [
    (lambda s: sslkern.swav_loss(s, 3), ValueError, r"scores expected n_crops·B rows with n_crops = 3"),
    (lambda s: sslkern.swav_loss(s, 1), ValueError, r"n_crops must be in \[2, inf\], got 1"),
    (lambda s: sslkern.swav_loss(s, 4, n_assign=5), ValueError, r"n_assign must be in \[1, 4\], got 5"),
    (lambda s: sslkern.swav_loss(s, 4, temperature=0.0), ValueError, "temperature must be in"),
    (lambda s: sslkern.swav_loss(s, 4, epsilon=-1.0), ValueError, "epsilon must be in"),
    (lambda s: sslkern.swav_loss(s, 4, queue_scores=[torch.randn(5, 10)]), ValueError,
     "queue_scores expected 2 tensors"),
    (lambda s: sslkern.swav_loss(s, 4, queue_scores=[torch.randn(5, 9)] * 2), ValueError,
     r"queue_scores\[0\] expected 10 columns"),
    (lambda s: sslkern.swav_loss(s, 4, codes=torch.rand(3, 10)), ValueError, r"codes expected shape \(4, 10\)"),
    (lambda s: sslkern.swav_loss(s.long(), 4), TypeError, "scores expected dtype in"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(8, 10))


def test_compile_fullgraph_equals_eager():
    z, w = _scores(16, 24, 4, seed=7)
    scores = (z @ w.t()).requires_grad_(True)
    q = [F.normalize(torch.randn(32, 16), dim=1) @ w.t() for _ in range(2)]

    def f(s):
        return sslkern.swav_loss(s, 4) + sslkern.swav_loss(s, 4, queue_scores=q, epsilon=0.03)

    eager = f(scores)
    g_eager = _grad(eager, scores)
    got = torch.compile(f, fullgraph=True)(scores)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_grad(got, scores), g_eager, atol=1e-7, rtol=1e-5)
