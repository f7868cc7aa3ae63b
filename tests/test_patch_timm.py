"""sslkern.patch_timm_vit on timm VisionTransformers (no downloads: pretrained=False).

Outputs vs the unpatched model: fp32 atol/rtol 1e-4 on features of magnitude O(1) after
12 blocks (the attention kernel sums in another order); gradients rtol 1e-3 / atol 1e-5.
"""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import sslkern  # noqa: E402
from sslkern.nn import AlibiAttention, use_alibi  # noqa: E402
from sslkern.patch import patch_timm_vit  # noqa: E402


def tiny_vit(**kw):
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, **kw)
    return timm.models.VisionTransformer(**kw)


def test_vit_small_outputs_grads_state_dict():
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False)
    model = copy.deepcopy(ref)
    before = {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()}
    report = patch_timm_vit(model)
    assert report.attention == [f"blocks.{i}.attn" for i in range(12)] and report.methods == ["forward_masked"]
    assert all(isinstance(b.attn, AlibiAttention) for b in model.blocks) and report.alibi is None
    # the same keys, holding the very same tensors (nothing copied, nothing added)
    assert {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()} == before
    # outputs and gradients of one training step (train mode; the model has no dropout)
    x = torch.randn(1, 3, 224, 224)
    y, y_ref = model(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5)
    # strict loads both ways
    ref.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(ref.state_dict(), strict=True)


def test_forward_masked_matches_eager_gather():
    torch.manual_seed(1)
    model = tiny_vit(reg_tokens=2).eval()
    patch_timm_vit(model)
    x = torch.randn(3, 3, 32, 32)
    m = sslkern.masks.random_mask(3, 16, 0.5, num_masks=2)
    full = model.patch_embed(x)
    tok = model._pos_embed(full)                                # (B, 3 + 16, D), the eager way
    P = model.num_prefix_tokens

    def eager(ids):                                              # (R, Nk) ids with their image per row
        img = torch.arange(ids.shape[0]) // (ids.shape[0] // 3)
        rows = tok[img]
        kept = torch.gather(rows[:, P:], 1, ids[..., None].expand(-1, -1, rows.shape[-1]))
        return model.norm(model.blocks(torch.cat([rows[:, :P], kept], 1)))

    ids1 = m.ids_keep[:, 0]
    torch.testing.assert_close(model.forward_masked(x, ids1), eager(ids1), atol=1e-5, rtol=1e-5)
    clone = m.ids_keep.reshape(6, -1)                            # image-major clone batch
    torch.testing.assert_close(model.forward_masked(x, m.ids_keep), eager(clone), atol=1e-5, rtol=1e-5)
    # mask-major rows m·B + b
    got = model.forward_masked(x, m.ids_keep, mask_major=True)
    want = model.forward_masked(x, m.ids_keep).view(3, 2, *got.shape[1:]).transpose(0, 1).reshape(got.shape)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_alibi_forward_masked_uses_kept_coordinates():
    torch.manual_seed(2)
    a = tiny_vit().eval()
    b = copy.deepcopy(a)
    report = patch_timm_vit(a, alibi="2d")
    ctx = use_alibi(b, mode="2d")                                # the manual way
    assert report.alibi is not None and len(report.alibi.modules) == 2
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=1e-6)
    ids = sslkern.masks.random_mask(2, 16, 0.5).ids_keep
    with ctx.tokens(ids_keep=ids):
        want = sslkern.patch.forward_masked(b, x, ids)  # the function on the unpatched model
    torch.testing.assert_close(a.forward_masked(x, ids), want, atol=1e-6, rtol=1e-6)


def test_alibi_changes_outputs_and_state_dict_stays():
    torch.manual_seed(3)
    ref = tiny_vit().eval()
    model = copy.deepcopy(ref)
    patch_timm_vit(model, alibi="2d_euclidean")
    x = torch.randn(2, 3, 32, 32)
    tokens = ref._pos_embed(ref.patch_embed(x))
    a, b = model.blocks[0].attn(tokens), ref.blocks[0].attn(tokens)
    assert not torch.allclose(a, b, atol=1e-4, rtol=1e-3)  # ALiBi is a real change
    model._sslkern_alibi.enabled = False
    torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
    assert model.state_dict().keys() == ref.state_dict().keys()


def test_class_patch_and_undo():
    report = patch_timm_vit(masked_tokens=True)
    try:
        model = tiny_vit()
        assert all(isinstance(b.attn, AlibiAttention) for b in model.blocks)
        assert hasattr(model, "forward_masked")
        m2 = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        assert isinstance(m2.blocks[0].attn, AlibiAttention)
    finally:
        report.undo()
    model = tiny_vit()
    assert type(model.blocks[0].attn).__name__ == "Attention"


def test_instance_undo_options_and_errors():
    model = tiny_vit()
    attn0 = model.blocks[0].attn
    report = patch_timm_vit(model, masked_tokens=False)
    assert report.methods == [] and not hasattr(model, "forward_masked")
    with pytest.raises(ValueError, match="already patched"):
        patch_timm_vit(model)
    report.undo()
    assert model.blocks[0].attn is attn0 and not hasattr(model, "_sslkern_patched")
    r2 = patch_timm_vit(model, fused_attention=False)
    assert r2.attention == [] and r2.methods == ["forward_masked"]
    r2.undo()
    with pytest.raises(ValueError, match="alibi expected None or one of"):
        patch_timm_vit(model, alibi="3d")
    with pytest.raises(ValueError, match="needs fused_attention=True"):
        patch_timm_vit(model, alibi="2d", fused_attention=False)
    with pytest.raises(ValueError, match="patch dropout"):
        patch_timm_vit(tiny_vit(patch_drop_rate=0.5), alibi="2d")
    with pytest.raises(TypeError, match="model expected a timm VisionTransformer"):
        patch_timm_vit(torch.nn.Linear(2, 2))


def test_dropout_and_mask_fall_back_to_sdpa():
    torch.manual_seed(4)
    ref = tiny_vit(attn_drop_rate=0.1)
    model = copy.deepcopy(ref)
    patch_timm_vit(model)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    a = model(x)
    torch.manual_seed(5)
    b = ref(x)  # same dropout draws: SDPA with the same arguments
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    mask = torch.rand(17, 17) > 0.3
    mask.fill_diagonal_(True)
    model.eval(), ref.eval()
    torch.testing.assert_close(model.forward_features(x, attn_mask=mask), ref.forward_features(x, attn_mask=mask),
                               atol=1e-5, rtol=1e-5)


def test_ema_deepcopy_of_patched_model():
    from sslkern.compat.timm import ModelEmaV3

    model = tiny_vit()
    patch_timm_vit(model, alibi="2d")
    ema = ModelEmaV3(model, decay=0.5)
    assert ema.module.forward_masked.__self__ is ema.module
    assert ema.module._sslkern_alibi is not model._sslkern_alibi
    assert ema.module.blocks[0].attn.context is ema.module._sslkern_alibi
    ids = sslkern.masks.random_mask(2, 16, 0.25).ids_keep
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ema.module.forward_masked(x, ids), model.forward_masked(x, ids))


def test_kernel_choice_without_alibi(monkeypatch):
    """ALiBi off: sslkern's kernel for calls that need gradients, SDPA for no-grad calls;
    ALiBi on: always the kernel."""
    import sslkern.nn.attention as attn_mod

    calls = []
    real = attn_mod.alibi_attention
    monkeypatch.setattr(attn_mod, "alibi_attention", lambda *a, **k: calls.append(k["mode"]) or real(*a, **k))
    model = tiny_vit()
    patch_timm_vit(model)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert calls == ["none", "none"]
    with torch.no_grad():
        model(x)
    assert calls == ["none", "none"]
    m2 = tiny_vit()
    patch_timm_vit(m2, alibi="2d")
    with torch.no_grad():
        m2(x)
    assert calls[2:] == ["2d", "2d"]
