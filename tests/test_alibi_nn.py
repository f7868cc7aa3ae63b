"""sslkern.nn.AlibiAttention / use_alibi: a timm drop-in."""
import pytest
import torch
import torch.nn.functional as F

import sslkern
from sslkern.nn import AlibiAttention, use_alibi
from sslkern.reference.alibi_attention import fairseq_get_alibi, fairseq_masked_alibi

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import Attention, VisionTransformer  # noqa: E402


def tiny_vit(**kw):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0, **kw).eval()


def test_state_dict_loads_strict_and_mode_none_equals_timm():
    ref = tiny_vit(qk_norm=True)
    model = tiny_vit(qk_norm=True)
    keys = set(model.state_dict())
    ctx = use_alibi(model, mode="none")
    assert set(model.state_dict()) == keys and all(isinstance(b.attn, AlibiAttention) for b in model.blocks)
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    ctx.enabled = True  # mode "none" stays plain attention
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_module_loads_timm_attention_weights_strict():
    a = Attention(64, num_heads=4, qkv_bias=True)
    b = AlibiAttention(64, num_heads=4, qkv_bias=True)
    b.load_state_dict(a.state_dict(), strict=True)
    assert set(a.state_dict()) == set(b.state_dict())


def _timm_with_bias(attn: Attention, x, bias):
    return attn(x, attn_mask=bias)  # timm adds a float mask to the scores


@pytest.mark.parametrize("distance", ["manhattan", "euclidean"])
def test_full_and_masked_sequences_equal_fairseq_bias_through_timm(distance):
    torch.manual_seed(0)
    H, side = 3, 4
    vit = tiny_vit()
    attn = vit.blocks[0].attn
    model = tiny_vit()
    model.load_state_dict(vit.state_dict())
    mode = "2d" if distance == "manhattan" else "2d_euclidean"
    ctx = use_alibi(model, mode=mode)
    alibi = model.blocks[0].attn
    full = fairseq_get_alibi(side * side, H, dims=2, distance=distance)
    scale = torch.rand(len(model.blocks), H)
    ctx.bias_scale = scale
    # full sequence: raster coordinates from patch_embed.grid_size
    x = torch.randn(2, 1 + side * side, 48)
    want = _timm_with_bias(attn, x, F.pad(full, (1, 0, 1, 0))[None] * scale[0][None, :, None, None])
    torch.testing.assert_close(alibi(x), want, atol=1e-5, rtol=1e-5)
    # masked: 1 CLS + 7 kept tokens, true coordinates via ids_keep
    ids_keep = torch.argsort(torch.rand(2, side * side), 1)[:, :7]
    xk = torch.randn(2, 8, 48)
    bias = F.pad(fairseq_masked_alibi(full[None], ids_keep), (1, 0, 1, 0)) * scale[0][None, :, None, None]
    with ctx.tokens(ids_keep=ids_keep):
        got = alibi(xk)
    torch.testing.assert_close(got, _timm_with_bias(attn, xk, bias), atol=1e-5, rtol=1e-5)
    assert ctx.coords is None  # reset on exit
    # the fallback path (an extra attn_mask) gives the same result with a zero mask
    with ctx.tokens(ids_keep=ids_keep):
        got_fb = alibi(xk, attn_mask=torch.zeros(8, 8))
    torch.testing.assert_close(got_fb, got, atol=1e-5, rtol=1e-5)


def test_bias_scale_learns_through_blocks_and_ids_checked():
    model = tiny_vit()
    ctx = use_alibi(model, mode="2d")
    alibi_scale = torch.nn.Parameter(torch.ones(len(model.blocks), 3))
    ctx.bias_scale = alibi_scale.clamp(min=0)
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert alibi_scale.grad is not None and alibi_scale.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"ids_keep expected indices in \[0, 16\)"):
        with ctx.tokens(ids_keep=torch.tensor([[0, 16]])):
            pass


def test_compiled_model_fullgraph_equals_eager():
    model = tiny_vit()
    ctx = use_alibi(model, mode="2d")
    ctx.bias_scale = torch.rand(3)
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    got = torch.compile(model, fullgraph=True, backend="inductor")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
