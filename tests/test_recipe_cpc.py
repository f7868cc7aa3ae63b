"""CPC v2 (recipes/cpc.py) end to end on the shared loop (tiny model, a few steps), and the
pieces that make it CPC v2: patches encoded alone, a context that looks only upward, the
pseudo-code's labels, InfoNCE over every target of the batch through the tiled op."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipe_helpers import digits_like, load_recipe, ragged, step_ctx
from sslkern.train import checkpoint as ckpt
from sslkern.train import parse_args
from sslkern.train.logging import RunLogger

TINY = ["--dim", "32", "--heads", "2", "--depth", "1", "--context-dim", "16", "--target-dim", "16",
        "--batch-size", "64", "--epochs", "2", "--eval-every", "1", "--quiet", "--threads", "1"]
mod = load_recipe("cpc")


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


def _method(argv=(), seed=0):
    _, a = parse_args(mod.CPC, TINY + ["--out", "/tmp/unused"] + list(argv))
    torch.manual_seed(seed)
    return mod.CPC(a, digits_like()), a


def test_smoke_run_directory(tmp_path):
    out = str(tmp_path / "cpc")
    res = mod.run(mod.CPC, TINY + ["--out", out, "--steps", "3"])
    assert res["step"] == 3
    for f in ["config.json", "metrics.jsonl", "checkpoint.safetensors", "summary.json", "encoder_encoder.safetensors"]:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    train = _rows(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert np.isfinite(r["loss"])
        assert r["cpc_chance"] == pytest.approx(1 / (64 * 9))
        assert r["cpc_acc"] + r["wrong_same_image"] + r["wrong_other_image"] == pytest.approx(1.0)
        assert r["latent_std"] > 0
    assert train[0]["loss"] == pytest.approx(np.log(64 * 9), rel=0.05)  # ≈ ln(targets) at init
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["method"] == "cpc" and set(s["eval"]) == {"encoder", "random"}
    assert set(s["health"]) == {"cpc_acc", "latent_std"}
    final = {k: v["final"] for k, v in s["health"].items()}
    _, a = parse_args(mod.CPC, TINY + ["--out", out])
    assert (s["collapsed"], s["verdict"]) == tuple(mod.CPC(a, digits_like()).verdict(final))
    # the export is the patch encoder: a plain timm ViT for one 8x8 patch, loaded strictly
    enc = ckpt.load_exported_encoder(os.path.join(out, "encoder_encoder.safetensors"))
    assert enc.forward_features(torch.randn(2, 1, 8, 8)).shape == (2, 4, 32)


def test_reference_backend_gives_the_same_losses(tmp_path):
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = TINY + ["--steps", "20", "--no-probe", "--eval-every", "0"]  # the first 20 losses (19 steps/epoch)
    mod.run(mod.CPC, args + ["--out", auto])
    mod.run(mod.CPC, args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    assert len(a) == 20
    np.testing.assert_allclose(a, b, rtol=2e-4)


def test_patches_are_encoded_alone():
    """The latent of a patch is the encoder on that crop alone; changing pixels outside a patch
    leaves its latent unchanged (no token attends across patches)."""
    method, a = _method()
    images = torch.randn(3, 1, 16, 16)
    z = method.latents(images)                                                     # (B, D, 3, 3)
    assert z.shape == (3, 32, 3, 3)
    for r, c in [(0, 0), (1, 2), (2, 1)]:
        crop = images[:, :, 4 * r:4 * r + 8, 4 * c:4 * c + 8]
        alone = method.encoder.forward_features(crop).mean(1)                     # plain ViT on 8x8
        torch.testing.assert_close(z[:, :, r, c], alone, atol=1e-5, rtol=1e-5)
    changed = images.clone()
    changed[:, :, 8:, :] += 1.0                                                    # rows 8-15: grid row 0 untouched
    z2 = method.latents(changed)
    torch.testing.assert_close(z2[:, :, 0], z[:, :, 0], atol=1e-6, rtol=1e-6)
    assert (z2[:, :, 2] - z[:, :, 2]).abs().max() > 1e-3


def test_context_looks_only_upward():
    """The context at row r depends on the latents of rows <= r only (and on row r − 1)."""
    method, _ = _method(["--context-blocks", "3"])
    z = torch.randn(2, 32, 5, 5, requires_grad=True)
    for r in range(5):
        (g,) = torch.autograd.grad(method.context(z)[:, :, r].sum(), z)
        assert bool((g[:, :, r + 1:] == 0).all()), r
        assert g[:, :, r].abs().max() > 0
        if r > 0:
            assert g[:, :, r - 1].abs().max() > 0


def test_labels_are_the_pseudo_code_labels():
    """labels = b·col_dim·rows + (i + 1)·rows + col over range(batch·col_dim_i·rows)."""
    B, G = 3, 5
    for k in (1, 2, 4):
        total = B * (G - k) * G
        i = torch.arange(total)
        b, col = i // ((G - k) * G), i % ((G - k) * G)
        torch.testing.assert_close(mod.cpc_labels(B, G, k, "cpu"), b * G * G + k * G + col)
    torch.testing.assert_close(mod.cpc_labels(2, 3, 2, "cpu"), torch.tensor([6, 7, 8, 15, 16, 17]))


def test_step_loss_is_infonce_over_every_target_of_the_batch():
    """One step's loss equals cross-entropy over the explicit (predictions, all targets) logits
    built by hand from the same view (every target of every image a negative), summed over
    the offsets; predictions × 0.1, targets a 1x1 conv of the latents (not the context)."""
    method, a = _method(["--offsets", "1", "2"])
    images = ragged(64)
    loss, metrics = method(images, step_ctx(method, 3, 64))
    assert (method.view[0].scale, method.view[0].degrees) == ((0.5, 1.0), 10.0)   # --crop-scale, --degrees
    view, = step_ctx(method, 3, 64).views(images, method.view)                     # the step's own draw
    assert view.shape == (64, 1, 16, 16)
    z = method.latents(view)
    c = method.context(z)
    targets = method.target(z).permute(0, 2, 3, 1).reshape(-1, a.target_dim)
    want, correct = 0.0, 0
    for k, head in zip((1, 2), method.predict):
        preds = 0.1 * head(c)[:, :, :3 - k].permute(0, 2, 3, 1).reshape(-1, a.target_dim)
        logits = preds @ targets.t()
        labels = mod.cpc_labels(64, 3, k, "cpu")
        want = want + F.cross_entropy(logits, labels)
        correct += int((logits.argmax(1) == labels).sum())
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert float(metrics["cpc_acc"]) == pytest.approx(correct / (64 * 3 * 2 + 64 * 3 * 1))
    assert float(metrics["cpc_chance"]) == pytest.approx(1 / (64 * 9))


def test_paper_preset_is_the_7x7_grid_of_64_pixel_patches():
    """--preset paper: a ViT-S/16 on each 64-px patch of a 7x7 grid at stride 32 (256 px), offset 3,
    the pseudo-code's widths; one step on two images runs and gives ≈ ln(targets) at init."""
    _, a = parse_args(mod.CPC, ["--preset", "paper", "--out", "/tmp/unused"])
    assert (a.dim, a.depth, a.heads, a.patch_size) == (384, 12, 6, 16)
    assert (a.image_size, a.cpc_patch, a.cpc_stride, a.offsets) == (256, 64, 32, [3])
    assert (a.target_dim, a.context_dim, a.context_blocks, a.pred_scale) == (64, 256, 5, 0.1)
    assert (a.epochs, a.batch_size) == (200, 512)
    _, b = parse_args(mod.CPC, ["--preset", "paper", "--out", "/tmp/unused", "--epochs", "3"])
    assert b.epochs == 3                                                             # flags override the preset
    torch.manual_seed(0)
    method = mod.CPC(a, digits_like(channels=3, in_memory=False))
    assert method.grid == 7
    images = ragged(2, size=300, channels=3)
    ctx = step_ctx(method, 0, 2, mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        loss, metrics = method(images, ctx)
    assert float(metrics["cpc_chance"]) == pytest.approx(1 / (2 * 49))
    assert float(loss) == pytest.approx(np.log(2 * 49), rel=0.1)


def test_collapse_and_not_learning_are_detected():
    method, _ = _method()
    assert method.verdict({"cpc_acc": 0.5, "latent_std": 0.001})[0] is True
    assert method.verdict({"cpc_acc": 1e-4, "latent_std": 0.2})[0] is True
    collapsed, text = method.verdict({"cpc_acc": 0.3, "latent_std": 0.2})
    assert collapsed is False and text.startswith("not collapsed")


@pytest.mark.parametrize("args, message", [
    (["--cpc-patch", "6"], "--cpc-patch expected a multiple of --patch-size 4"),
    (["--cpc-stride", "3"], "--cpc-stride 3 expected to tile --image-size 16"),
    (["--offsets", "3"], r"--offsets expected distinct row offsets in [1, 2] (a 3x3 patch grid), got 3"),
    (["--offsets", "1", "1"], "--offsets expected distinct row offsets"),
    (["--target-dim", "0"], "--target-dim expected a positive integer, got 0"),
    (["--pred-scale", "0"], "--pred-scale expected > 0, got 0.0"),
    (["--crop-scale", "0.9", "0.5"], "--crop-scale expected 0 < lo <= hi <= 1, got 0.9 0.5"),
    (["--degrees", "-1"], "--degrees expected >= 0, got -1.0"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        mod.run(mod.CPC, ["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
