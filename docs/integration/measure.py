"""Time one training step of each before/after script of docs/integration.md (and the
vit_small_patch16_224 bar), side by side in one process, and measure peak extra memory.

    flock /tmp/bench.lock python docs/integration/measure.py [--rounds 7] [--only timm,lightly,...]

Before/after steps are interleaved round by round (so drift on a shared machine hits both);
medians over ``--rounds`` steps after two warm-up steps. Peak extra memory: bytes allocated
during one step beyond what was live before it (torch profiler events, sslkern's CPU output
cache off), as bench/harness.py measures it. dinov2 is not installed: its "before" runs the
test-only transcription of dinov2's losses (tests/_dinov2_ref.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from harness import machine, peak_extra_bytes  # noqa: E402


def load(name):
    spec = importlib.util.spec_from_file_location(f"integration_{name[:-3]}", HERE / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def vit_small_step(patched: bool, batch: int = 4, sdpa_only: bool = False):
    """The bar: timm vit_small_patch16_224, one supervised step (fwd + bwd + AdamW).
    ``sdpa_only``: the patched model with every plain-attention call on SDPA (for comparison)."""
    import timm

    import sslkern

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    if patched:
        sslkern.patch_timm_vit(model)
        if sdpa_only:
            for blk in model.blocks:
                blk.attn._prefer_sdpa = lambda args, q: args["mode"] == "none"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))

    def step(i):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def cases():
    import _dinov2_ref

    sys.modules.update(_dinov2_ref.as_dinov2_modules())
    vit_s = dict(name="vit_small_patch16_224", img_size=112, batch=8, depth=12)
    lightly_sz = dict(batch=32, output_dim=65536, n_local=6, global_size=32, local_size=16, width=32, epochs=1000)
    dinov2_sz = dict(batch=16, out_dim=65536, n_local=6, global_size=32, local_size=16, depth=2)
    return {
        "vit_s": ("timm vit_small_patch16_224, supervised step B=4 224px fwd+bwd+AdamW",
                  [("timm", lambda: vit_small_step(False)), ("patched", lambda: vit_small_step(True)),
                   ("patched, SDPA only", lambda: vit_small_step(True, sdpa_only=True))]),
        "timm": ("timm example (ViT-S/16 masked self-distillation, B=8 112px = 49 patches, 50% kept, EMA)",
                 [("before", lambda: load("timm_before.py").build(**vit_s)),
                  ("after", lambda: load("timm_after.py").build(**vit_s))]),
        "lightly": ("lightly DINO example (B=32, K=65536, 2x32px + 6x16px crops, conv backbone)",
                    [("before", lambda: load("lightly_before.py").build(**lightly_sz)),
                     ("after", lambda: load("lightly_after.py").build(**lightly_sz))]),
        "dinov2": ("dinov2-style step (B=16/crop, K=65536, 2x32px + 6x16px crops, 2-block ViT, iBOT 30% masked)",
                   [("before", lambda: load("dinov2_before.py").build(**dinov2_sz)),
                    ("drop-in", lambda: load("dinov2_after.py").build(**dinov2_sz)),
                    ("fused", lambda: load("dinov2_fused.py").build(**dinov2_sz))]),
    }


def run(key, title, providers, rounds):
    steps = [(name, make()) for name, make in providers]
    for _, step in steps:  # warm-up
        step(0)
        step(1)
    times = {name: [] for name, _ in steps}
    for r in range(rounds):
        for name, step in steps:
            t0 = time.perf_counter()
            step(2 + r)
            times[name].append(time.perf_counter() - t0)
    peaks = {name: peak_extra_bytes(lambda: step(100)) for name, step in steps}
    base = steps[0][0]
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    print(f"\n## {title}")
    print("| provider | median step | speed-up over " + base + " | peak extra memory |")
    print("|---|---:|---:|---:|")
    for name in med:
        print(f"| {name} | {med[name]:.0f} ms | {med[base] / med[name]:.2f}x | {peaks[name] / 2**20:.0f} MiB |")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--only", default="vit_s,timm,lightly,dinov2")
    args = ap.parse_args()
    print(f"machine: {machine()}; torch {torch.__version__}; rounds {args.rounds}")
    all_cases = cases()
    for key in args.only.split(","):
        title, providers = all_cases[key]
        run(key, title, providers, args.rounds)


if __name__ == "__main__":
    main()
