"""alibi_attention, forward + backward.

Inputs: q, k, v as a ViT block makes them, LayerNorm'd random activations
(B, L, 384) through a random qkv linear layer (timm's init: trunc-normal std 0.02, zero
bias), split into H = 6 heads; q then scaled by 1 or by 8 (sharper rows: most keys of a row
far below its max, where exp and the products after it would be subnormal without the
kernel's flush-to-zero); dout randn. Slopes as the data2vec 2.0 recipe uses them:
sslkern.alibi_slopes(6) × a learnable per-head scale (ones). fp32, plus bf16 (q × 1).
bytes_moved: the fewest bytes, q, k, v read and out, lse written (forward); dout, q, k, v,
out, lse read and dq, dk, dv written (backward). Attention is compute-bound: the traffic
bound is far below the time any kernel needs (4·B·H·L²·Dh flops forward, 10· backward).

Cases
  full:   ViT-S, B=32, H=6, L=197 (CLS + 14×14), Dh=64, 2D ALiBi with a learnable per-head
          scale, fp32. Providers: sslkern, sdpa_bias (SDPA with the bias materialized per
          call), eager (sslkern.reference: matmul-softmax), compiled (torch.compile of eager).
  masked: data2vec 2.0 style, B=256 sequences of 1 CLS + 39 kept tokens of a 14×14 grid,
          H=6, Dh=64, fp32. Peer fairseq_sdpa: fairseq's full (H, 196, 196) get_alibi bias
          (built once, as fairseq caches it), masked_alibi gathers to (B, H, 40, 40), CLS
          padding, × scale, SDPA.
The bias scale is a leaf with requires_grad, so every provider also returns its gradient.
Default run: fp32 q x1 of each case (round-robin q x1 vs x8 on the masked one);
SSLKERN_BENCH_FULL=1 adds q x8, bf16, the output cache off, the compiled masked case.
"""
import pytest
import torch
import torch.nn.functional as F

import sslkern
from harness import measure, measure_interleaved, sweep
from sslkern.reference.alibi_attention import alibi_bias, fairseq_get_alibi, fairseq_masked_alibi, grid_coords

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, DH, SIDE = 6, 64, 14


def _inputs(B, L, q_scale=1.0, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    D = H * DH
    x = F.layer_norm(torch.randn(B, L, D, generator=g), (D,))
    w = torch.nn.init.trunc_normal_(torch.empty(3 * D, D), std=0.02, generator=g)
    qkv = F.linear(x, w).reshape(B, L, 3, H, DH).permute(2, 0, 3, 1, 4)
    q, k, v = ((qkv[i] * (q_scale if i == 0 else 1.0)).contiguous().to(DEV, dtype) for i in range(3))
    dout = torch.randn(B, H, L, DH, generator=g).to(DEV, dtype)
    for t in (q, k, v):
        t.requires_grad_(True)
    bias_scale = torch.ones(H, device=DEV, requires_grad=True)
    return q, k, v, dout, bias_scale


def _bytes_moved(B, L, dtype):
    e = torch.finfo(dtype).bits // 8
    n, rows = B * H * L * DH, B * H * L
    return e * n * (3 + 1) + 4 * rows + e * n * (5 + 3) + 4 * rows


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


def full_fn(provider, q_scale=1.0, dtype=torch.float32):
    B, L = 32, 1 + SIDE * SIDE
    q, k, v, dout, bias_scale = _inputs(B, L, q_scale, dtype)
    slopes = sslkern.alibi_slopes(H).to(DEV)
    coords = grid_coords(SIDE * SIDE, DEV)
    if provider == "sslkern":
        def fn():
            out = sslkern.alibi_attention(q, k, v, slopes=slopes, mode="2d", num_prefix_tokens=1, bias_scale=bias_scale)
            out.backward(dout)
    elif provider == "sdpa_bias":
        neg_dist = alibi_bias(torch.ones(1, H, device=DEV), coords[None], "2d", 1).to(dtype)  # (1, H, L, L), cached

        def fn():
            bias = (neg_dist * (slopes * bias_scale)[None, :, None, None]).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            out.backward(dout)
    elif provider in ("eager", "compiled"):
        fn = _reference_fn(provider, q, k, v, dout, slopes=slopes, bias_scale=bias_scale)
    else:
        raise ValueError(provider)
    return fn, _zero_grads(q, k, v, bias_scale)


def masked_fn(provider, q_scale=1.0):
    B, n_keep = 256, 39
    q, k, v, dout, bias_scale = _inputs(B, 1 + n_keep, q_scale)
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
FULL_CASES = [(1.0, torch.float32), (8.0, torch.float32), (1.0, torch.bfloat16)]


def _dt(dtype):
    return "bf16" if dtype == torch.bfloat16 else "fp32"


@pytest.mark.parametrize("provider", sweep(["sslkern", "sslkern_nocache", "sdpa_bias", "eager", "compiled"],
                                           ["sslkern", "sdpa_bias", "eager", "compiled"]))
@pytest.mark.parametrize("q_scale,dtype", sweep(FULL_CASES, FULL_CASES[:1]),
                         ids=[f"q{s:g}-{_dt(d)}" for s, d in FULL_CASES])
def test_alibi_attention_full_vit_s(benchmark, provider, q_scale, dtype):
    if provider == "sslkern_nocache" and (q_scale, dtype) != (1.0, torch.float32):
        pytest.skip("the output cache is timed on the fp32 q x1 case only")
    fn, setup = full_fn(provider.removesuffix("_nocache"), q_scale, dtype)
    measure(benchmark, op="alibi_attention",
            case=f"ViT-S B=32 H=6 L=197 Dh=64 2D ALiBi, LN+linear q,k x q{q_scale:g}, {_dt(dtype)} fwd+bwd",
            provider=provider, fn=fn, setup=setup, bytes_moved=_bytes_moved(32, 197, dtype),
            target=FULL_TARGETS.get(provider) if dtype == torch.float32 else None, rounds=5, warmup=2)


@pytest.mark.parametrize("provider", sweep(["sslkern", "sslkern_nocache", "fairseq_sdpa", "eager", "compiled"],
                                           ["sslkern", "fairseq_sdpa", "eager"]))
@pytest.mark.parametrize("q_scale", sweep([1.0, 8.0], [1.0]), ids=["q1", "q8"])
def test_alibi_attention_masked_d2v(benchmark, provider, q_scale):
    if provider == "sslkern_nocache" and q_scale != 1.0:
        pytest.skip("the output cache is timed on the q x1 case only")
    fn, setup = masked_fn(provider.removesuffix("_nocache"), q_scale)
    measure(benchmark, op="alibi_attention",
            case=f"data2vec2 masked B=256 H=6 L=1+39 of 14x14 Dh=64 2D ALiBi, LN+linear q,k x q{q_scale:g}, fp32 fwd+bwd",
            provider=provider, fn=fn, setup=setup, bytes_moved=_bytes_moved(256, 40, torch.float32),
            target=2.0 if provider == "fairseq_sdpa" else None, rounds=5, warmup=2)


@pytest.mark.parametrize("kind", sweep(["vit_s", "d2v_masked"], ["d2v_masked"]))
def test_alibi_attention_q_scale_interleaved(benchmark, kind):
    """The bar for input independence (time within 1.3x between q x 1 and q x 8), timed round-robin: one call
    of each scale per round, so the VM's drift over minutes does not enter the ratio."""
    make = full_fn if kind == "vit_s" else masked_fn
    (f1, s1), (f8, s8) = make("sslkern", 1.0), make("sslkern", 8.0)
    case = ("ViT-S B=32 H=6 L=197 Dh=64" if kind == "vit_s" else "data2vec2 masked B=256 H=6 L=1+39 of 14x14 Dh=64")
    measure_interleaved(benchmark, op="alibi_attention", case=f"{case} 2D ALiBi fp32 fwd+bwd, q x1 vs x8 interleaved",
                        fns={"sslkern": f1, "sslkern_q8": f8}, setup={"sslkern": s1, "sslkern_q8": s8}, rounds=20)
