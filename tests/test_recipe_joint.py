"""The joint-embedding recipes (BYOL, SimSiam, MoCo v3, SimCLR) end to end on the shared loop
(tiny models, a few steps), and the pieces that make each one the paper's method."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkern.train import checkpoint as ckpt
from sslkern.train import parse_args
from sslkern.data import open_dataset
from sslkern.train.logging import RunLogger

from recipe_helpers import source_batch, step_ctx, torchrun_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dim", "32", "--heads", "2", "--depth", "2", "--hidden-dim", "64", "--out-dim", "32", "--batch-size", "256",
        "--epochs", "2", "--eval-every", "1", "--quiet", "--threads", "1"]
# 1,257 training digits // 256 = 4 steps per epoch, 8 steps in 2 epochs.
CLASSES = {"byol": "BYOL", "simsiam": "SimSiam", "moco": "MoCoV3", "simclr": "SimCLR"}
WITH_TEACHER = {"byol", "moco"}


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cls(name):
    return getattr(_recipe(name), CLASSES[name])


def _run(name, argv):
    return _recipe(name).run(_cls(name), argv)


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


def _method(name, argv=(), seed=0):
    cls = _cls(name)
    _, a = parse_args(cls, TINY + ["--out", "/tmp/unused"] + list(argv))
    data = open_dataset(None)
    torch.manual_seed(seed)
    return cls(a, data), a, data


@pytest.mark.parametrize("name", list(CLASSES))
def test_smoke_run_directory(tmp_path, name):
    out = str(tmp_path / name)
    res = _run(name, TINY + ["--out", out, "--steps", "3"])
    assert res["step"] == 3
    encs = {"teacher", "student"} if name in WITH_TEACHER else {"student"}
    for f in ["config.json", "metrics.jsonl", "checkpoint.safetensors", "loss.png", "health.png", "summary.txt",
              "summary.json"] + [f"encoder_{e}.safetensors" for e in encs]:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    train = _rows(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert np.isfinite(r["loss"])
        assert 0.05 < r["embedding_std"] <= 1.0 + 1e-6  # √D · mean per-dimension std of unit vectors ≤ 1
        if name in WITH_TEACHER:  # cosine from τ0 (BYOL 0.98, MoCo v3 0.99 here) toward 1
            assert (0.98 if name == "byol" else 0.99) <= r["momentum"] < 1
    if name == "simsiam":
        assert all(-1 - 1e-6 <= r["loss"] <= 1 + 1e-6 for r in train)  # mean of −cos
    if name == "byol":
        assert all(0 <= r["loss"] <= 8 + 1e-5 for r in train)  # two terms of 2 − 2·cos
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["method"] == name and s["steps"] == 3 and s["dataset"] == "digits"
    assert set(s["eval"]) == encs | {"random"} and all("probe" in v for v in s["eval"].values())
    assert set(s["health"]) == {"embedding_std"} and s["health"]["embedding_std"]["bad"] == "low"
    assert s["collapsed"] is False and s["verdict"].startswith("not collapsed (embedding std")
    model = ckpt.load_exported_encoder(os.path.join(out, "encoder_student.safetensors"))
    assert model.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, 17, 32)


@pytest.mark.parametrize("name", list(CLASSES))
def test_reference_backend_gives_the_same_losses(tmp_path, name):
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = TINY + ["--epochs", "5", "--steps", "20", "--no-probe", "--eval-every", "0"]  # the first 20 losses
    _run(name, args + ["--out", auto])
    _run(name, args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    assert len(a) == 20
    np.testing.assert_allclose(a, b, rtol=1e-3)  # fused vs eager ops (views too): fp32 sums in another order, grown over 20 steps


@pytest.mark.parametrize("name", ["byol", "moco"])
def test_target_is_the_ema_of_the_online_network(tmp_path, name):
    """One step: target = m·θ0 + (1 − m)·θ1 for trained parameters; MoCo's patch projection
    stays at its random init in both networks."""
    out = str(tmp_path / "run")
    _run(name, TINY + ["--out", out, "--steps", "1", "--no-probe", "--eval-every", "0"])
    m = _rows(out)[0]["momentum"]
    method, _, _ = _method(name)
    init = method.state_dict()
    t, _ = ckpt.load_tensors(os.path.join(out, "checkpoint.safetensors"))
    online, target = ("online", "target") if name == "byol" else ("base", "momentum")
    checked = 0
    for k, p in method.named_parameters():
        if not k.startswith(online + ".") or not p.requires_grad:
            continue
        tk = f"method/{target}.module.{k[len(online) + 1:]}"
        expect = m * init[k] + (1 - m) * t[f"method/{k}"]
        torch.testing.assert_close(t[tk], expect, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked > 20
    if name == "moco":
        w = "backbone.patch_embed.proj.weight"
        assert not dict(method.named_parameters())[f"base.{w}"].requires_grad
        assert torch.equal(t[f"method/base.{w}"], init[f"base.{w}"])
        assert torch.equal(t[f"method/momentum.module.{w}"], init[f"base.{w}"])
        assert not torch.equal(t["method/base.backbone.blocks.0.mlp.fc1.weight"], init["base.backbone.blocks.0.mlp.fc1.weight"])


def _one_forward(method, a, data, step=10):
    ctx = step_ctx(method, 1, 64, step=step, epoch=1, total_steps=100, steps_per_epoch=10, mean=data.mean,
                   std=data.std)
    return method(source_batch(data.train, 64), ctx)


def test_simsiam_targets_are_stop_gradient():
    """The encoder's gradient flows through the predictor branch only: equal to the loss with
    detached targets, different from the loss without the stop-gradient."""
    mod = _recipe("simsiam")
    method, a, data = _method("simsiam")
    loss, _ = _one_forward(method, a, data)
    loss.backward()
    g = method.encoder.backbone.blocks[0].attn.qkv.weight.grad.clone()
    method.zero_grad()
    views = step_ctx(method, 1, 64, mean=data.mean, std=data.std).views(source_batch(data.train, 64), method.views)
    z = method.encoder(views)
    p1, p2 = method.predictor(z).chunk(2)
    z1, z2 = z.chunk(2)
    no_sg = -0.5 * (F.cosine_similarity(p1, z2, dim=-1).mean() + F.cosine_similarity(p2, z1, dim=-1).mean())
    torch.testing.assert_close(no_sg.detach(), loss.detach())
    no_sg.backward()
    g_no_sg = method.encoder.backbone.blocks[0].attn.qkv.weight.grad
    assert (g - g_no_sg).abs().max() > 1e-3 * g.abs().max()
    assert mod.negative_cosine(p1, z2).requires_grad and mod.negative_cosine(p1.detach(), z2).requires_grad is False


def test_moco_loss_is_moco_v3_contrastive_loss():
    """moco-v3 builder.py: ctr(q, k) = CE(normalize(q)·normalize(k)ᵀ/τ, arange) · 2τ."""
    method, a, _ = _method("moco")
    q, k = torch.randn(40, 32, dtype=torch.float64), torch.randn(40, 32, dtype=torch.float64)
    tau = a.temperature
    expect = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau, torch.arange(40)) * 2 * tau
    torch.testing.assert_close(method.loss(q, k), expect)
    assert tau == 0.2


def test_simclr_loss_is_lightly_nt_xent():
    from lightly.loss import NTXentLoss

    method, a, _ = _method("simclr")
    z1, z2 = torch.randn(40, 32, dtype=torch.float64), torch.randn(40, 32, dtype=torch.float64)
    torch.testing.assert_close(method.loss(z1, z2), NTXentLoss(temperature=a.temperature)(z1, z2))


def test_collapse_is_detected():
    """Embeddings that all point one way read ≈ 0 and the verdict says collapsed."""
    from sslkern.train.health import embedding_std
    from sslkern.train.joint import joint_verdict

    z = torch.randn(1, 64) + 1e-3 * torch.randn(256, 64)
    s = embedding_std(z)
    assert s < 0.01 and 0.9 < embedding_std(torch.randn(256, 64)) <= 1.0
    assert joint_verdict({"embedding_std": s})[0] is True
    assert joint_verdict({"embedding_std": 0.8}) == (False, "not collapsed (embedding std 0.800 ≥ 0.1)")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moco", "simclr"])
def test_two_processes_equal_one(tmp_path, name):
    """Keys (MoCo) / negatives (SimCLR) of every rank and global BatchNorm: the same step."""
    out, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    args = TINY + ["--steps", "3", "--no-probe", "--eval-every", "0"]
    torchrun_recipe(name, args, out)
    _run(name, args + ["--out", single])
    two, one = _rows(out), _rows(single)
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    # the health figure is each rank's std over its half batch, averaged: close, not equal
    np.testing.assert_allclose([r["embedding_std"] for r in two], [r["embedding_std"] for r in one], rtol=1e-2)


@pytest.mark.parametrize("name", ["moco", "simclr"])
def test_rince_option_logs_infonce_beside_it(tmp_path, name):
    """--loss rince: the step's loss is RINCE and the InfoNCE (NT-Xent) value of the same
    embeddings is logged as ``infonce``; they differ."""
    out = str(tmp_path / name)
    _run(name, TINY + ["--out", out, "--steps", "2", "--no-probe", "--eval-every", "0", "--loss", "rince"])
    for r in _rows(out):
        assert np.isfinite(r["loss"]) and np.isfinite(r["infonce"])
        assert abs(r["loss"] - r["infonce"]) > 1e-3
    plain = str(tmp_path / "plain")
    _run(name, TINY + ["--out", plain, "--steps", "1", "--no-probe", "--eval-every", "0"])
    first = _rows(plain)[0]
    assert "infonce" not in first
    assert first["loss"] == pytest.approx(_rows(out)[0]["infonce"], rel=1e-5)  # same first step, InfoNCE


def test_moco_rince_loss_is_chingyaoc_contrastive_loss():
    """--loss rince: the MoCo criterion is chingyaoc/RINCE moco-v3 contrastive_loss (q 0.6, λ 0.01, × 2τ)."""
    from test_info_nce_loss import rince_moco_v3_contrastive_loss

    method, a, _ = _method("moco", ["--loss", "rince"])
    assert (a.rince_q, a.rince_lam) == (0.6, 0.01)
    q, k = torch.randn(40, 32, dtype=torch.float64), torch.randn(40, 32, dtype=torch.float64)
    torch.testing.assert_close(method.loss(q, k), rince_moco_v3_contrastive_loss(q, k, a.temperature, 0.01, 0.6))


def test_simclr_rince_loss_is_chingyaoc_sym_loss():
    from test_info_nce_loss import rince_simclr_sym_loss

    method, a, _ = _method("simclr", ["--loss", "rince"])
    assert (a.rince_q, a.rince_lam) == (0.1, 0.01)
    z1, z2 = torch.randn(40, 32, dtype=torch.float64), torch.randn(40, 32, dtype=torch.float64)
    want = rince_simclr_sym_loss(F.normalize(z1, dim=1), F.normalize(z2, dim=1), 0.01, 0.1, a.temperature)
    torch.testing.assert_close(method.loss(z1, z2), want)


@pytest.mark.parametrize("name, args, message", [
    ("byol", ["--hidden-dim", "0"], "--hidden-dim expected a positive integer, got 0"),
    ("byol", ["--momentum-target", "1.5"], "--momentum-target expected in [0, 1], got 1.5"),
    ("byol", ["--crop-scale", "0.8", "0.2"], "--crop-scale expected 0 < lo <= hi <= 1, got 0.8 0.2"),
    ("simsiam", ["--pred-dim", "-4"], "--pred-dim expected a positive integer, got -4"),
    ("simsiam", ["--flip-p", "2"], "--flip-p expected in [0, 1], got 2.0"),
    ("moco", ["--temperature", "0"], "--temperature expected > 0, got 0.0"),
    ("moco", ["--momentum-encoder", "-0.1"], "--momentum-encoder expected in [0, 1], got -0.1"),
    ("moco", ["--pool", "max"], "invalid choice: 'max'"),
    ("simclr", ["--temperature", "-1"], "--temperature expected > 0, got -1.0"),
    ("simclr", ["--degrees", "-5"], "--degrees expected >= 0, got -5.0"),
    ("simclr", ["--batch-size", "5000"], "larger than the training set"),
    ("moco", ["--loss", "rince", "--rince-lam", "0"], "--rince-lam expected > 0, got 0.0"),
    ("simclr", ["--loss", "rince", "--rince-q", "-1"], "--rince-q expected >= 0, got -1.0"),
    ("simclr", ["--loss", "nce"], "invalid choice: 'nce'"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, name, args, message):
    with pytest.raises(SystemExit) as e:
        _run(name, ["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
