"""sslkern.compat.dinov2 against dinov2's loss math.

dinov2 is not installed, so the oracle is the test-only eager transcription in
``tests/_dinov2_ref.py`` of facebookresearch/dinov2 ``dinov2/loss/dino_clstoken_loss.py``,
``ibot_patch_loss.py`` and ``koleo_loss.py`` (single process), and the call sequence of
``dinov2/train/ssl_meta_arch.py: forward_backward`` (teacher softmax + staged center update,
local- and global-crop DINO terms, masked iBOT term with ``n_masked_patches`` and
``masks_weight``, KoLeo per global crop). Tolerances (fp32): losses / centers rtol 1e-5,
gradients atol 1e-6.
"""
import pytest
import torch
import torch.nn.functional as F

from _dinov2_ref import DINOLoss as RefDINOLoss
from _dinov2_ref import iBOTPatchLoss as RefIBOT
from _dinov2_ref import ref_koleo
from sslkern.compat import dinov2 as sk
from sslkern.reference.dino_loss import sinkhorn_knopp_teacher as ref_sinkhorn  # dinov2's math, verbatim

TOL = dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ tests
def _leaf(x):
    return x.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("fused", [False, True])
def test_dino_loss_meta_arch_sequence(fused):
    """Three steps of ssl_meta_arch's DINO part: local- and global-crop terms, staged center."""
    gen = torch.Generator().manual_seed(int(fused))
    B, K, n_local = 5, 197, 3
    ref, ours = RefDINOLoss(K, 0.1, 0.8), sk.DINOLoss(K, 0.1, 0.8)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    terms = n_local * 2 + 2
    for step in range(3):
        temp = [0.04, 0.05, 0.07][step]
        t = torch.randn(2 * B, K, generator=gen) * 3
        t = torch.cat((t.chunk(2)[1], t.chunk(2)[0]))  # dinov2 swaps the teacher crops
        sl = torch.randn(n_local * B, K, generator=gen, requires_grad=True)
        sg = torch.randn(2 * B, K, generator=gen, requires_grad=True)
        sl2, sg2 = _leaf(sl), _leaf(sg)

        probs = ref.softmax_center_teacher(t, temp).view(2, -1, K)
        ref.update_center(t)
        want = ref(sl.chunk(n_local), probs) / terms + ref([sg], [probs.flatten(0, 1)]) * 2 / terms
        if fused:
            got = (ours.forward_fused(sl2.chunk(n_local), t, temp) / terms
                   + ours.forward_fused([sg2], t, temp, update_center=False) * 2 / terms)
        else:
            p2 = ours.softmax_center_teacher(t, temp).view(2, -1, K)
            ours.update_center(t)
            got = ours(sl2.chunk(n_local), p2) / terms + ours([sg2], [p2.flatten(0, 1)]) * 2 / terms
        torch.testing.assert_close(got, want, **TOL)
        want.backward()
        got.backward()
        torch.testing.assert_close(sl2.grad, sl.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sg2.grad, sg.grad, rtol=1e-5, atol=1e-6)
    ref.apply_center()
    ours.apply_center_update()
    torch.testing.assert_close(ours.center, ref.center, **TOL)
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_dino_sinkhorn_and_loss_on_its_output():
    gen = torch.Generator().manual_seed(2)
    B, K = 6, 64
    t = torch.randn(2 * B, K, generator=gen) * 0.5  # dinov2's exp(t/τ) stays finite below t/τ ≈ 88
    ours = sk.DINOLoss(K)
    q = ours.sinkhorn_knopp_teacher(t, 0.05)
    torch.testing.assert_close(q, ref_sinkhorn(t, 0.05), **TOL)
    s = torch.randn(4 * B, K, generator=gen, requires_grad=True)
    s2 = _leaf(s)
    want = RefDINOLoss(K)(s.chunk(4), q.view(2, B, K))
    got = ours(s2.chunk(4), q.view(2, B, K))
    torch.testing.assert_close(got, want, **TOL)
    want.backward()
    got.backward()
    torch.testing.assert_close(s2.grad, s.grad, rtol=1e-5, atol=1e-6)


def test_dino_loss_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(3 * 2, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    t = F.softmax(torch.randn(2 * 2, 7, generator=gen, dtype=torch.float64), -1)
    loss = sk.DINOLoss(7)
    assert torch.autograd.gradcheck(lambda x: loss(x.chunk(3), t.view(2, 2, 7)), (s,))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("given", [False, True])
def test_ibot_forward_masked_meta_arch(fused, given):
    """ssl_meta_arch's iBOT term: padded buffers, n_masked_patches, masks_weight from the collate."""
    gen = torch.Generator().manual_seed(10 + 2 * fused + given)
    Bg, N, K = 4, 37, 50
    ref, ours = RefIBOT(K, 0.1, 0.7), sk.iBOTPatchLoss(K, 0.1, 0.7)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for step in range(3):
        masks = torch.rand(Bg, N, generator=gen) < 0.3
        masks[2] = False
        M = int(masks.sum())
        upper = M + 5
        weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks] if given else None
        t = torch.randn(M, K, generator=gen) * 2
        s = torch.randn(upper, K, generator=gen, requires_grad=True)  # zero-padded buffer rows after M
        s2 = _leaf(s)
        temp = 0.04 + 0.01 * step
        pt = ref.softmax_center_teacher(t.unsqueeze(0), temp).squeeze(0)
        ref.update_center(t.unsqueeze(0))
        want = ref.forward_masked(s[:M], pt, masks, n_masked_patches=M, masks_weight=weight)
        if fused:
            got = ours.forward_masked_fused(s2[:M], t, masks, temp, n_masked_patches=M, masks_weight=weight)
        else:
            p2 = ours.softmax_center_teacher(t.unsqueeze(0), temp).squeeze(0)
            ours.update_center(t.unsqueeze(0))
            got = ours.forward_masked(s2[:M], p2, masks, n_masked_patches=M, masks_weight=weight)
        torch.testing.assert_close(got, want, **TOL)
        want.backward()
        got.backward()
        torch.testing.assert_close(s2.grad, s.grad, rtol=1e-5, atol=1e-6)
    ref.apply_center()
    ours.apply_center_update()
    torch.testing.assert_close(ours.center, ref.center, **TOL)


def test_ibot_sinkhorn_unmasked_forward_and_errors():
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(23, 40, generator=gen)
    ours, ref = sk.iBOTPatchLoss(40), RefIBOT(40)
    # dinov2 divides by the (all-reduced) masked count; it cancels in the last normalization
    torch.testing.assert_close(ours.sinkhorn_knopp_teacher(t, 0.05, torch.tensor(23)),
                               ref.sinkhorn_knopp_teacher(t, 0.05, 23), **TOL)
    s3, t3 = torch.randn(3, 9, 40, generator=gen), F.softmax(torch.randn(3, 9, 40, generator=gen), -1)
    m = torch.rand(3, 9, generator=gen) < 0.5
    torch.testing.assert_close(ours(s3, t3, m), ref(s3, t3, m), **TOL)
    with pytest.raises(ValueError, match="masks_weight expected 4 entries"):
        ours.forward_masked(s3[0, :4], t3[0, :4], m, masks_weight=torch.ones(3))
    with pytest.raises(ValueError, match="n_masked_patches expected <= 4"):
        ours.forward_masked(s3[0, :4], t3[0, :4], m, n_masked_patches=9)


def test_koleo_matches_dinov2():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(33, 16, generator=gen, requires_grad=True)
    x2 = _leaf(x)
    want, got = ref_koleo(x), sk.KoLeoLoss()(x2)
    torch.testing.assert_close(got, want, **TOL)
    want.backward()
    got.backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-6)
