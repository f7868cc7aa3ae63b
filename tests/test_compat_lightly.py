"""sslkern.compat.lightly against lightly 1.6 itself, on the same inputs.

Tolerances (fp32): losses and centers rtol 1e-5 / atol 1e-6 (the fused kernels sum in a
different order); gradients atol 1e-6 (entries are O(1/(B·K))); EMA states 1e-6; index
ops exact.
"""
import copy

import pytest
import torch

lightly_loss = pytest.importorskip("lightly.loss")
lightly_utils = pytest.importorskip("lightly.models.utils")

from sslkern.compat import lightly as sk  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)


def _views(n, B, K, gen, scale=3.0, grad=False):
    out = [torch.randn(B, K, generator=gen) * scale for _ in range(n)]
    return [v.requires_grad_(grad) for v in out]


@pytest.mark.parametrize("T,V,B,K", [(2, 2, 4, 37), (2, 8, 5, 197), (1, 3, 3, 50), (3, 2, 2, 64)])
def test_dino_loss_matches_lightly(T, V, B, K):
    gen = torch.Generator().manual_seed(T * 100 + V)
    kw = dict(output_dim=K, warmup_teacher_temp=0.02, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
              student_temp=0.1, center_momentum=0.8)
    ref, ours = lightly_loss.DINOLoss(**kw), sk.DINOLoss(**kw)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for step, call in enumerate([dict(epoch=0), dict(epoch=1), dict(epoch=5), dict(teacher_temp=0.05), {}]):
        teacher = _views(T, B, K, gen)
        student = _views(V, B, K, gen, grad=True)
        student2 = [s.detach().clone().requires_grad_(True) for s in student]
        want = ref(teacher, student, **call)
        got = ours(teacher, student2, **call)
        torch.testing.assert_close(got, want, **TOL)
        want.backward()
        got.backward()
        for a, b in zip(student2, student):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.center, ref.center, **TOL)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)


def test_dino_loss_positional_teacher_temp_and_errors():
    gen = torch.Generator().manual_seed(0)
    ref, ours = lightly_loss.DINOLoss(16), sk.DINOLoss(16)
    t, s = _views(2, 3, 16, gen), _views(2, 3, 16, gen)
    torch.testing.assert_close(ours(t, s, 0.06), ref(t, s, 0.06), **TOL)  # lightly's 3rd positional: teacher_temp
    with pytest.raises(ValueError, match="at least two views"):
        ours(t[:1], s[:1])
    with pytest.raises(ValueError, match=r"student_out\[1\] expected shape \(3, 16\)"):
        ours(t, [s[0], s[1][:2]])
    with pytest.raises(ValueError, match="Unknown mode"):
        sk.DINOLoss(16, center_mode="median")


def test_ibot_patch_loss_matches_lightly():
    gen = torch.Generator().manual_seed(1)
    B, H, W, K = 4, 5, 6, 67
    kw = dict(output_dim=K, teacher_temp=0.06, student_temp=0.12, center_momentum=0.7)
    ref, ours = lightly_loss.IBOTPatchLoss(**kw), sk.IBOTPatchLoss(**kw)
    assert ours.state_dict().keys() == ref.state_dict().keys()  # center.center
    for step in range(3):
        mask = torch.rand(B, H, W, generator=gen) < 0.4
        mask[1] = False  # an image without masked tokens: weight 1/clamp(0, 1)
        M = int(mask.sum())
        t = torch.randn(M, K, generator=gen) * 2
        s = (torch.randn(M, K, generator=gen) * 2).requires_grad_(True)
        s2 = s.detach().clone().requires_grad_(True)
        temp = None if step < 2 else 0.03
        want, got = ref(t, s, mask, teacher_temp=temp), ours(t, s2, mask, teacher_temp=temp)
        torch.testing.assert_close(got, want, **TOL)
        want.backward()
        got.backward()
        torch.testing.assert_close(s2.grad, s.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.center.value, ref.center.value, **TOL)
    ref.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("p", [2, 1])
def test_koleo_matches_lightly(p):
    gen = torch.Generator().manual_seed(p)
    x = torch.randn(37, 24, generator=gen, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    want, got = lightly_loss.KoLeoLoss(p=p)(x), sk.KoLeoLoss(p=p)(x2)
    torch.testing.assert_close(got, want, **TOL)
    want.backward()
    got.backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-6)


def test_update_momentum_matches_lightly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.BatchNorm1d(13), torch.nn.Linear(13, 5))
    ema_ref, ema_ours = copy.deepcopy(net), copy.deepcopy(net)
    lightly_utils.deactivate_requires_grad(ema_ref)
    lightly_utils.deactivate_requires_grad(ema_ours)
    for m in (0.9, 0.5, 0.996):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
        lightly_utils.update_momentum(net, ema_ref, m)
        sk.update_momentum(net, ema_ours, m)
        for (n, a), b in zip(ema_ours.state_dict().items(), ema_ref.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=n)
    assert float(ema_ours[1].running_mean.abs().sum()) == 0  # buffers untouched, as lightly
    with pytest.raises(ValueError, match="update_momentum: model expected 6 parameters"):
        sk.update_momentum(torch.nn.Linear(7, 13), ema_ours, 0.9)


def test_get_set_at_index_match_lightly():
    gen = torch.Generator().manual_seed(3)
    B, N, D = 3, 50, 12
    tokens = torch.randn(B, N, D, generator=gen, requires_grad=True)
    idx_keep, idx_mask = sk.random_token_mask((B, N), mask_ratio=0.75)
    got = sk.get_at_index(tokens, idx_keep)
    want = lightly_utils.get_at_index(tokens, idx_keep)
    assert torch.equal(got, want)
    (g1,) = torch.autograd.grad((got * got).sum(), tokens)
    (g2,) = torch.autograd.grad((want * want).sum(), tokens)
    assert torch.equal(g1, g2)

    value = torch.randn(B, idx_keep.shape[1], D, generator=gen, requires_grad=True)
    got = sk.set_at_index(tokens, idx_keep, value)
    want = lightly_utils.set_at_index(tokens, idx_keep, value)
    assert torch.equal(got, want)
    w = torch.randn(B, N, D, generator=gen)
    ga = torch.autograd.grad((got * w).sum(), (tokens, value))
    gb = torch.autograd.grad((want * w).sum(), (tokens, value))
    for a, b in zip(ga, gb):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="set_at_index: index expected distinct indices"):
        sk.set_at_index(tokens, torch.zeros(B, 2, dtype=torch.long), value[:, :2])
    with pytest.raises(ValueError, match=r"set_at_index: index expected values in \[0, 50\)"):
        sk.set_at_index(tokens, torch.full((B, 2), 50), value[:, :2])


@pytest.mark.parametrize("mask_class_token", [False, True])
def test_random_token_mask_same_stream_as_lightly(mask_class_token):
    torch.manual_seed(7)
    a = lightly_utils.random_token_mask((4, 197), mask_ratio=0.6, mask_class_token=mask_class_token)
    torch.manual_seed(7)
    b = sk.random_token_mask((4, 197), mask_ratio=0.6, mask_class_token=mask_class_token)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    if not mask_class_token:
        assert bool((b[0][:, 0] == 0).all())
