"""Fused prototype layer + DINO / iBOT loss, forward + backward + the teacher column sum.

Cases:
  DINO   B = 32 images, 2 global + 6 local crops, Db = 256, K = 65,536: student features
         (256, 256), teacher features (64, 256), weight-normalised last layers (65536, 256)
         with unit gains (dino's norm_last_layer), center (65536,).
  iBOT   64 global-crop images × 196 patches, half the images masked at 10-50 % (seeded, as
         bench_dino_loss.py), K = 65,536, Db = 256: (M, 256) masked token features.
  fp32, and bf16 features + weights (fp32 center).
Inputs: L2-normalised randn features; the student layer ``sslkern.nn.DINOHead``'s
``WeightNormLinear`` at its init, the teacher a perturbed copy (an EMA teacher a few steps on).
Timed work: the loss, the center update and the gradients w.r.t. the features and the
layer's ``weight_v`` (``torch.autograd.grad``, so no gradient accumulates between calls).

Providers:
  sslkern   sslkern.prototype_loss (C++ on CPU, Triton on GPU): no (rows, K) tensor
  unfused   the head's last layer with autograd (logits materialised) → the fused
            sslkern.dino_loss / ibot_patch_loss: what the fused op replaces (the baseline)
Default run: the DINO case in fp32; SSLKERN_BENCH_FULL=1 adds the iBOT case and bf16. The
bf16 ``unfused`` cases on CPU also need SSLKERN_BENCH_SLOW=1: on CPUs without native bf16
GEMMs PyTorch emulates them (docs/ops/prototype_loss.md has the figure).
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import sslkern
from harness import full_sweep_only, measure, sweep

B, K, V, T, DB = 32, 65536, 8, 2, 256
IB, IL = 64, 196
SLOW = os.environ.get("SSLKERN_BENCH_SLOW", "0") not in ("", "0")
_data: dict = {}


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _layers(dtype, g):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
    layer = sslkern.nn.heads.WeightNormLinear(DB, K, fix_gain=True)
    teacher = copy.deepcopy(layer).requires_grad_(False)
    with torch.no_grad():
        teacher.weight_v.add_(0.01 * torch.randn(K, DB, generator=g))
    return layer.to(_dev(), dtype), teacher.to(_dev(), dtype)


def _masks(g):
    masks = torch.zeros(IB, IL, dtype=torch.bool)
    for i in range(0, IB, 2):  # half the images, 10-50 % of their patches
        n = int(IL * (0.1 + 0.4 * torch.rand((), generator=g).item()))
        masks[i, torch.randperm(IL, generator=g)[:n]] = True
    return masks


def data(kind, dtype):
    key = (kind, dtype)
    if key not in _data:
        _data.clear()  # one case's tensors alive at a time
        g = torch.Generator().manual_seed(0)
        masks = _masks(g) if kind == "ibot" else None
        n_s, n_t = (V * B, T * B) if kind == "dino" else (int(masks.sum()),) * 2
        zs = F.normalize(torch.randn(n_s, DB, generator=g), dim=-1).to(_dev(), dtype).requires_grad_(True)
        zt = F.normalize(torch.randn(n_t, DB, generator=g), dim=-1).to(_dev(), dtype)
        layer, teacher = _layers(dtype, g)
        c = (0.01 * torch.randn(K, generator=g)).to(_dev())
        _data[key] = (zs, zt, layer, teacher, c, None if masks is None else masks.to(_dev()))
    return _data[key]


def _fn(provider, kind, dtype):
    zs, zt, layer, teacher, c, masks = data(kind, dtype)
    if provider == "sslkern":
        def step():
            loss, teacher_sum = sslkern.prototype_loss(
                zs, zt, layer.weight_v, teacher.weight_v, c, gain=layer.weight_g, teacher_gain=teacher.weight_g,
                masks=masks, n_global_crops=T, return_teacher_sum=True)
            return loss, 0.9 * c + 0.1 * teacher_sum / zt.shape[0]
    elif provider == "unfused":
        def step():
            s = layer(zs)
            with torch.no_grad():
                t = teacher(zt)
            if masks is None:
                loss, teacher_sum = sslkern.dino_loss(s, t, c, n_global_crops=T, return_teacher_sum=True)
            else:
                loss, teacher_sum = sslkern.ibot_patch_loss(s, t, masks, c, return_teacher_sum=True)
            return loss, 0.9 * c + 0.1 * teacher_sum / t.shape[0]
    else:
        raise ValueError(provider)

    def run():
        loss, _ = step()
        torch.autograd.grad(loss, [zs, layer.weight_v])

    return run


def _bytes(kind, dtype):
    """Fewest bytes one fwd + bwd + center call must move: read the features, both weights
    (v and the teacher's v, plus gains) and the center; write the feature gradient, the weight
    gradient dv and the new center. (Compute-bound: the tile products dominate the time.)"""
    zs, zt, layer, teacher, c, _ = data(kind, dtype)
    e = torch.finfo(dtype).bits // 8
    return (e * (2 * zs.numel() + zt.numel() + 3 * layer.weight_v.numel()) + 4 * 2 * c.numel()
            + 4 * 2 * layer.weight_g.numel())


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("provider", ["sslkern", "unfused"])
@pytest.mark.parametrize("dtype", sweep(DTYPES, DTYPES[:1]), ids=_dtype_name)
def test_prototype_loss_dino_b32_k65536(benchmark, provider, dtype):
    if provider == "unfused" and dtype != torch.float32 and not SLOW and _dev() == "cpu":
        pytest.skip("bf16 unfused head on CPU: emulated bf16 GEMMs (SSLKERN_BENCH_SLOW=1 to time it)")
    measure(benchmark, op="prototype_loss", case=f"DINO B={B} {T}+{V - T} crops Db={DB} K={K} "
                                                 f"{_dtype_name(dtype)} fwd+bwd+center",
            provider=provider, fn=_fn(provider, "dino", dtype), bytes_moved=_bytes("dino", dtype), rounds=3, warmup=1)


@full_sweep_only
@pytest.mark.parametrize("provider", ["sslkern", "unfused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
def test_prototype_loss_ibot_64x196_k65536(benchmark, provider, dtype):
    if provider == "unfused" and dtype != torch.float32 and not SLOW and _dev() == "cpu":
        pytest.skip("bf16 unfused head on CPU: emulated bf16 GEMMs (SSLKERN_BENCH_SLOW=1 to time it)")
    zs = data("ibot", dtype)[0]
    measure(benchmark, op="prototype_loss", case=f"iBOT {IB}x{IL} half masked 10-50% (M={zs.shape[0]}) Db={DB} "
                                                 f"K={K} {_dtype_name(dtype)} fwd+bwd+center",
            provider=provider, fn=_fn(provider, "ibot", dtype), bytes_moved=_bytes("ibot", dtype), rounds=3, warmup=1)
