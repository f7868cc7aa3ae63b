"""Whole runs on images streamed from disk: worker and world invariance, exact resume after SIGKILL.

A tiny JPEG ImageFolder (3 classes, images of their own sizes) and a tiny data2vec 2.0; the
bars: ``--workers 0`` and ``--workers 2`` give the same run bitwise; a run SIGKILLed after a
mid-epoch checkpoint and resumed equals the uninterrupted run bitwise; two torchrun ranks
equal one process (up to the order of the gradient all-reduce's sums).
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sslkern.train.logging import RunLogger

from recipe_helpers import deterministic_rows, final_state, kill_at_first_checkpoint, load_recipe, torchrun_recipe

TINY = ["--dim", "32", "--heads", "2", "--depth", "2", "--top-k", "2", "--decoder-dim", "16", "--decoder-groups", "8",
        "--image-size", "16", "--batch-size", "8", "--epochs", "2", "--eval-every", "0", "--no-probe", "--quiet",
        "--threads", "1"]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / f"c{c}")
        for i in range(10):  # 30 images: 21 train / 9 test, 2 steps of 8 per epoch
            h, w = 20 + 4 * (i % 4), 28 - 3 * (i % 3)
            small = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
            arr = np.kron(small, np.ones((4, 4, 1), np.uint8))[:h, :w]
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.jpg", quality=90)
    return str(root)


def _run(args, out):
    return load_recipe("data2vec2").main(TINY + args + ["--out", out])


def _same_runs(a, b):
    (ta, sa), (tb, sb) = final_state(a), final_state(b)
    assert sa == sb and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert deterministic_rows(a) == deterministic_rows(b)


def test_any_number_of_workers_gives_the_same_run(tmp_path, jpeg_folder):
    _run(["--data", jpeg_folder, "--workers", "0"], str(tmp_path / "w0"))
    _run(["--data", jpeg_folder, "--workers", "2", "--prefetch", "3"], str(tmp_path / "w2"))
    _same_runs(str(tmp_path / "w0"), str(tmp_path / "w2"))
    rows = [r for r in RunLogger.read_metrics(str(tmp_path / "w2" / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["bad_images"] == 0 for r in rows)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, jpeg_folder):
    args = ["--data", jpeg_folder, "--workers", "2", "--save-every", "1", "--epochs", "3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _run(args, full)
    step = kill_at_first_checkpoint("data2vec2", TINY + args, part)
    assert step is not None and step < 6
    _run(args + ["--resume"], part)
    _same_runs(full, part)


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_streamed_images(tmp_path, jpeg_folder):
    out, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    args = TINY + ["--data", jpeg_folder, "--workers", "1", "--steps", "3"]
    torchrun_recipe("data2vec2", args, out)
    assert json.load(open(os.path.join(out, "config.json")))["world_size"] == 2
    load_recipe("data2vec2").main(args + ["--out", single])
    two = [r["loss"] for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"]
    one = [r["loss"] for r in RunLogger.read_metrics(os.path.join(single, "metrics.jsonl")) if r["kind"] == "train"]
    np.testing.assert_allclose(two, one, rtol=1e-5)
