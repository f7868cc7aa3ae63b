"""``python -m sslkern.gpu_check --dry``: the lent-GPU validation command runs on CPU (Triton
interpreter, small sizes) so it cannot rot; on a GPU it runs at GPU sizes (not here)."""
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
    for name in ("dino_large_k", "fp16_grad_scaler", "large_tokens", "large_targets_and_loss", "large_ema",
                 "alibi_grid_and_strides", "determinism", "opcheck", "bench"):
        assert status[name] == "pass", name
    for name in ("device_placement", "cuda_graph_capture", "compute_sanitizer"):
        assert status[name] == "skip", name
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["mode"].startswith("dry") and len(saved["results"]) == len(names)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| dino_large_k | pass |" in md and "not a measurement" in md


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
