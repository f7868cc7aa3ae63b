"""info_nce_loss, forward + backward.

Cases (D = 256, L2 normalization inside, gradients to both q and k):
  InfoNCE  N = M = 4,096 fp32 and bf16, N = M = 16,384 fp32, τ = 0.2 (MoCo v3 form, positives
           on the diagonal).
  NT-Xent  2n = 4,096 views (n = 2,048 images, two views), τ = 0.5 (SimCLR form; lightly's
           NTXentLoss has this form only): the same (4,096 × 4,096) logits.
  RINCE    the robust mode (chingyaoc/RINCE) at N = M = 4,096: MoCo v3 form (q 0.6, λ 0.01,
           τ 0.2) and SimCLR form (2n = 4,096, q 0.1, λ 0.01, τ 0.1), each interleaved with
           the InfoNCE / NT-Xent call on the same inputs (the bar: RINCE within 1.2× of
           InfoNCE's time at InfoNCE's memory) and with chingyaoc/RINCE's eager formula
           (sslkern.reference.info_nce_loss(rince=...)).
Providers:
  sslkern    sslkern.info_nce_loss (C++ on CPU, Triton on GPU)
  reference  sslkern.reference.info_nce_loss: normalize, matmul, cross_entropy (eager)
  compiled   torch.compile of the reference
  lightly    lightly.loss.NTXentLoss (NT-Xent case)
bytes_moved is the minimal traffic (read q and k, write dq and dk: 2·(N + M)·D elements);
the op is compute-bound (three N·M·D products), so its GB/s column is far below the copy
bandwidth by nature. Default run: the N = 4,096 fp32 InfoNCE and NT-Xent cases;
SSLKERN_BENCH_FULL=1 adds bf16, N = 16,384, the output cache off and the compiled NT-Xent.
"""
import pytest
import torch

import sslkern
from harness import full_sweep_only, measure, measure_interleaved, sweep

D = 256
_compiled: dict = {}


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n_q, n_k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, D, generator=g).to(_dev(), dtype).requires_grad_(True)
    k = torch.randn(n_k, D, generator=g).to(_dev(), dtype).requires_grad_(True)
    return q, k


def _fn(provider, q, k, temperature, nt_xent):
    ref = sslkern.reference.info_nce_loss
    if provider == "sslkern":
        loss_fn = lambda: sslkern.info_nce_loss(q, k, temperature, nt_xent=nt_xent)  # noqa: E731
    elif provider == "reference":
        loss_fn = lambda: ref(q, k, temperature, nt_xent=nt_xent)  # noqa: E731
    elif provider == "compiled":
        key = (nt_xent, q.shape, q.dtype)
        if key not in _compiled:
            _compiled[key] = torch.compile(ref)
        loss_fn = lambda: _compiled[key](q, k, temperature, nt_xent=nt_xent)  # noqa: E731
    elif provider == "lightly":
        lightly_loss = pytest.importorskip("lightly.loss")
        crit = lightly_loss.NTXentLoss(temperature=temperature)
        loss_fn = lambda: crit(q, k)  # noqa: E731
    else:
        raise ValueError(provider)

    def run():
        torch.autograd.grad(loss_fn(), (q, k))

    return run


def _bytes(n_q, n_k, dtype):
    return 2 * (n_q + n_k) * D * torch.empty((), dtype=dtype).element_size()


TARGETS = {"reference": 1.5, "compiled": 1.0}


@pytest.mark.parametrize("provider", sweep(["sslkern", "sslkern_nocache", "reference", "compiled"],
                                           ["sslkern", "reference", "compiled"]))
def test_info_nce_n4096_fp32(benchmark, provider):
    q, k = _inputs(4096, 4096, torch.float32)
    measure(benchmark, op="info_nce_loss", case=f"InfoNCE N=M=4096 D={D} fp32 fwd+bwd (dq, dk)", provider=provider,
            fn=_fn(provider.removesuffix("_nocache"), q, k, 0.2, False), bytes_moved=_bytes(4096, 4096, q.dtype),
            target=TARGETS.get(provider), rounds=5, warmup=1)


@pytest.mark.parametrize("provider", sweep(["sslkern", "reference", "compiled", "lightly"],
                                           ["sslkern", "reference", "lightly"]))
def test_info_nce_ntxent_2n4096_fp32(benchmark, provider):
    q, k = _inputs(2048, 2048, torch.float32, seed=1)
    measure(benchmark, op="info_nce_loss", case=f"NT-Xent 2n=4096 views D={D} fp32 fwd+bwd", provider=provider,
            fn=_fn(provider, q, k, 0.5, True), bytes_moved=_bytes(4096, 4096, q.dtype),
            target={**TARGETS, "lightly": 1.5}.get(provider), rounds=5, warmup=1)


@full_sweep_only
@pytest.mark.parametrize("provider", ["sslkern", "reference", "compiled"])
def test_info_nce_n4096_bf16(benchmark, provider):
    q, k = _inputs(4096, 4096, torch.bfloat16)
    measure(benchmark, op="info_nce_loss", case=f"InfoNCE N=M=4096 D={D} bf16 fwd+bwd (dq, dk)", provider=provider,
            fn=_fn(provider, q, k, 0.2, False), bytes_moved=_bytes(4096, 4096, q.dtype), rounds=3, warmup=1)


@full_sweep_only
@pytest.mark.parametrize("provider", ["sslkern", "reference", "compiled"])
def test_info_nce_n16384_fp32(benchmark, provider):
    q, k = _inputs(16384, 16384, torch.float32)
    measure(benchmark, op="info_nce_loss", case=f"InfoNCE N=M=16384 D={D} fp32 fwd+bwd (dq, dk)", provider=provider,
            fn=_fn(provider, q, k, 0.2, False), bytes_moved=_bytes(16384, 16384, q.dtype), rounds=2, warmup=1)


def _rince_fns(q, k, temperature, nt_xent, rince):
    ref = sslkern.reference.info_nce_loss

    def grad(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(), (q, k))

    return {"sslkern": grad(lambda: sslkern.info_nce_loss(q, k, temperature, nt_xent=nt_xent)),
            "sslkern_rince": grad(lambda: sslkern.info_nce_loss(q, k, temperature, nt_xent=nt_xent, rince=rince)),
            "reference_rince": grad(lambda: ref(q, k, temperature, nt_xent=nt_xent, rince=rince))}


def test_rince_moco_n4096_fp32_interleaved(benchmark):
    """RINCE, MoCo v3 form, vs InfoNCE (the baseline, "sslkern") on the same inputs."""
    q, k = _inputs(4096, 4096, torch.float32)
    measure_interleaved(benchmark, op="info_nce_loss", case=f"RINCE vs InfoNCE N=M=4096 D={D} fp32 fwd+bwd, interleaved",
                        fns=_rince_fns(q, k, 0.2, False, (0.6, 0.01)), rounds=10, warmup=1)


def test_rince_simclr_2n4096_fp32_interleaved(benchmark):
    """RINCE, SimCLR form (the tied CPU path), vs NT-Xent (the baseline, "sslkern")."""
    q, k = _inputs(2048, 2048, torch.float32, seed=1)
    measure_interleaved(benchmark, op="info_nce_loss", case=f"RINCE vs NT-Xent 2n=4096 views D={D} fp32 fwd+bwd, "
                        "interleaved", fns=_rince_fns(q, k, 0.1, True, (0.1, 0.01)), rounds=10, warmup=1)
