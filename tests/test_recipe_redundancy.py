"""The Barlow Twins, VICReg and SwAV recipes end to end on the shared loop (tiny models, a few
steps), and the pieces that make each one the paper's method."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkern.data import open_dataset
from sslkern.train import checkpoint as ckpt
from sslkern.train import parse_args
from sslkern.train.logging import RunLogger

from _redundancy_ref import SwAVLossLoop, barlowtwins_forward, vicreg_forward
from recipe_helpers import load_recipe, source_batch, step_ctx, torchrun_recipe

TINY = ["--dim", "32", "--heads", "2", "--depth", "2", "--hidden-dim", "64", "--batch-size", "256", "--epochs", "2",
        "--eval-every", "1", "--quiet", "--threads", "1"]
EXTRA = {"barlow_twins": ["--out-dim", "640"], "vicreg": ["--out-dim", "320"],
         "swav": ["--feat-dim", "16", "--n-prototypes", "24", "--local-crops", "2"]}
# 1,257 training digits // 256 = 4 steps per epoch
CLASSES = {"barlow_twins": "BarlowTwins", "vicreg": "VICReg", "swav": "SwAV"}
HEALTH = {"barlow_twins": {"embedding_std", "mean_diag", "off_diag_ratio"},
          "vicreg": {"embedding_std", "mean_std", "low_std_frac", "cov_ratio"},
          "swav": {"loss_frac", "code_entropy", "embedding_std"}}


def _cls(name):
    return getattr(load_recipe(name), CLASSES[name])


def _run(name, argv):
    return load_recipe(name).run(_cls(name), argv)


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


def _method(name, argv=(), seed=0):
    cls = _cls(name)
    _, a = parse_args(cls, TINY + EXTRA[name] + ["--out", "/tmp/unused"] + list(argv))
    data = open_dataset(None)
    torch.manual_seed(seed)
    return cls(a, data), a, data


@pytest.mark.parametrize("name", list(CLASSES))
def test_smoke_run_directory(tmp_path, name):
    out = str(tmp_path / name)
    res = _run(name, TINY + EXTRA[name] + ["--out", out, "--steps", "3"])
    assert res["step"] == 3
    for f in ["config.json", "metrics.jsonl", "checkpoint.safetensors", "loss.png", "health.png", "summary.txt",
              "summary.json", "encoder_student.safetensors"]:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    train = _rows(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert np.isfinite(r["loss"]) and 0.05 < r["embedding_std"] <= 1.0 + 1e-6
        assert HEALTH[name] <= set(r)
    if name == "barlow_twins":
        assert all(r["off_diag_ratio"] >= 1.0 and -1 <= r["mean_diag"] <= 1 for r in train)
    if name == "vicreg":
        assert all(0 <= r["low_std_frac"] <= 1 and r["cov_ratio"] >= 1.0 for r in train)
    if name == "swav":
        assert all(0 < r["code_entropy"] <= 1 and r["loss_frac"] > 0 for r in train)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["method"] == name and s["steps"] == 3 and set(s["eval"]) == {"student", "random"}
    assert set(s["health"]) == HEALTH[name]
    if name == "swav":  # 3 steps from random prototypes: the loss is still ≥ ln K, which reads as collapse
        assert "code entropy" in s["verdict"] and s["collapsed"] == (s["health"]["loss_frac"]["final"] >= 0.95)
    else:
        assert s["collapsed"] is False and s["verdict"].startswith("not collapsed")


@pytest.mark.parametrize("name", list(CLASSES))
def test_reference_backend_gives_the_same_losses(tmp_path, name):
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = TINY + EXTRA[name] + ["--epochs", "3", "--steps", "5", "--no-probe", "--eval-every", "0"]
    _run(name, args + ["--out", auto])
    _run(name, args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    assert len(a) == 5
    np.testing.assert_allclose(a, b, rtol=2e-4)  # fused vs eager ops: fp32 sums in another order


def _ctx(method, data, seed=1):
    return step_ctx(method, seed, 64, step=10, epoch=1, total_steps=100, steps_per_epoch=10, mean=data.mean,
                    std=data.std)


def _one_forward(method, data):
    """One step on the first 64 training digits, and the views it drew (the same draws again)."""
    images = source_batch(data.train, 64)
    out = method(images, _ctx(method, data))
    return out, _ctx(method, data).views(images, method.views)


def test_barlow_twins_loss_is_the_official_one():
    """The recipe's loss on its own projections = barlowtwins BarlowTwins.forward (λ = 0.0051)."""
    method, a, data = _method("barlow_twins")
    (loss, health), views = _one_forward(method, data)
    z_a, z_b = method.encoder(views).chunk(2)
    torch.testing.assert_close(loss, barlowtwins_forward(z_a, z_b, a.lambd, 64), atol=1e-4, rtol=1e-5)
    assert a.lambd == 0.0051
    assert set(method.encoder.head[-1].state_dict()) == {"weight"}  # the last projector layer has no bias


def test_vicreg_loss_is_the_official_one():
    method, a, data = _method("vicreg")
    (loss, _), views = _one_forward(method, data)
    z_a, z_b = method.encoder(views).chunk(2)
    torch.testing.assert_close(loss, vicreg_forward(z_a, z_b, 64, 320), atol=1e-4, rtol=1e-5)


def test_swav_step_is_the_official_one():
    """Prototypes normalised in place before the forward, codes and loss as swav's train loop."""
    method, a, data = _method("swav")
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    (loss, health), crops = _one_forward(method, data)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(a.n_prototypes))
    assert [c.shape[-1] for c in crops] == [16, 16] + [a.local_size] * a.local_crops
    z = F.normalize(method.encoder(crops), dim=1)
    w = method.prototypes.weight
    want = SwAVLossLoop((2, a.local_crops), epsilon=a.epsilon, temperature=a.temperature).step(z, z @ w.t(), w, 64)
    torch.testing.assert_close(loss, want, atol=2e-5, rtol=2e-5)
    assert 0 < health["code_entropy"] < 1


def test_swav_prototypes_frozen_in_the_first_epoch(tmp_path):
    """Three steps of epoch 0: the prototypes keep their (normalised) initial rows — their
    gradient is dropped — while the rest of the model trains."""
    out = str(tmp_path / "run")
    _run("swav", TINY + EXTRA["swav"] + ["--out", out, "--steps", "3", "--no-probe", "--eval-every", "0"])
    method, _, _ = _method("swav")
    t, _ = ckpt.load_tensors(os.path.join(out, "checkpoint.safetensors"))
    torch.testing.assert_close(t["method/prototypes.weight"], F.normalize(method.prototypes.weight, dim=1))
    k = "encoder.head.0.weight"
    assert not torch.equal(t[f"method/{k}"], method.state_dict()[k])


def test_swav_queue_is_read_once_full(tmp_path):
    """--queue-length 512 from epoch 0, 256 images per step: empty at step 1, full after step 2."""
    out = str(tmp_path / "run")
    _run("swav", TINY + EXTRA["swav"] + ["--out", out, "--steps", "3", "--no-probe", "--eval-every", "0",
                                         "--queue-length", "512", "--epoch-queue-starts", "0"])
    assert [r["queue"] for r in _rows(out)] == [0.0, 1.0, 1.0]
    t, _ = ckpt.load_tensors(os.path.join(out, "checkpoint.safetensors"))
    assert t["method/loss.queue"].shape == (2, 512, 16) and int(t["method/loss.queue_rows"]) == 512


def test_verdicts():
    from sslkern.train.joint import redundancy_verdict

    swav = load_recipe("swav")
    assert swav.swav_verdict({"loss_frac": 0.99, "code_entropy": 0.5, "embedding_std": 0.8})[0] is True
    assert swav.swav_verdict({"loss_frac": 0.6, "code_entropy": 0.99, "embedding_std": 0.8})[0] is True
    assert swav.swav_verdict({"loss_frac": 0.6, "code_entropy": 0.5, "embedding_std": 0.05})[0] is True
    ok = swav.swav_verdict({"loss_frac": 0.6, "code_entropy": 0.5, "embedding_std": 0.8})
    assert ok == (False, "not collapsed (loss 0.60·ln K, code entropy 0.50·ln K, embedding std 0.800)")
    collapsed, line = redundancy_verdict({"embedding_std": 0.05, "mean_diag": 0.9, "off_diag_ratio": 3.0})
    assert collapsed and "off-diagonal sum 3.00x its rank floor" in line


@pytest.mark.slow
@pytest.mark.parametrize("name", ["barlow_twins", "swav"])
def test_two_processes_equal_one(tmp_path, name):
    """Global statistics / C (Barlow Twins) and per-crop codes over the global batch (SwAV): the same steps."""
    out, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    args = TINY + EXTRA[name] + ["--steps", "3", "--no-probe", "--eval-every", "0"]
    torchrun_recipe(name, args, out)
    _run(name, args + ["--out", single])
    two, one = _rows(out), _rows(single)
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)


PAPER = {
    "barlow_twins": dict(epochs=1000, batch_size=2048, lambd=0.0051, hidden_dim=8192, out_dim=8192, warmup_epochs=10),
    "vicreg": dict(epochs=1000, batch_size=2048, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, hidden_dim=8192,
                   out_dim=8192, warmup_epochs=10),
    "swav": dict(epochs=800, batch_size=4096, local_crops=6, local_size=96, global_scale=(0.14, 1.0),
                 local_scale=(0.05, 0.14), epsilon=0.05, temperature=0.1, n_prototypes=3000, feat_dim=128,
                 hidden_dim=2048, queue_length=0, freeze_prototypes_epochs=1, warmup_epochs=10),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_paper_preset(name):
    """--preset paper: ViT-S/16 at 224 with the paper's settings; flags given with it still win."""
    from sslkern.train import views
    from recipe_helpers import digits_like

    cls = _cls(name)
    options = set(vars(parse_args(cls, ["--out", "/tmp/unused"])[1]))
    for preset in cls.presets.values():  # every key a command-line option (set_defaults takes any name)
        assert {k for k in preset if not k.startswith("_")} <= options
    _, a = parse_args(cls, ["--preset", "paper", "--out", "/tmp/unused"])
    assert (a.model, a.image_size, a.patch_size, a.dim, a.depth, a.heads) == ("vit_small_patch16_224", 224, 16, 384,
                                                                                12, 6)
    for k, v in PAPER[name].items():
        assert getattr(a, k) == v, k
    assert a.lr == pytest.approx(5e-4 * a.batch_size / 256) and a.min_lr == pytest.approx(a.lr * 1e-3)
    assert a.degrees == 0 and a.pool == "mean"
    assert parse_args(cls, ["--preset", "paper", "--epochs", "3", "--out", "/tmp/unused"])[1].epochs == 3
    rgb = digits_like(3, in_memory=False)  # an ImageNet-like source: integer crop boxes, colour
    if name == "swav":
        specs = views.swav_multicrop(a, rgb)
        assert [s.size for s in specs] == [224] * 2 + [96] * 6
        assert [s.scale for s in specs] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
        for s in specs:  # swav get_color_distortion(s=1) + RandomGaussianBlur, no solarization
            assert (s.jitter_p, s.brightness, s.contrast, s.saturation, s.hue, s.gray_p) == (0.8, 0.8, 0.8, 0.8, 0.2,
                                                                                              0.2)
            assert (s.blur_p, s.solarize_p, s.flip_p, s.integer_boxes, s.degrees) == (0.5, 0.0, 0.5, True, 0.0)
        _, b = parse_args(cls, ["--preset", "paper_bs256", "--out", "/tmp/unused"])
        assert (b.epochs, b.batch_size, b.queue_length, b.epoch_queue_starts, b.warmup_epochs) == (400, 256, 3840, 15, 0)
    else:  # the paper's Transform / Transform_prime
        specs = views.two_views(a, rgb)
        assert [s.size for s in specs] == [224, 224] and all(s.scale == (0.08, 1.0) for s in specs)
        assert [(s.blur_p, s.solarize_p) for s in specs] == [(1.0, 0.0), (0.1, 0.2)]
        assert all((s.jitter_p, s.brightness, s.contrast, s.saturation, s.hue, s.gray_p, s.flip_p) ==
                   (0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.5) for s in specs)


@pytest.mark.parametrize("name, args, message", [
    ("barlow_twins", ["--lambd", "-1"], "--lambd expected >= 0, got -1.0"),
    ("barlow_twins", ["--out-dim", "0"], "--out-dim expected a positive integer, got 0"),
    ("vicreg", ["--std-coeff", "-2"], "--std-coeff expected >= 0, got -2.0"),
    ("swav", ["--epsilon", "0"], "--epsilon expected > 0, got 0.0"),
    ("swav", ["--queue-length", "100"], "--queue-length expected a multiple of --batch-size 128"),
    ("swav", ["--local-scale", "0.5", "0.1"], "--local-scale expected 0 < lo <= hi <= 1, got 0.5 0.1"),
    ("swav", ["--fsdp"], "--fsdp is not supported by swav"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, name, args, message):
    with pytest.raises(SystemExit) as e:
        _run(name, ["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
