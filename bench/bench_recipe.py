"""One training step of each recipe: sslkern ops vs the same recipe on the eager reference ops.

One timed call = the loop's ``train_step`` (views / masks, teacher, student, fused loss,
backward, clipping, AdamW, EMA) on fixed images, 1 torch thread (the recipes' default) at
the default size, 2 threads at ViT-S/16 224. Providers: ``sslkern`` (auto backend: C++
kernels on CPU) and ``reference`` (``sslkern.use_backend("reference")``: eager reference
ops for the losses, masks, gather / restore, targets and EMA; timm layers and AdamW are
the same in both).

Sizes: ``default`` is the recipe's default model and batch; ``vits`` is ViT-S/16 at 224
(dim 384, depth 12, 6 heads) with the method's real head (DINO / iBOT: K = 65,536, MLP
2048, bottleneck 256) at a batch this 2-core machine runs in seconds.

``test_profile_shares`` profiles one sslkern step per case and writes the share of the step
spent in sslkern ops, in GEMMs (mm / addmm / bmm / attention) and in everything else to
``docs/bench/recipe_profile.md``.

Default run: the data2vec 2.0 step at its default size (the README's main job); the other
recipes, the ViT-S sizes, the precision comparison and the profile need SSLKERN_BENCH_FULL=1.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import sslkern
from sslkern._backend import cpu_native_half
from harness import full_sweep_only, measure, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VITS = ["--image-size", "224", "--patch-size", "16", "--dim", "384", "--depth", "12", "--heads", "6"]
DISTILL_VITS = VITS + ["--out-dim", "65536", "--hidden-dim", "2048", "--bottleneck-dim", "256", "--local-size", "96"]
# (recipe, Method class, size name, extra argv, threads)
CASES = [
    ("data2vec2", "Data2Vec2", "default", [], 1),
    ("dino", "DINO", "default", [], 1),
    ("ibot", "IBOT", "default", [], 1),
    ("data2vec2", "Data2Vec2", "vits", VITS + ["--batch-size", "8", "--clones", "8"], 2),
    ("dino", "DINO", "vits", DISTILL_VITS + ["--batch-size", "4", "--local-crops", "4"], 2),
    ("ibot", "IBOT", "vits", DISTILL_VITS + ["--batch-size", "4", "--local-crops", "4"], 2),
    ("byol", "BYOL", "default", [], 1),
    ("simsiam", "SimSiam", "default", [], 1),
    ("moco", "MoCoV3", "default", [], 1),
    ("simclr", "SimCLR", "default", [], 1),
    # the papers' MLPs: BYOL 4096 -> 256, SimSiam 2048 (bottleneck 512), MoCo v3 4096 -> 256, SimCLR 2048 -> 128
    ("byol", "BYOL", "vits", VITS + ["--hidden-dim", "4096", "--out-dim", "256", "--batch-size", "8"], 2),
    ("simsiam", "SimSiam", "vits", VITS + ["--hidden-dim", "2048", "--out-dim", "2048", "--pred-dim", "512",
                                           "--batch-size", "8"], 2),
    ("moco", "MoCoV3", "vits", VITS + ["--hidden-dim", "4096", "--out-dim", "256", "--batch-size", "8"], 2),
    ("simclr", "SimCLR", "vits", VITS + ["--hidden-dim", "2048", "--out-dim", "128", "--batch-size", "8"], 2),
    ("mae", "MAE", "default", [], 1),
    ("data2vec", "Data2Vec", "default", [], 1),
    ("ijepa", "IJEPA", "default", [], 1),
    ("mae", "MAE", "vits", VITS + ["--batch-size", "8", "--decoder-dim", "256", "--decoder-depth", "4",
                                   "--decoder-heads", "8"], 2),
    ("data2vec", "Data2Vec", "vits", VITS + ["--batch-size", "4", "--top-k", "6"], 2),
    ("ijepa", "IJEPA", "vits", VITS + ["--batch-size", "4", "--pred-dim", "192", "--pred-depth", "4",
                                       "--pred-heads", "6", "--min-keep", "10", "--num-targets", "4",
                                       "--target-scale", "0.15", "0.2", "--ema-start", "0.996"], 2),
    ("beit", "BEiT", "default", [], 1),
    ("maskfeat", "MaskFeat", "default", [], 1),
    ("relvit", "RelViT", "default", [], 1),
    ("pretext-rotation", "Rotation", "default", ["--task", "rotation"], 1),
    ("pretext-jigsaw", "Jigsaw", "default", ["--task", "jigsaw"], 1),
    # BEiT: a 1,024-code k-means tokenizer (DALL-E's dVAE has 8,192 codes; its fit on the
    # synthetic batch is not part of the step); MaskFeat: 8-pixel HOG cells as the paper at 224
    ("beit", "BEiT", "vits", VITS + ["--batch-size", "8", "--vocab-size", "1024", "--kmeans-iters", "2"], 2),
    ("maskfeat", "MaskFeat", "vits", VITS + ["--batch-size", "8", "--hog-pool", "8"], 2),
    ("relvit", "RelViT", "vits", VITS + ["--batch-size", "8"], 2),
    ("pretext-rotation", "Rotation", "vits", VITS + ["--task", "rotation", "--batch-size", "8"], 2),
    ("pretext-jigsaw", "Jigsaw", "vits", VITS + ["--task", "jigsaw", "--batch-size", "8"], 2),
]
IDS = [f"{c[0]}-{c[2]}" for c in CASES]


def _recipe(name):
    name = name.split("-")[0]  # pretext-rotation / pretext-jigsaw: recipes/pretext.py
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _size_name(extra):
    return "vits" if extra[:2] == VITS[:2] else "default"


def make_step(name, cls, extra, threads, precision="fp32"):
    """(step closure, args, reset) for one recipe at one size, on synthetic images."""
    from sslkern.data.datasets import _in_memory
    from sslkern.data.loader import pack
    from sslkern.train.loop import StepContext, make_optimizer, parse_args, train_step

    mod = _recipe(name)
    method_cls = getattr(mod, cls)
    out = f"/tmp/sslkern-bench-recipe-{name}-{_size_name(extra)}"
    _, a = parse_args(method_cls, ["--out", out, "--threads", str(threads)] + extra)
    a.precision = precision
    chans = 1 if a.image_size <= 32 else 3  # digits are grey; ViT-S/16 224 gets RGB
    side = 8 if chans == 1 else 256  # the digits' native size; photos a little larger than the crops
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = max(64, a.batch_size)
    pix = rng.integers(0, 256, size=(2 * n, side, side, chans), dtype=np.uint8)
    data = _in_memory("synthetic", pix[:n], np.arange(n) % 10, [str(c) for c in range(10)], pix[n:],
                      np.arange(n) % 10)
    if chans == 3:  # a disk dataset's views: integer boxes, ImageNet statistics
        data.in_memory = False
    method = method_cls(a, data)
    opt = make_optimizer(method, a)
    images = pack(list(pix[:a.batch_size]), [0] * a.batch_size, chans).images()
    gen, host = torch.Generator(), torch.Generator()
    # epoch 1 of 10: past the frozen last layer, EMA and temperatures mid-schedule
    ctx = StepContext(10, 1, 100, 10, gen, a.batch_size, lr=a.lr, weight_decay=a.weight_decay, host_generator=host,
                      mean=data.mean, std=data.std)
    ctx.values = method.schedule(ctx)

    def step():
        train_step(a, method, method, opt, images, ctx)

    return step, a, lambda: (gen.manual_seed(1), host.manual_seed(1))


@pytest.mark.parametrize("provider", ["sslkern", "reference"])
@pytest.mark.parametrize("case", sweep(CASES, CASES[:1], unpack=False), ids=IDS)
def test_train_step(benchmark, case, provider):
    name, cls, size, extra, threads = case
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step, a, reset = make_step(name, cls, extra, threads)
        backend = None if provider == "sslkern" else "reference"

        def call():
            with sslkern.use_backend(backend):
                step()

        label = (f"train step, {size} ({a.image_size}px, dim {a.dim}, depth {a.depth}), B={a.batch_size}, "
                 f"{threads} thread{'s' if threads > 1 else ''}, fp32")
        measure(benchmark, op=f"{name} recipe", case=label, provider=provider, fn=call, setup=reset,
                rounds=10 if size == "default" else 3)
    finally:
        torch.set_num_threads(prev)


PRECISION_CASES = [c for c in CASES if c[2] == "vits" and c[0] in ("data2vec2", "mae", "dino")]


@full_sweep_only
@pytest.mark.parametrize("provider", ["sslkern", "sslkern_bf16"])
@pytest.mark.parametrize("case", PRECISION_CASES, ids=[f"{c[0]}-{c[2]}" for c in PRECISION_CASES])
def test_train_step_precision(benchmark, case, provider):
    """``--precision fp32`` vs ``bf16`` (``torch.autocast`` around the method's forward) for one step."""
    name, cls, size, extra, threads = case
    native = torch.cuda.is_available() or cpu_native_half(torch.bfloat16)
    if provider == "sslkern_bf16" and not native and os.environ.get("SSLKERN_BENCH_SLOW") != "1":
        pytest.skip("CPU without native bf16 GEMMs (no AVX512-BF16 / AMX): emulated bf16 GEMMs "
                    "(docs/bench/precision.md); SSLKERN_BENCH_SLOW=1 to time it")
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step, a, reset = make_step(name, cls, extra, threads, "bf16" if provider == "sslkern_bf16" else "fp32")

        def call():
            step()

        label = f"train step precision, {size} ({a.image_size}px, dim {a.dim}), B={a.batch_size}, {threads} threads"
        measure(benchmark, op=f"{name} recipe", case=label, provider=provider, fn=call, setup=reset, rounds=3)
    finally:
        torch.set_num_threads(prev)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
            "aten::scaled_dot_product", "aten::_flash_attention", "aten::convolution", "aten::mkldnn_convolution")


def _shares(prof) -> dict[str, float]:
    buckets = {"sslkern": 0.0, "gemm": 0.0, "other": 0.0}
    for e in prof.key_averages():
        t = e.self_cpu_time_total
        if e.key.startswith(("sslkern::", "sslkern_C::")):
            buckets["sslkern"] += t
        elif e.key.startswith(GEMM_OPS):
            buckets["gemm"] += t
        elif e.key.startswith("aten::") or e.key.startswith("Optimizer") or e.key.startswith("autograd::"):
            buckets["other"] += t
    total = sum(buckets.values()) or 1.0
    return {k: 100.0 * v / total for k, v in buckets.items()}


@full_sweep_only
def test_profile_shares(benchmark):
    """Where one sslkern training step spends its time (self CPU time per op)."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    prev = torch.get_num_threads()
    for name, cls, size, extra, threads in CASES:
        torch.set_num_threads(threads)
        step, a, reset = make_step(name, cls, extra, threads)
        reset(), step(), reset(), step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            reset()
            step()
        s = _shares(prof)
        rows.append(f"| {name} | {size} | {a.batch_size} | {s['sslkern']:.1f} % | {s['gemm']:.1f} % | {s['other']:.1f} % |")
    torch.set_num_threads(prev)
    from harness import machine

    text = ["# Where a training step spends its time (sslkern backend, torch profiler, self CPU time)", "",
            f"Machine: {machine()}; torch {torch.__version__}. Written by `pytest bench/bench_recipe.py "
            "--benchmark-only -k profile`.", "",
            "| recipe | size | batch | sslkern ops | GEMMs (mm/addmm/bmm/attention/conv) | everything else |",
            "|---|---|---:|---:|---:|---:|", *rows, ""]
    with open(os.path.join(ROOT, "docs", "bench", "recipe_profile.md"), "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))
    benchmark.pedantic(lambda: None, rounds=1)
