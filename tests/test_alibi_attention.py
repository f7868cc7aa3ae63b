"""alibi_attention: every backend against the materialized-bias reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import sslkern
from sslkern.ops.alibi_attention import dispatch
from sslkern.reference import alibi_attention as ref_alibi_attention
from sslkern.reference.alibi_attention import alibi_bias, fairseq_get_alibi, fairseq_masked_alibi, grid_coords

from conftest import backend_params

BACKENDS = backend_params(dispatch)
ON_GPU = torch.cuda.is_available()

# Tolerances vs the reference (which computes in fp32, or fp64, and rounds the output once):
# fp32 differs by summation order only; fp16 / bf16 round P (and dS) to the input dtype
# before the second product, as every flash attention does.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
# The bias_scale / slope gradients sum dS·dist over all L² pairs: looser, relative to their size.
TOL_SCALE = {torch.float32: dict(atol=1e-3, rtol=1e-3), torch.float64: dict(atol=1e-9, rtol=1e-9),
             torch.float16: dict(atol=5e-2, rtol=5e-2), torch.bfloat16: dict(atol=2e-1, rtol=1e-1)}


def _skip_unsupported(name, dtype):
    if name == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes fp32/fp16/bf16 (fp64 runs on cpu/reference)")
    if name == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; bf16 Triton runs only on a GPU")


def random_mask_coords(B, side, n_keep, device="cpu"):
    """MAE-style random masks on a side×side grid: ids_keep (B, n_keep), sorted, and their
    true (row, col) coordinates (B, n_keep, 2)."""
    noise = torch.rand(B, side * side, device=device)
    ids_keep = torch.argsort(noise, dim=1)[:, :n_keep].sort(dim=1).values
    return ids_keep, torch.stack([ids_keep // side, ids_keep % side], dim=-1)


def run_both(name, device, dtype, B, H, L, Dh, *, mode, P, coords=None, slopes_shape="h", scale=None):
    """Forward + backward of the backend and of the reference on the same fresh inputs."""
    q, k, v = (torch.randn(B, H, L, Dh, device=device, dtype=dtype) for _ in range(3))
    slopes = sslkern.alibi_slopes(H).to(device)
    if slopes_shape == "bh":
        slopes = slopes[None] * (0.5 + torch.rand(B, H, device=device))
    bias_scale = 0.5 + torch.rand(H, device=device)
    dout = torch.randn(B, H, L, Dh, device=device, dtype=dtype)
    results = []
    for impl in ("backend", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, slopes, bias_scale)]
        kw = dict(slopes=leaves[3], mode=mode, coords=coords, num_prefix_tokens=P, bias_scale=leaves[4], scale=scale)
        out = (sslkern.alibi_attention(*leaves[:3], backend=name, **kw) if impl == "backend"
               else ref_alibi_attention(*leaves[:3], **kw))
        out.backward(dout)
        results.append((out.detach(), [t.grad for t in leaves]))
    return results


def assert_results_close(results, dtype):
    (out, grads), (out_ref, grads_ref) = results
    assert out.dtype == dtype and out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    for name, g, gr in zip(("dq", "dk", "dv"), grads[:3], grads_ref[:3]):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g, gr, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    for name, g, gr in zip(("dslopes", "dbias_scale"), grads[3:], grads_ref[3:]):
        torch.testing.assert_close(g, gr, **TOL_SCALE[dtype], msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------
# Slopes
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("H", [3, 6, 8, 12, 16])
def test_slopes_match_alibi_paper(H):
    s = sslkern.alibi_slopes(H)
    assert s.dtype == torch.float32 and s.shape == (H,)
    def power2(n):
        return [(2.0 ** (-8.0 / n)) ** (i + 1) for i in range(n)]
    p = 2 ** int(math.floor(math.log2(H)))
    want = power2(H) if p == H else power2(p) + power2(2 * p)[0::2][: H - p]
    torch.testing.assert_close(s, torch.tensor(want), atol=0, rtol=1e-7)
    # the values of the published slope rule (Press et al. 2022, fairseq get_alibi)
    if H == 3:
        torch.testing.assert_close(s, torch.tensor([1 / 16, 1 / 256, 1 / 4]), atol=0, rtol=0)
    if H == 6:
        torch.testing.assert_close(s, torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------
# Backends against the reference
# ---------------------------------------------------------------------------------------
CPU_CASES = [(L, Dh, H) for L in (1, 37, 50, 197, 257) for Dh, H in ((32, 3), (64, 6))] + [(50, 64, 3), (197, 32, 6)]
TRITON_CASES = [(1, 32, 3), (37, 32, 3), (50, 64, 2), (26, 16, 1)]  # interpreter: small L, B·H


def _case_params():
    """(backend, (L, Dh, H)) pairs: the benchmark sizes on cpu (and on a GPU); small ones for
    the Triton interpreter."""
    out = []
    for p in BACKENDS:
        name = p.values[0][0]
        cases = CPU_CASES if name == "cpu" or ON_GPU else TRITON_CASES
        out += [pytest.param(p.values[0], c, id=f"{p.id}-L{c[0]}-Dh{c[1]}-H{c[2]}", marks=p.marks) for c in cases]
    return out


@pytest.mark.parametrize("backend,case", _case_params())
@pytest.mark.parametrize("mode", ["2d", "1d", "2d_euclidean", "none"])
def test_full_sequence_matches_reference(backend, case, mode):
    name, device = backend
    L, Dh, H = case
    P = 1 if L > 1 and mode != "1d" else 0
    lp = L - P
    coords = None
    if mode in ("2d", "2d_euclidean") and math.isqrt(lp) ** 2 != lp:
        side = math.isqrt(lp) + 1  # not a square: tokens are the first lp cells of a grid
        coords = grid_coords(side * side)[:lp]
    B = 2
    results = run_both(name, device, torch.float32, B, H, L, Dh, mode=mode, P=P, coords=coords,
                       slopes_shape="bh" if (L + Dh) % 2 else "h")
    assert_results_close(results, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,Dh", [(torch.float32, 96), (torch.float32, 128), (torch.float16, 128),
                                      (torch.bfloat16, 128)])
def test_large_head_dim(backend, dtype, Dh):
    """BLOCK_D=128: the Triton launchers use smaller tiles / other warps there (CONFIGS), so
    the query and key loops run over more, partly masked blocks."""
    name, device = backend
    _skip_unsupported(name, dtype)
    L = 197 if name == "cpu" or ON_GPU else 37
    coords = None if L == 197 else grid_coords(36).flip(0)
    results = run_both(name, device, dtype, 1, 2, L, Dh, mode="2d", P=1, coords=coords, slopes_shape="bh")
    assert_results_close(results, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype):
    name, device = backend
    _skip_unsupported(name, dtype)
    L, Dh, H = (197, 64, 6) if name == "cpu" or ON_GPU else (37, 32, 2)
    results = run_both(name, device, dtype, 2, H, L, Dh, mode="2d", P=1,
                       coords=None if L == 197 else grid_coords(36).flip(0))
    assert_results_close(results, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gathered_tokens_use_true_coordinates(backend, dtype):
    """data2vec 2.0: 1 CLS + kept tokens of a 14×14 grid, coordinates from random masks."""
    name, device = backend
    _skip_unsupported(name, dtype)
    B, H, n_keep = (4, 6, 39) if name == "cpu" or ON_GPU else (2, 2, 20)
    _, coords = random_mask_coords(B, 14, n_keep, device)
    for mode in ("2d", "2d_euclidean"):
        results = run_both(name, device, dtype, B, H, 1 + n_keep, 64, mode=mode, P=1, coords=coords)
        assert_results_close(results, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_qkv_from_timm_layout(backend):
    """q, k, v as the permuted views timm's qkv produces (non-contiguous; no copy needed)."""
    name, device = backend
    B, L, H, Dh = 2, 37, 3, 32
    qkv = torch.randn(B, L, 3, H, Dh, device=device).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    out = sslkern.alibi_attention(q, k, v, mode="2d", num_prefix_tokens=1, backend=name)
    want = ref_alibi_attention(q, k, v, mode="2d", num_prefix_tokens=1)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------
# The fairseq construction (data2vec 2.0) and other oracles
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance", ["manhattan", "euclidean"])
def test_bias_equals_fairseq_get_alibi_masked_alibi(distance):
    """Our per-token-coordinate bias == fairseq get_alibi(dims=2) + masked_alibi + CLS pad,
    and attention with it == SDPA fed fairseq's materialized bias (× clamped alibi_scale)."""
    B, H, side, n_keep, Dh = 3, 6, 14, 39, 64
    full = fairseq_get_alibi(side * side, H, dims=2, distance=distance)  # (H, 196, 196)
    ids_keep, coords = random_mask_coords(B, side, n_keep)
    fair = F.pad(fairseq_masked_alibi(full[None], ids_keep), (1, 0, 1, 0))  # CLS: zero bias
    mode = "2d" if distance == "manhattan" else "2d_euclidean"
    ours = alibi_bias(sslkern.alibi_slopes(H).expand(B, H), coords.float(), mode, num_prefix_tokens=1)
    torch.testing.assert_close(ours, fair, atol=1e-6, rtol=1e-6)
    # full (unmasked) grid, default raster coords
    ours_full = alibi_bias(sslkern.alibi_slopes(H)[None], grid_coords(side * side)[None], mode)
    torch.testing.assert_close(ours_full[0], full, atol=1e-6, rtol=1e-6)

    alibi_scale = torch.randn(H).clamp(min=0)  # data2vec 2.0 learns it and clamps it ≥ 0
    q, k, v = (torch.randn(B, H, 1 + n_keep, Dh) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=fair * alibi_scale[None, :, None, None])
    got = sslkern.alibi_attention(q, k, v, mode=mode, coords=coords, num_prefix_tokens=1, bias_scale=alibi_scale)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_1d_equals_fairseq_and_flash_attention_contract():
    H, L, Dh = 8, 50, 32
    full = fairseq_get_alibi(L, H, dims=1)
    ours = alibi_bias(sslkern.alibi_slopes(H)[None], torch.stack([torch.arange(L.__int__()).float(),
                                                                  torch.zeros(L)], -1)[None], "1d")
    torch.testing.assert_close(ours[0], full, atol=0, rtol=0)
    q, k, v = (torch.randn(2, H, L, Dh) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=full[None])
    torch.testing.assert_close(sslkern.alibi_attention(q, k, v, mode="1d"), want, atol=2e-5, rtol=1e-4)
    # explicit positions (e.g. gathered tokens of a sequence) shift-invariant
    pos = torch.arange(L) + 7
    torch.testing.assert_close(sslkern.alibi_attention(q, k, v, mode="1d", coords=pos), want, atol=2e-5, rtol=1e-4)


def test_mode_none_is_plain_attention_and_flex_attention_oracle():
    q, k, v = (torch.randn(2, 3, 50, 32) for _ in range(3))
    torch.testing.assert_close(sslkern.alibi_attention(q, k, v, mode="none"),
                               F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    slopes = sslkern.alibi_slopes(3)
    coords = grid_coords(49)

    def score_mod(score, b, h, qi, kv):
        both = (qi > 0) & (kv > 0)
        ri, ci = coords[(qi - 1).clamp(min=0)].unbind(-1)
        rj, cj = coords[(kv - 1).clamp(min=0)].unbind(-1)
        return score - torch.where(both, slopes[h] * ((ri - rj).abs() + (ci - cj).abs()), 0.0)

    try:
        want = flex.flex_attention(q, k, v, score_mod=score_mod)
    except Exception as e:  # FlexAttention eager on CPU is version dependent
        pytest.skip(f"flex_attention unavailable here: {e}")
    torch.testing.assert_close(sslkern.alibi_attention(q, k, v, mode="2d", num_prefix_tokens=1), want,
                               atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# gradcheck, opcheck, compile
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mode", ["2d", "2d_euclidean", "1d"])
def test_gradcheck_float64(backend, mode):
    B, H, L, Dh = 2, 2, 10, 4
    q, k, v = (torch.randn(B, H, L, Dh, dtype=torch.float64, requires_grad=True) for _ in range(3))
    slopes = torch.rand(B, H, dtype=torch.float64, requires_grad=True)
    bias_scale = (0.5 + torch.rand(H, dtype=torch.float64)).requires_grad_(True)
    coords = torch.randint(0, 4, (B, L - 1, 2)).double() + 0.25 if mode != "1d" else None
    P = 1 if mode != "1d" else 0

    def f(q, k, v, slopes, bias_scale):
        return sslkern.alibi_attention(q, k, v, slopes=slopes, mode=mode, coords=coords, num_prefix_tokens=P,
                                       bias_scale=bias_scale, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, slopes, bias_scale), eps=1e-6, atol=1e-7)


def _op_args(dtype=torch.float32, B=2, H=3, L=17, Dh=8, P=1):
    q, k, v = (torch.randn(B, H, L, Dh, dtype=dtype, requires_grad=True) for _ in range(3))
    slopes = torch.rand(B, H, dtype=torch.float32, requires_grad=True)
    coords = torch.randint(0, 5, (B, L - P, 2)).float()
    return q, k, v, slopes, coords, P


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck(mode):
    q, k, v, slopes, coords, P = _op_args()
    torch.library.opcheck(torch.ops.sslkern.alibi_attention.default, (q, k, v, slopes, coords, P, mode, 0.3, ""))
    out, lse = torch.ops.sslkern.alibi_attention(q, k, v, slopes, coords, P, mode, 0.3, "")
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.sslkern.alibi_attention_backward.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), slopes.detach(),
                           coords, P, mode, 0.3, ""))


def test_compile_fullgraph_equals_eager():
    B, H, L, Dh = 2, 3, 37, 16
    _, coords = random_mask_coords(B, 7, L - 1)
    q, k, v = (torch.randn(B, H, L, Dh, requires_grad=True) for _ in range(3))
    bias_scale = torch.rand(H, requires_grad=True)

    def f(q, k, v, bias_scale):
        out = sslkern.alibi_attention(q, k, v, coords=coords, num_prefix_tokens=1, bias_scale=bias_scale.clamp(min=0))
        return (out * out).sum()

    eager = torch.autograd.grad(f(q, k, v, bias_scale), (q, k, v, bias_scale))
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    loss = compiled(q, k, v, bias_scale)
    torch.testing.assert_close(loss, f(q, k, v, bias_scale), atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(loss, (q, k, v, bias_scale))
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def _qkv(B=2, H=3, L=10, Dh=8, dtype=torch.float32):
    return tuple(torch.randn(B, H, L, Dh, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, k, v: sslkern.alibi_attention(q, k, v, slopes=torch.rand(4)), ValueError,
     r"slopes expected shape \(3,\) or \(2, 3\)"),
    (lambda q, k, v: sslkern.alibi_attention(q, k, v, slopes=torch.rand(3, 3)), ValueError, "slopes expected shape"),
    (lambda q, k, v: sslkern.alibi_attention(q, k, v, bias_scale=torch.rand(4), num_prefix_tokens=1), ValueError,
     r"bias_scale expected shape \(3,\)"),
    (lambda q, k, v: sslkern.alibi_attention(q, k, v, coords=torch.rand(2, 11, 2)), ValueError,
     r"coords expected shape \(10, 2\) or \(2, 10, 2\)"),
    (lambda q, k, v: sslkern.alibi_attention(q, k, v, coords=torch.rand(2, 9, 3), num_prefix_tokens=1), ValueError,
     "coords expected shape"),
    (lambda q, k, v: sslkern.alibi_attention(q, k, v, mode="1d", coords=torch.rand(3, 10)), ValueError,
     r"coords expected shape \(10,\) or \(2, 10\)"),
    (lambda q, k, v: sslkern.alibi_attention(q, k, v), ValueError, "must form a square grid"),
    (lambda q, k, v: sslkern.alibi_attention(q, k, v, mode="3d"), ValueError, "mode must be one of"),
    (lambda q, k, v: sslkern.alibi_attention(q, k, v, num_prefix_tokens=11), ValueError, "num_prefix_tokens"),
    (lambda q, k, v: sslkern.alibi_attention(q, k[:, :2], v, num_prefix_tokens=1), ValueError,
     r"k expected shape \(2, 3, 10, 8\)"),
    (lambda q, k, v: sslkern.alibi_attention(q, k.half(), v, num_prefix_tokens=1), TypeError, "k expected dtype"),
    (lambda q, k, v: sslkern.alibi_attention(q[0], k[0], v[0]), ValueError, "q expected 4 dims"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_qkv())


@pytest.mark.skipif(not ON_GPU and "triton" not in [p.id for p in BACKENDS if not p.marks], reason="no triton")
def test_triton_rejects_unsupported_head_dim_and_fp64():
    if not dispatch.usable("triton", torch.device("cuda" if ON_GPU else "cpu"))[0]:
        pytest.skip("triton backend not usable here")
    dev = "cuda" if ON_GPU else "cpu"
    q, k, v = (t.to(dev) for t in _qkv(L=5, Dh=256))
    with pytest.raises(ValueError, match=r"q expected head dim Dh <= 128 for the triton backend, got 256"):
        sslkern.alibi_attention(q, k, v, num_prefix_tokens=1, backend="triton")
    q, k, v = (t.to(dev) for t in _qkv(L=5, dtype=torch.float64))
    with pytest.raises(TypeError, match="fp64 runs on backend='cpu'"):
        sslkern.alibi_attention(q, k, v, num_prefix_tokens=1, backend="triton")


def test_cpu_kernel_checks_direct_calls():
    q, k, v = _qkv()
    slopes, coords = torch.rand(2, 3), torch.zeros(2, 9, 2)
    with pytest.raises(RuntimeError, match="coords must be a"):
        torch.ops.sslkern_C.alibi_attention_cpu(q, k, v, slopes, coords[:, :5], 1, 1, 0.3)
    with pytest.raises(RuntimeError, match="slopes must be a"):
        torch.ops.sslkern_C.alibi_attention_cpu(q, k, v, slopes[:1], coords, 1, 1, 0.3)
    with pytest.raises(RuntimeError, match="num_prefix_tokens"):
        torch.ops.sslkern_C.alibi_attention_cpu(q, k, v, slopes, coords, 11, 1, 0.3)


# ---------------------------------------------------------------------------------------
# Triton: every configuration the launchers can pick compiles for sm_80 and sm_90a
# ---------------------------------------------------------------------------------------
class _RecordingKernel:
    """Stands in for a Triton kernel: records what the launcher passes (grid, constexprs, options)."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, {k: v for k, v in kwargs.items()}))
        return launch


@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.float16, False),
                                        (torch.bfloat16, False)])
@pytest.mark.parametrize("head_dim", [8, 33, 64, 100, 128])
def test_triton_launch_configs_are_in_aot_configs(monkeypatch, dtype, tf32, head_dim):
    """The launchers pick their tiles / warps / stages from CONFIGS, and every pick is an AOT_CONFIGS entry
    (so the GPU report and its zero-spill test see exactly what runs). No kernel runs here."""
    pytest.importorskip("triton")
    from sslkern.triton_ops import alibi_attention as ta

    calls = []
    for name in ("alibi_attention_fwd_kernel", "alibi_attention_bwd_preprocess_kernel",
                 "alibi_attention_bwd_dkdv_kernel", "alibi_attention_bwd_dq_kernel"):
        monkeypatch.setattr(ta, name, _RecordingKernel(name, calls))
    q = torch.zeros(1, 2, 5, head_dim, dtype=dtype)
    slopes, coords = torch.ones(1, 2), torch.zeros(1, 5, 2)
    # allow_tf32 is a dynamic attribute of torch's cuBLAS module: monkeypatch cannot always undo
    # it (pytest >= 9.1 deletes it on teardown), so set and restore it here.
    matmul, old_tf32 = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    matmul.allow_tf32 = tf32
    try:
        out, lse = ta.alibi_attention_triton(q, q, q, slopes, coords, 0, 2, 0.5)
        ta.alibi_attention_backward_triton(out, q, q, q, out, lse, slopes, coords, 0, 2, 0.5)
    finally:
        matmul.allow_tf32 = old_tf32
    assert [c[0] for c in calls] == ["alibi_attention_fwd_kernel", "alibi_attention_bwd_preprocess_kernel",
                                     "alibi_attention_bwd_dkdv_kernel", "alibi_attention_bwd_dq_kernel"]
    aot = [(c["kernel"].__name__ if hasattr(c["kernel"], "__name__") else c["kernel"].fn.__name__,
            c["signature"]["out_ptr" if "out_ptr" in c["signature"] else "dk_ptr" if "dk_ptr" in c["signature"]
                           else "dq_ptr"],
            tuple(sorted(c["constexprs"].items())), c["num_warps"], c["num_stages"]) for c in ta.AOT_CONFIGS]
    ptr = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    bd = max(32, 1 << (head_dim - 1).bit_length())
    cls = "half" if dtype != torch.float32 else ("tf32" if tf32 else "ieee")
    for name, kw in calls:
        options = (kw.pop("num_warps"), kw.pop("num_stages"))
        assert kw["BLOCK_D"] == bd
        if name != "alibi_attention_bwd_preprocess_kernel":
            assert kw["DOT_PRECISION"] == ("tf32" if tf32 and dtype == torch.float32 else "ieee")
            kern = {"alibi_attention_fwd_kernel": "fwd", "alibi_attention_bwd_dkdv_kernel": "dkdv",
                    "alibi_attention_bwd_dq_kernel": "dq"}[name]
            assert (kw["BLOCK_M"], kw["BLOCK_N"]) + options == ta.CONFIGS[(cls, bd)][kern]
        assert (name, ptr, tuple(sorted(kw.items())), *options) in aot, (name, kw, options)


def test_triton_grid_puts_batch_heads_on_axis_0(monkeypatch):
    """B·H = 65,544 > 65,535 (CUDA's limit on grid axes 1 and 2): every launch puts B·H on axis 0
    (limit 2^31 - 1) and the query / key blocks on axis 1. No kernel runs here; that the kernels
    read (batch·head, block) from (program_id(0), program_id(1)) is what the interpreter tests
    above check numerically."""
    pytest.importorskip("triton")
    from sslkern.triton_ops import alibi_attention as ta

    grids = []

    class Rec:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: grids.append((self.name, tuple(grid)))

    for name in ("alibi_attention_fwd_kernel", "alibi_attention_bwd_preprocess_kernel",
                 "alibi_attention_bwd_dkdv_kernel", "alibi_attention_bwd_dq_kernel"):
        monkeypatch.setattr(ta, name, Rec(name))
    B, H, L, D = 8193, 8, 70, 8
    q = torch.zeros(B, H, L, D)
    slopes, coords = torch.ones(B, H), torch.zeros(B, L, 2)
    out, lse = ta.alibi_attention_triton(q, q, q, slopes, coords, 0, 2, 0.5)
    ta.alibi_attention_backward_triton(out, q, q, q, out, lse, slopes, coords, 0, 2, 0.5)
    assert len(grids) == 4
    for name, grid in grids:
        assert len(grid) == 2 and grid[0] == B * H, (name, grid)
        assert grid[1] in {-(-L // blk) for blk in (16, 32, 64)}, (name, grid)  # query / key blocks
    with pytest.raises(ValueError, match="launch grid limits"):
        ta._grid(1, 1, 64 * 65536, 64)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id == "cpu"] + ["reference"])
def test_autocast_casts_qk_norm_outputs(backend):
    """qk-norm under autocast: LayerNorm gives fp32 q, k next to a bf16 v. The op casts all three
    to the autocast dtype (as SDPA does) instead of raising; the gradient reaches fp32 q."""
    name = backend if isinstance(backend, str) else backend[0]
    B, H, L, Dh = 2, 3, 1 + 16, 16
    q, k = (torch.randn(B, H, L, Dh, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, L, Dh).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sslkern.alibi_attention(q, k, v, num_prefix_tokens=1, backend=name)
    assert out.dtype == torch.bfloat16
    want = sslkern.alibi_attention(q.bfloat16(), k.bfloat16(), v, num_prefix_tokens=1, backend=name)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    with pytest.raises(TypeError, match="k expected dtype"):  # without autocast, mixed dtypes still raise
        sslkern.alibi_attention(q, k.bfloat16(), v, num_prefix_tokens=1, backend=name)
