"""The DINO and iBOT recipes end to end (tiny models, a few steps) on the shared loop."""
import json
import os

import numpy as np
import pytest
import torch

from sslkern.train import checkpoint as ckpt
from sslkern.train.logging import RunLogger

from recipe_helpers import deterministic_rows, final_state, kill_at_first_checkpoint, load_recipe, torchrun_recipe

TINY = ["--dim", "32", "--heads", "2", "--depth", "2", "--out-dim", "256", "--hidden-dim", "64", "--bottleneck-dim", "32",
        "--local-crops", "2", "--batch-size", "256", "--epochs", "2", "--eval-every", "1", "--quiet", "--threads", "1"]
# 1,257 training digits // 256 = 4 steps per epoch, 8 steps in 2 epochs.


_recipe = load_recipe


def _run(name, argv):
    mod = _recipe(name)
    return mod.run(mod.DINO if name == "dino" else mod.IBOT, argv)


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


_deterministic_rows, _state = deterministic_rows, final_state


@pytest.mark.parametrize("name", ["dino", "ibot"])
def test_smoke_run_directory(tmp_path, name):
    out = str(tmp_path / name)
    res = _run(name, TINY + ["--out", out, "--steps", "3"])
    assert res["step"] == 3
    for f in ("config.json", "metrics.jsonl", "checkpoint.safetensors", "encoder_teacher.safetensors",
              "encoder_student.safetensors", "loss.png", "eval.png", "health.png", "summary.txt", "summary.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    train = _rows(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert np.isfinite(r["loss"]) and r["loss"] > 0
        assert 0 < r["teacher_entropy_frac"] <= 1 + 1e-6 and 0 < r["batch_entropy_frac"] <= 1 + 1e-6
        assert 0.99 <= r["momentum"] < 1 and 0.02 <= r["teacher_temp"] <= 0.03
    if name == "ibot":
        assert all(0 < r["masked_share"] < 0.5 and r["ibot_loss"] > 0 and "patch_kl" in r for r in train)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["method"] == name and s["steps"] == 3 and s["dataset"] == "digits" and s["world_size"] == 1
    assert set(s["eval"]) == {"teacher", "student", "random"} and all("probe" in v for v in s["eval"].values())
    assert s["knn_gain"] == pytest.approx(max(s["eval"]["teacher"]["knn"], s["eval"]["student"]["knn"])
                                          - s["eval"]["random"]["knn"], abs=0.01)
    assert {"teacher_entropy_frac", "batch_entropy_frac", "kl"} <= set(s["health"])
    assert isinstance(s["collapsed"], bool) and "teacher" in s["verdict"]
    # the exported backbone is a plain timm ViT that encodes both crop sizes
    model = ckpt.load_exported_encoder(os.path.join(out, "encoder_teacher.safetensors"))
    assert model.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, 17, 32)
    assert model.forward_features(torch.randn(2, 1, 8, 8)).shape == (2, 5, 32)


def test_dino_first_epoch_freezes_last_layer_and_center_moves(tmp_path):
    out = str(tmp_path / "run")
    _run("dino", TINY + ["--out", out, "--steps", "2", "--no-probe", "--eval-every", "0"])
    from sslkern.train import parse_args
    from sslkern.data import open_dataset

    mod = _recipe("dino")
    _, a = parse_args(mod.DINO, TINY + ["--out", out])

    torch.manual_seed(a.seed)
    init = mod.DINO(a, open_dataset(None)).state_dict()
    tensors, _ = ckpt.load_tensors(os.path.join(out, "checkpoint.safetensors"))
    assert torch.equal(tensors["method/student.head.last_layer.weight_v"], init["student.head.last_layer.weight_v"])
    assert not torch.equal(tensors["method/student.head.mlp.0.weight"], init["student.head.mlp.0.weight"])
    assert tensors["method/loss.center"].abs().sum() > 0  # the center buffer is trained state (checkpointed)


def test_ibot_sinkhorn_teacher_runs(tmp_path):
    out = str(tmp_path / "run")
    res = _run("ibot", TINY + ["--out", out, "--steps", "2", "--no-probe", "--teacher", "sinkhorn"])
    assert all(np.isfinite(r["loss"]) for r in _rows(out))
    assert 0 <= res["teacher"]["knn"] <= 100


@pytest.mark.parametrize("name", ["dino", "ibot"])
def test_reference_backend_gives_the_same_losses(tmp_path, name):
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = TINY + ["--steps", "6", "--no-probe", "--eval-every", "0"]
    _run(name, args + ["--out", auto])
    _run(name, args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    np.testing.assert_allclose(a, b, rtol=1e-3)  # fused vs eager ops (views too): fp32 sums in another order, grown over 20 steps


@pytest.mark.slow
def test_dino_resume_after_sigkill_matches_uninterrupted(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = TINY + ["--no-probe"]
    _run("dino", args + ["--out", full])
    step = kill_at_first_checkpoint("dino", args, part)
    assert step is not None and step < 8
    _run("dino", args + ["--out", part, "--resume"])
    (a, sa), (b, sb) = _state(full), _state(part)
    assert sa == sb == 8 and a.keys() == b.keys()
    for k in a:  # bitwise: weights, teacher, center, BatchNorm statistics, optimizer state
        assert torch.equal(a[k], b[k]), k
    assert _deterministic_rows(full) == _deterministic_rows(part)


@pytest.mark.slow
def test_dino_two_processes_equal_one(tmp_path):
    out, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    args = TINY + ["--steps", "3", "--no-probe"]
    torchrun_recipe("dino", args, out)
    _run("dino", args + ["--out", single])
    two, one = _rows(out), _rows(single)
    assert [r["step"] for r in two] == [1, 2, 3]
    # same global batch, views, head BatchNorm statistics (global) and center: same losses
    for key in ("loss", "teacher_entropy_frac", "batch_entropy_frac"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-4, err_msg=key)
    assert json.load(open(os.path.join(out, "summary.json")))["world_size"] == 2
    assert _rows(out, "final")[-1]["teacher_replica_max_diff"] == 0.0
    (a, _), (b, _) = _state(single), _state(out)
    for k in a:  # BatchNorm running statistics: per-rank sums vs one batch, up to ~4e-5 apart
        if k.startswith("method/teacher.") or k.endswith("center"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4 if "running_" in k else 1e-5, msg=k)


@pytest.mark.parametrize("name, args, message", [
    ("dino", ["--out-dim", "0"], "--out-dim expected a positive integer, got 0"),
    ("dino", ["--teacher-temp", "0"], "--teacher-temp expected > 0, got 0.0"),
    ("dino", ["--local-scale", "0.5", "0.2"], "--local-scale expected 0 < lo <= hi <= 1, got 0.5 0.2"),
    ("dino", ["--local-size", "6"], "--local-size 6 expected a multiple of --patch-size 4"),
    ("dino", ["--teacher", "uniform"], "invalid choice: 'uniform'"),
    ("dino", ["--clip-mode", "layer"], "invalid choice: 'layer'"),
    ("dino", ["--lr", "-1"], "--lr expected > 0, got -1.0"),
    ("ibot", ["--mask-probability", "0"], "--mask-probability expected in (0, 1], got 0.0"),
    ("ibot", ["--mask-ratio", "0.6", "0.2"], "--mask-ratio expected 0 <= lo <= hi < 1, got 0.6 0.2"),
    ("ibot", ["--batch-size", "5000"], "larger than the training set"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, name, args, message):
    with pytest.raises(SystemExit) as e:
        _run(name, ["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, steps", [("dino", 20), ("ibot", 8)])
def test_fused_head_reproduces_unfused_losses(tmp_path, name, steps):
    """The default fused prototype loss (sslkern.prototype_loss: no (rows, K) logits) against
    --unfused-head (head logits → dino_loss / ibot_patch_loss): the first losses agree to
    fp32 rounding (the logits are summed in other orders, and training feeds that back)."""
    fused, unfused = str(tmp_path / "fused"), str(tmp_path / "unfused")
    args = TINY + ["--epochs", "5", "--steps", str(steps), "--no-probe", "--eval-every", "0"]
    _run(name, args + ["--out", fused])
    _run(name, args + ["--out", unfused, "--unfused-head"])
    a, b = [r["loss"] for r in _rows(fused)], [r["loss"] for r in _rows(unfused)]
    assert len(a) == len(b) == steps
    np.testing.assert_allclose(a, b, rtol=1e-5)
