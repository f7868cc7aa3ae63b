"""The Barlow Twins, VICReg and SwAV recipes end to end on the shared loop (tiny models, a few
steps), and the pieces that make each one the paper's method."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkern.train import checkpoint as ckpt
from sslkern.train import parse_args
from sslkern.train.data import load_dataset
from sslkern.train.logging import RunLogger
from sslkern.train.loop import StepContext

from _redundancy_ref import SwAVLossLoop, barlowtwins_forward, vicreg_forward
from recipe_helpers import ROOT, load_recipe

TINY = ["--dim", "32", "--heads", "2", "--depth", "2", "--hidden-dim", "64", "--batch-size", "256", "--epochs", "2",
        "--eval-every", "1", "--quiet", "--threads", "1"]
EXTRA = {"barlow_twins": ["--out-dim", "320"], "vicreg": ["--out-dim", "320"],
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
    data = load_dataset(None, 16)
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


def _one_forward(method, a, data, step=10, epoch=1):
    gen = torch.Generator().manual_seed(1)
    ctx = StepContext(step, epoch, 100, 10, gen, lr=a.lr, weight_decay=a.weight_decay)
    ctx.values = method.schedule(ctx)
    return method(data.train_images[:64], ctx), ctx


def test_barlow_twins_loss_is_the_official_one():
    """The recipe's loss on its own projections = barlowtwins BarlowTwins.forward (λ = 0.0051)."""
    method, a, data = _method("barlow_twins")
    (loss, health), ctx = _one_forward(method, a, data)
    ctx.generator.manual_seed(1)  # the views of the forward again
    z_a, z_b = method.encoder(method.views(data.train_images[:64], ctx)).chunk(2)
    torch.testing.assert_close(loss, barlowtwins_forward(z_a, z_b, a.lambd, 64), atol=1e-4, rtol=1e-5)
    assert a.lambd == 0.0051
    assert set(method.encoder.head[-1].state_dict()) == {"weight"}  # the last projector layer has no bias


def test_vicreg_loss_is_the_official_one():
    method, a, data = _method("vicreg")
    (loss, _), ctx = _one_forward(method, a, data)
    ctx.generator.manual_seed(1)  # the views of the forward again
    z_a, z_b = method.encoder(method.views(data.train_images[:64], ctx)).chunk(2)
    torch.testing.assert_close(loss, vicreg_forward(z_a, z_b, 64, 320), atol=1e-4, rtol=1e-5)


def test_swav_step_is_the_official_one():
    """Prototypes normalised in place before the forward, codes and loss as swav's train loop."""
    method, a, data = _method("swav")
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    (loss, health), ctx = _one_forward(method, a, data)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(a.n_prototypes))
    gen = torch.Generator().manual_seed(1)
    ctx2 = StepContext(10, 1, 100, 10, gen, lr=a.lr, weight_decay=a.weight_decay)
    z = F.normalize(method.encoder(method.views(data.train_images[:64], ctx2)), dim=1)
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(ROOT, "recipes", f"{name}.py"), *args, "--out", out]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _run(name, args + ["--out", single])
    two, one = _rows(out), _rows(single)
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)


@pytest.mark.parametrize("name, args, message", [
    ("barlow_twins", ["--lambd", "-1"], "--lambd expected >= 0, got -1.0"),
    ("barlow_twins", ["--out-dim", "0"], "--out-dim expected a positive integer, got 0"),
    ("vicreg", ["--std-coeff", "-2"], "--std-coeff expected >= 0, got -2.0"),
    ("swav", ["--epsilon", "0"], "--epsilon expected > 0, got 0.0"),
    ("swav", ["--queue-length", "100"], "--queue-length expected a multiple of --batch-size 128"),
    ("swav", ["--local-scale", "0.5", "0.1"], "--local-scale expected 0 < lo <= hi <= 1, got 0.5 0.1"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, name, args, message):
    with pytest.raises(SystemExit) as e:
        _run(name, ["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
