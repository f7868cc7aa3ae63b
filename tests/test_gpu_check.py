"""``python -m sslkern.gpu_check --dry``: the lent-GPU validation command runs on CPU (Triton
interpreter, small sizes) so it cannot rot, and opchecks every custom op; on a GPU it runs at
GPU sizes (not here)."""
import json
import subprocess
import sys

import pytest
import torch

from sslkern import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")
def test_dry_run_writes_report_and_passes(tmp_path):
    report = gpu_check.run(str(tmp_path), dry=True, budget_s=600)
    names = [r["name"] for r in report["results"]]
    assert names == [n for n, _ in gpu_check.CHECKS]
    bad = {r["name"]: r.get("message") for r in report["results"] if r["status"] not in ("pass", "skip")}
    assert not bad, bad
    status = {r["name"]: r["status"] for r in report["results"]}
    # what must really run on CPU, and what needs a GPU
    for name in ("dino_large_k", "fp16_loss_scale", "large_tokens", "large_targets_and_loss", "large_ema",
                 "alibi_grid_and_strides", "determinism", "opcheck", "train_recipes"):
        assert status[name] == "pass", name
    for name in ("device_placement", "cuda_graph_capture", "compute_sanitizer", "test_suite", "bench"):
        assert status[name] == "skip", name
    # --dry opchecks every registered custom op (on the triton backend, in the interpreter)
    opcheck = next(r for r in report["results"] if r["name"] == "opcheck")["details"]
    every = gpu_check.custom_op_names()
    assert len(every) >= 18 and all(opcheck[f"{op} triton"] == "ok" for op in every), opcheck
    # the training stage ran every recipe with both backends and measured each run
    from sslkern.train.presets import recipe_methods

    trained = next(r for r in report["results"] if r["name"] == "train_recipes")["details"]
    for _, cls in recipe_methods():
        for backend in ("auto", "reference"):
            run = trained[cls.name][backend]
            assert run["img_per_s"] > 0 and 0 <= run["data_wait_frac"] <= 1 and run["peak_mem_mb"] > 0, (cls.name, run)
    assert "--precision bf16" in trained["settings"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["mode"].startswith("dry") and len(saved["results"]) == len(names)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| dino_large_k | pass |" in md and "| opcheck | pass |" in md


def test_a_custom_op_without_a_case_fails_the_opcheck(monkeypatch):
    real = gpu_check.custom_op_names
    monkeypatch.setattr(gpu_check, "custom_op_names", lambda: real() + ["made_up_op"])
    monkeypatch.setattr(gpu_check, "OP_CASES", gpu_check.OP_CASES[:1])  # ema_update_ only: fast
    ctx = gpu_check.Ctx(dry=True, deadline=float("inf"))
    out = gpu_check._opcheck(ctx)
    assert any("made_up_op" in f for f in out["failures"]) and out["details"]["ema_update_ triton"] == "ok"


def test_failures_are_reported_and_set_the_exit_status(tmp_path, monkeypatch):
    def failing(ctx):
        return {"failures": ["made to fail"]}

    def crashing(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "CHECKS", [("environment", gpu_check._env), ("f", failing), ("c", crashing)])
    rc = gpu_check.main([str(tmp_path), "--dry"])
    assert rc == 1
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["status"] for r in rep["results"]] == ["pass", "fail", "error"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| f | fail |" in md and "made to fail" in md and "RuntimeError: boom" in md


def test_refuses_real_mode_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, "-m", "sslkern.gpu_check", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "use --dry" in r.stderr
