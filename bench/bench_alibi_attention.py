"""alibi_attention, forward + backward (issue #5).

Cases
  full:   ViT-S, B=32, H=6, L=197 (CLS + 14×14), Dh=64, 2D ALiBi with a learnable per-head
          scale, fp32. Providers: sslkern, sdpa_bias (SDPA with the bias materialized per
          call), eager (sslkern.reference: matmul-softmax), compiled (torch.compile of eager).
  masked: data2vec 2.0 style, B=256 sequences of 1 CLS + 39 kept tokens of a 14×14 grid,
          H=6, Dh=64, fp32. Peer fairseq_sdpa: fairseq's full (H, 196, 196) get_alibi bias
          (built once, as fairseq caches it), masked_alibi gathers to (B, H, 40, 40), CLS
          padding, × scale, SDPA.
The bias scale is a leaf with requires_grad, so every provider also returns its gradient.
"""
import pytest
import torch
import torch.nn.functional as F

import sslkern
from harness import measure
from sslkern.reference.alibi_attention import alibi_bias, fairseq_get_alibi, fairseq_masked_alibi, grid_coords

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, DH, SIDE = 6, 64, 14


def _inputs(B, L, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, L, DH, generator=g).to(DEV, dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    bias_scale = torch.ones(H, device=DEV, requires_grad=True)
    return q, k, v, dout, bias_scale


def _zero_grads(*ts):
    def setup():
        for t in ts:
            t.grad = None
    return setup


def _reference_fn(provider, q, k, v, dout, **kwargs):
    """fwd+bwd of the materialized-bias reference, eager or under torch.compile."""
    ref = sslkern.reference.alibi_attention
    if provider == "compiled":
        ref = torch.compile(ref)

    def fn():
        out = ref(q, k, v, mode="2d", num_prefix_tokens=1, **kwargs)
        out.backward(dout)

    return fn


def full_fn(provider):
    B, L = 32, 1 + SIDE * SIDE
    q, k, v, dout, bias_scale = _inputs(B, L)
    slopes = sslkern.alibi_slopes(H).to(DEV)
    coords = grid_coords(SIDE * SIDE, DEV)
    if provider == "sslkern":
        def fn():
            out = sslkern.alibi_attention(q, k, v, slopes=slopes, mode="2d", num_prefix_tokens=1, bias_scale=bias_scale)
            out.backward(dout)
    elif provider == "sdpa_bias":
        neg_dist = alibi_bias(torch.ones(1, H, device=DEV), coords[None], "2d", 1)  # (1, H, L, L), cached

        def fn():
            bias = neg_dist * (slopes * bias_scale)[None, :, None, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            out.backward(dout)
    elif provider in ("eager", "compiled"):
        fn = _reference_fn(provider, q, k, v, dout, slopes=slopes, bias_scale=bias_scale)
    else:
        raise ValueError(provider)
    return fn, _zero_grads(q, k, v, bias_scale)


def masked_fn(provider):
    B, n_keep = 256, 39
    q, k, v, dout, bias_scale = _inputs(B, 1 + n_keep)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids_keep = torch.argsort(torch.rand(B, SIDE * SIDE, generator=g), 1)[:, :n_keep].sort(1).values.to(DEV)
    coords = torch.stack([ids_keep // SIDE, ids_keep % SIDE], -1)
    if provider == "sslkern":
        def fn():
            out = sslkern.alibi_attention(q, k, v, mode="2d", coords=coords, num_prefix_tokens=1, bias_scale=bias_scale)
            out.backward(dout)
    elif provider == "fairseq_sdpa":
        full = fairseq_get_alibi(SIDE * SIDE, H, dims=2).to(DEV)[None]  # fairseq caches this per (L, H)

        def fn():
            bias = F.pad(fairseq_masked_alibi(full, ids_keep), (1, 0, 1, 0)) * bias_scale[None, :, None, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            out.backward(dout)
    elif provider in ("eager", "compiled"):
        fn = _reference_fn(provider, q, k, v, dout, coords=coords, bias_scale=bias_scale)
    else:
        raise ValueError(provider)
    return fn, _zero_grads(q, k, v, bias_scale)


FULL_TARGETS = {"sdpa_bias": 1.0, "eager": 2.0}


@pytest.mark.parametrize("provider", ["sslkern", "sslkern_nocache", "sdpa_bias", "eager", "compiled"])
def test_alibi_attention_full_vit_s(benchmark, provider):
    fn, setup = full_fn(provider.removesuffix("_nocache"))
    measure(benchmark, op="alibi_attention", case="ViT-S B=32 H=6 L=197 Dh=64 2D ALiBi fp32 fwd+bwd",
            provider=provider, fn=fn, setup=setup, target=FULL_TARGETS.get(provider), rounds=5, warmup=2)


@pytest.mark.parametrize("provider", ["sslkern", "sslkern_nocache", "fairseq_sdpa", "eager", "compiled"])
def test_alibi_attention_masked_d2v(benchmark, provider):
    fn, setup = masked_fn(provider.removesuffix("_nocache"))
    measure(benchmark, op="alibi_attention",
            case="data2vec2 masked B=256 H=6 L=1+39 of 14x14 Dh=64 2D ALiBi fp32 fwd+bwd",
            provider=provider, fn=fn, setup=setup, target=2.0 if provider == "fairseq_sdpa" else None,
            rounds=5, warmup=2)
