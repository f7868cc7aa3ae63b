"""Every recipe under the loop's precision, compile and timm-model options.

Recipes are discovered from ``recipes/*.py`` (:func:`sslkern.train.presets.recipe_methods`), so a
recipe added later is covered without editing this file; ``TINY_EXTRA`` holds the extra options
that make a recipe tiny (a recipe without an entry runs with the common tiny options only).

* ``--precision bf16`` and ``fp16`` (CPU autocast): two steps with finite losses that track the
  fp32 run; fp16 runs under the GradScaler and logs its scale and skipped steps.
* ``--compile``: two steps whose losses equal the eager ones; the sslkern custom ops stay single
  graph nodes in a compiled block (data2vec 2.0 with ``--alibi``: ``alibi_attention``).
* ``--model vit_small_patch16_224 --image-size 224``: one step at batch 2 on a tiny RGB JPEG
  folder, and the exported encoders load into ``timm.create_model(name, pretrained=False)``
  strictly. By default for dino, mae, simclr and ijepa (one recipe of each family, and the one
  whose encoder overrides timm's defaults); every recipe with ``SSLKERN_SLOW_TESTS=1``.
* ``summary.json`` holds images/s, the data-wait fraction and the peak memory.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sslkern.gpu_check import TINY_RECIPE_ARGS, VIT_S_RECIPE_ARGS
from sslkern.train.logging import RunLogger
from sslkern.train.loop import parse_args, run
from sslkern.train.presets import recipe_methods

from recipe_helpers import digits_like

RECIPES = {cls.name: cls for _, cls in recipe_methods()}
SLOW = os.environ.get("SSLKERN_SLOW_TESTS") == "1"

# 2 steps of 8 digits on a dim-16, depth-1 ViT; kNN on 16 images, no probe.
COMMON = ["--dim", "16", "--heads", "2", "--depth", "1", "--batch-size", "8", "--steps", "2", "--epochs", "1",
          "--eval-every", "0", "--eval-images", "16", "--no-probe", "--quiet", "--threads", "1"]
# Options that shrink a recipe beyond COMMON, keyed by Method.name (the table gpu_check's dry
# training stage uses too); a recipe without an entry runs with COMMON only.
TINY_EXTRA = TINY_RECIPE_ARGS
# One recipe of each family for the default ViT-S/16 run (all of them with SSLKERN_SLOW_TESTS=1):
# distillation, MIM, contrastive, and I-JEPA, whose encoder overrides timm's defaults (no CLS
# token, average pooling).
VIT_S_DEFAULT = ("dino", "mae", "simclr", "ijepa")

# Step-1 losses (same weights, same views) of bf16 / fp16 autocast against fp32: the forward's
# matmuls round to 8 (bf16) or 11 (fp16) mantissa bits, the reductions stay fp32.
HALF_RTOL = {"bf16": 5e-2, "fp16": 1e-2}
# --compile against eager, both fp32: inductor reorders sums (and fuses), nothing else changes.
COMPILE_RTOL, COMPILE_ATOL = 1e-4, 1e-5


def tiny_args(name, *extra):
    return COMMON + TINY_EXTRA.get(name, []) + list(extra)


def _train_rows(out):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"]


def _summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    """The eager fp32 losses of each recipe's tiny run, computed once per recipe."""
    cache = {}

    def get(name):
        if name not in cache:
            out = str(tmp_path_factory.mktemp(f"fp32_{name}"))
            run(RECIPES[name], tiny_args(name, "--precision", "fp32", "--out", out))
            cache[name] = [r["loss"] for r in _train_rows(out)]
        return cache[name]

    return get


@pytest.fixture(scope="session")
def rgb_jpegs(tmp_path_factory):
    """An ImageFolder of 24 small RGB JPEGs in 2 classes (16 train / 8 test), each its own size."""
    root = tmp_path_factory.mktemp("rgb_jpegs")
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(root / f"class{c}")
        for i in range(12):
            h, w = 40 + 6 * (i % 3), 48 - 4 * (i % 4)
            small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            Image.fromarray(np.kron(small, np.ones((8, 8, 1), np.uint8))[:h, :w]).save(root / f"class{c}" / f"{i}.jpg")
    return str(root)


def test_every_recipe_has_tiny_arguments_that_parse():
    """A stale entry (a recipe renamed or removed) fails here instead of being silently unused."""
    assert set(TINY_EXTRA) <= set(RECIPES), sorted(set(TINY_EXTRA) - set(RECIPES))
    for name, cls in RECIPES.items():
        parse_args(cls, tiny_args(name, "--out", "/tmp/unused"))


def _check_summary(out, precision):
    s = _summary(out)
    assert s["precision"] == precision
    tp = s["throughput"]
    assert tp["img_per_s"] > 0 and 0 <= tp["data_wait_frac"] <= 1 and tp["peak_mem_mb"] > 0, tp


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_half_precision_steps(tmp_path, fp32_losses, name, precision):
    out = str(tmp_path / "run")
    run(RECIPES[name], tiny_args(name, "--precision", precision, "--out", out))
    rows = _train_rows(out)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if precision == "fp16":  # the GradScaler's state is logged every step
        assert all("loss_scale" in r and "skipped_steps" in r for r in rows)
        assert rows[-1]["skipped_steps"] <= 2 and rows[-1]["loss_scale"] >= 65536 / 4
    else:
        assert not any("loss_scale" in r for r in rows)
    ref = fp32_losses(name)[0]
    assert rows[0]["loss"] == pytest.approx(ref, rel=HALF_RTOL[precision], abs=1e-3), (rows[0]["loss"], ref)
    _check_summary(out, precision)
    assert _summary(out)["skipped_steps"] == rows[-1].get("skipped_steps", 0)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_compile_equals_eager(tmp_path, fp32_losses, name):
    out = str(tmp_path / "run")
    run(RECIPES[name], tiny_args(name, "--precision", "fp32", "--compile", "--out", out))
    got = [r["loss"] for r in _train_rows(out)]
    np.testing.assert_allclose(got, fp32_losses(name), rtol=COMPILE_RTOL, atol=COMPILE_ATOL)
    _check_summary(out, "fp32")


def test_custom_ops_stay_single_nodes_in_a_compiled_block():
    """data2vec 2.0 --alibi: a transformer block (what --compile compiles) traces to one graph,
    with ``sslkern::alibi_attention`` a single call in it (not decomposed, no graph break)."""
    cls = RECIPES["data2vec2"]
    _, a = parse_args(cls, tiny_args("data2vec2", "--alibi", "--out", "/tmp/unused"))
    torch.manual_seed(0)
    method = cls(a, digits_like())
    vit = method.encoders()["student"] if "student" in method.encoders() else next(iter(method.encoders().values()))
    blk = vit.blocks[0]
    ids_keep = torch.arange(16).repeat(2, 1)
    x = torch.randn(2, 17, a.dim)
    with vit.alibi.tokens(ids_keep=ids_keep):
        explained = torch._dynamo.explain(blk)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    calls = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("sslkern.alibi_attention" in c for c in calls) == 1, calls
    with vit.alibi.tokens(ids_keep=ids_keep):
        torch.testing.assert_close(torch.compile(blk, fullgraph=True)(x), blk(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(RECIPES) if SLOW else [n for n in VIT_S_DEFAULT if n in RECIPES])
def test_vit_small_224_one_step_and_timm_export(tmp_path, rgb_jpegs, name):
    import timm

    from sslkern.train.checkpoint import load_tensors

    out = str(tmp_path / "run")
    args = tiny_args(name, *VIT_S_RECIPE_ARGS.get(name, []), "--model", "vit_small_patch16_224", "--image-size",
                     "224", "--batch-size", "2", "--steps", "1", "--eval-images", "4", "--data", rgb_jpegs,
                     "--workers", "0", "--out", out)
    run(RECIPES[name], args)
    rows = _train_rows(out)
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])
    s = _summary(out)
    assert s["model"] == "vit_small_patch16_224" and s["image_size"] == 224
    exported = [f for f in os.listdir(out) if f.startswith("encoder_") and f.endswith(".safetensors")]
    assert exported
    for f in exported:
        tensors, meta = load_tensors(os.path.join(out, f))
        kw = dict(meta["timm_kwargs"])
        assert kw.pop("model_name") == "vit_small_patch16_224"
        model = timm.create_model("vit_small_patch16_224", pretrained=False, **kw)
        model.load_state_dict(tensors, strict=True)
        assert model.embed_dim == 384 and len(model.blocks) == 12


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_rule_and_info_report(monkeypatch, native):
    """auto on a CPU: bf16 only with native bf16 matmul and a model at least ViT-S wide;
    ``python -m sslkern.info`` reports the same choice."""
    from sslkern import info
    from sslkern.train import precision

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert precision.resolve_precision("auto", cpu, 96)[0] == "fp32"
    assert precision.resolve_precision("auto", cpu, 384)[0] == ("bf16" if native else "fp32")
    assert precision.resolve_precision("fp16", cpu, 96) == ("fp16", "asked for")
    lines = info.precision_report()
    assert f"ViT-S, dim 384: {'bf16' if native else 'fp32'} — " in "\n".join(lines), lines


def test_block_outputs_of_compiled_blocks():
    """data2vec's targets read block outputs through forward hooks added per call; compiled
    blocks do not see such hooks (dynamo does not guard on them), so ``block_outputs`` must
    still return every requested layer after the blocks were compiled and called without hooks."""
    from timm.models.vision_transformer import VisionTransformer

    import sslkern

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0).eval()
    x = torch.randn(2, 3, 16, 16)
    want = {site: sslkern.nn.block_outputs(vit, x, 2, site=site) for site in ("block", "mlp")}
    for blk in vit.blocks:
        blk.compile(backend="eager")
    vit(x)  # the compiled blocks' first call has no hooks
    for site in ("block", "mlp", "block"):
        got = sslkern.nn.block_outputs(vit, x, 2, site=site)
        assert len(got) == 2, site
        for g, w in zip(got, want[site]):
            torch.testing.assert_close(g, w)
