"""relation_loss, forward + backward.

Case: RelViT's relation task at ViT-S/16 on 224² images: B = 64 images, N = 196 patch tokens
(the CLS token is not part of the loss), D = 384, 9 relation heads of width D // 9 = 42
(RelViT's ``MultiHeadAttentionScores(384, 9)``), patches shuffled per image, fp32; gradients
to the tokens and both projection weights. A second case adds RelViT's distance and angle
regressions (one head of width D each).
Providers:
  sslkern    sslkern.relation_loss (C++ on CPU, Triton on GPU)
  reference  sslkern.reference.relation_loss (eager: all heads' scores as one batched matmul,
             labels from the cells, cross_entropy)
  compiled   torch.compile of the reference
  relvit     RelViT's own code, ported: one nn.Linear pair and one bmm per head, stacked
             (B, 9, N, N) scores, F.cross_entropy against the (B, N, N) labels of SSLSignal
             (the label matrices are built before the timed call, as RelViT's dataloader does)
bytes_moved is the minimal traffic (read the tokens and weights, write their gradients); the op
is compute-bound (3 + 1 products of B·9·N²·42 each), so its GB/s is far below the copy bandwidth.
Default run: the fp32 relation case against the reference and RelViT's code, and the round-robin
sslkern / RelViT timing; SSLKERN_BENCH_FULL=1 adds torch.compile, the regressions and bf16.
"""
import math

import pytest
import torch

import sslkern
from harness import full_sweep_only, measure, measure_interleaved, sweep
from sslkern.reference.relation_loss import relvit_head_scores, relvit_ssl_signal

B, SIDE, D = 64, 14, 384
N, DH = SIDE * SIDE, D // 9
_compiled: dict = {}


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(regressions, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, D, generator=g)
    wq = torch.randn(9, DH, D, generator=g) / math.sqrt(D)
    wk = torch.randn(9, DH, D, generator=g) / math.sqrt(D)
    regs = [torch.randn(1, D, D, generator=g) / math.sqrt(D) for _ in range(4)] if regressions else []
    perms = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    leaves = [t.to(_dev(), dtype).requires_grad_(True) for t in [z, wq, wk] + regs]
    return leaves, perms.to(_dev())


def _fn(provider, leaves, perms, regressions):
    z, wq, wk, *regs = leaves
    kw = dict(distance=tuple(regs[:2]), angle=tuple(regs[2:])) if regressions else {}
    if provider == "sslkern":
        loss_fn = lambda: sslkern.relation_loss(z, wq, wk, perms, **kw).loss  # noqa: E731
    elif provider == "reference":
        loss_fn = lambda: sslkern.reference.relation_loss(z, wq, wk, perms, **kw).loss  # noqa: E731
    elif provider == "compiled":
        key = regressions
        if key not in _compiled:
            _compiled[key] = torch.compile(sslkern.reference.relation_loss)
        loss_fn = lambda: _compiled[key](z, wq, wk, perms, **kw).loss  # noqa: E731
    elif provider == "relvit":
        sig = [relvit_ssl_signal(p.cpu(), SIDE, regressions, regressions) for p in perms]
        y_rel = torch.stack([s["relations"] for s in sig]).to(z.device)
        ys = [torch.stack([s[k] for s in sig]).to(z.device).unsqueeze(1) for k in ("distances", "angles")] \
            if regressions else []

        def loss_fn():
            loss = torch.nn.functional.cross_entropy(relvit_head_scores(z, wq, wk), y_rel)
            for (a, b), y in zip((regs[:2], regs[2:]), ys):
                loss = loss + torch.nn.functional.mse_loss(relvit_head_scores(z, a, b), y)
            return loss
    else:
        raise ValueError(provider)

    def run():
        torch.autograd.grad(loss_fn(), leaves)

    return run


def _bytes(leaves):
    return 2 * sum(t.numel() * t.element_size() for t in leaves)


TARGETS = {"relvit": 3.0, "reference": 3.0, "compiled": 1.0}
ROUNDS = 3


@pytest.mark.parametrize("provider", sweep(["sslkern", "reference", "compiled", "relvit"], ["sslkern", "reference",
                                                                                        "relvit"]))
def test_relation_loss_b64_n196_d384(benchmark, provider):
    leaves, perms = _inputs(False)
    measure(benchmark, op="relation_loss", case=f"relations B={B} N={N} D={D} 9 heads x {DH} fp32 fwd+bwd",
            provider=provider, fn=_fn(provider, leaves, perms, False), bytes_moved=_bytes(leaves),
            target=TARGETS.get(provider), rounds=ROUNDS, warmup=1)


@full_sweep_only
@pytest.mark.parametrize("provider", ["sslkern", "reference", "relvit"])
def test_relation_loss_with_regressions(benchmark, provider):
    leaves, perms = _inputs(True, seed=1)
    measure(benchmark, op="relation_loss", case=f"relations + distance + angle B={B} N={N} D={D} fp32 fwd+bwd",
            provider=provider, fn=_fn(provider, leaves, perms, True), bytes_moved=_bytes(leaves),
            target=TARGETS.get(provider), rounds=ROUNDS, warmup=1)


@full_sweep_only
@pytest.mark.parametrize("provider", ["sslkern", "reference", "relvit"])
def test_relation_loss_b64_n196_d384_bf16(benchmark, provider):
    leaves, perms = _inputs(False, dtype=torch.bfloat16)
    measure(benchmark, op="relation_loss", case=f"relations B={B} N={N} D={D} 9 heads x {DH} bf16 fwd+bwd",
            provider=provider, fn=_fn(provider, leaves, perms, False), bytes_moved=_bytes(leaves),
            target=TARGETS.get(provider), rounds=ROUNDS, warmup=1)


def test_relation_loss_b64_n196_d384_interleaved(benchmark):
    """sslkern vs RelViT's code (the 3x target), one call of each per round: the VM's drift
    between the blocks of the per-provider tests does not enter this ratio."""
    leaves, perms = _inputs(False)
    fns = {p: _fn(p, leaves, perms, False) for p in ("sslkern", "relvit")}
    measure_interleaved(benchmark, op="relation_loss",
                        case=f"relations B={B} N={N} D={D} 9 heads x {DH} fp32 fwd+bwd, interleaved", fns=fns, rounds=15)
