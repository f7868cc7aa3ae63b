"""data2vec 2.0 targets + masked regression, forward and backward.

Case (data2vec 2.0 base-like): K = 10 teacher layers of (B = 32, T = 196, D = 768),
M = 4 clone masks per image at 80 % masking, student predictions (B·M, T, D); fp32, and
bf16 layers + predictions (fp32 accumulation, fp32 targets).
Timed work: targets from the layers, the regression loss, its gradient w.r.t. pred.

Providers:
  sslkern    layer_average_targets + masked_regression_loss (C++ on CPU, Triton on GPU)
  reference  fairseq-style eager: make_targets (instance norm per layer, average, layer
             norm), repeat_interleave over clones, boolean selection, d2v_loss, sum
  compiled   torch.compile of the reference
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sslkern
from harness import measure, sweep

K, B, T, D, M, MASK_PROB = 10, 32, 196, 768, 4, 0.8
_data = {}


def data(dtype=torch.float32):
    if _data.get("dtype") != dtype:
        _data.clear()
        _data["dtype"] = dtype
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator(device="cpu").manual_seed(0)
        _data["layers"] = [torch.randn(B, T, D, generator=g).to(dev, dtype) for _ in range(K)]
        _data["pred"] = torch.randn(B * M, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        # exactly int(0.8 T) masked tokens per clone row, as data2vec 2.0's masks
        noise = torch.rand(B * M, T, generator=g)
        n_mask = int(T * MASK_PROB)
        mask = torch.zeros(B * M, T, dtype=torch.bool)
        mask.scatter_(1, noise.argsort(dim=1)[:, :n_mask], True)
        _data["mask"] = mask.to(dev)
    return _data["layers"], _data["pred"], _data["mask"]


def fairseq_step(layers, pred, mask):
    with torch.no_grad():
        tls = [F.instance_norm(t.transpose(1, 2).float()).transpose(1, 2) for t in layers]
        y = tls[0].float()
        for t in tls[1:]:
            y = y + t
        y = y / len(tls)
        y = F.layer_norm(y, y.shape[-1:])
    y = y.repeat_interleave(M, 0)
    x = pred[mask].float()
    y = y[mask]
    loss = F.mse_loss(x, y, reduction="none") * (1 / math.sqrt(x.size(-1)))
    return loss.sum()


def sslkern_step(layers, pred, mask):
    targets = sslkern.layer_average_targets(layers)
    return sslkern.masked_regression_loss(pred, targets, mask)


_compiled = {}


def make_fn(provider, dtype=torch.float32):
    layers, pred, mask = data(dtype)
    if provider == "sslkern":
        step = sslkern_step
    elif provider == "reference":
        step = fairseq_step
    elif provider == "compiled":
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(fairseq_step)
        step = _compiled["fn"]
    else:
        raise ValueError(provider)

    def run():
        loss = step(layers, pred, mask)
        torch.autograd.grad(loss, pred)

    return run


@pytest.mark.parametrize("provider", sweep(["sslkern", "sslkern_nocache", "reference", "compiled"],
                                           ["sslkern", "reference", "compiled"]))
@pytest.mark.parametrize("dtype", sweep([torch.float32, torch.bfloat16], [torch.float32]), ids=["fp32", "bf16"])
def test_d2v_targets_base(benchmark, provider, dtype):
    if provider == "sslkern_nocache" and dtype != torch.float32:
        pytest.skip("the output cache is timed on the fp32 case only")
    n_btd = B * T * D
    e = torch.finfo(dtype).bits // 8
    # fewest bytes: read the K layers once, write + read the (fp32) targets, read pred
    # (forward and backward: masked rows only, 80 %), write its gradient.
    bytes_moved = e * K * n_btd + 4 * 2 * n_btd + e * (2 * MASK_PROB * M * n_btd + M * n_btd)
    dt = "bf16" if dtype == torch.bfloat16 else "fp32"
    measure(benchmark, op="data2vec targets + loss", case=f"K={K} B={B} T={T} D={D} M={M} mask 80% {dt} fwd+bwd",
            provider=provider, fn=make_fn(provider.removesuffix("_nocache"), dtype), bytes_moved=bytes_moved,
            target={"reference": 4.0, "compiled": 2.0}.get(provider) if dtype == torch.float32 else None,
            rounds=5, warmup=2)
