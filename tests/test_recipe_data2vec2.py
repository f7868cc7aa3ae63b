"""The data2vec 2.0 recipe end to end (tiny model, a few steps) and the shared plumbing."""
import json
import os

import numpy as np
import pytest
import torch

from sslkern.train import checkpoint as ckpt
from sslkern.data import DataError, open_dataset
from sslkern.train.evaluate import knn_accuracy
from sslkern.train.logging import RunLogger

from recipe_helpers import deterministic_rows, final_state, kill_at_first_checkpoint, load_recipe, torchrun_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "data2vec2.py")
TINY = ["--dim", "32", "--heads", "2", "--depth", "2", "--top-k", "2", "--decoder-dim", "16",
        "--decoder-groups", "8", "--batch-size", "256", "--epochs", "2", "--eval-every", "1", "--quiet", "--threads", "1"]
# 1,257 training digits // 256 = 4 steps per epoch, 8 steps in 2 epochs.


def _recipe():
    return load_recipe("data2vec2")


_deterministic_rows, _final_state = deterministic_rows, final_state


# ---------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------
def test_smoke_run_directory_and_timm_export(tmp_path):
    out = str(tmp_path / "run")
    res = _recipe().main(TINY + ["--out", out, "--steps", "3"])
    assert res["step"] == 3
    for name in ("config.json", "metrics.jsonl", "checkpoint.safetensors", "encoder_teacher.safetensors",
                 "encoder_student.safetensors", "loss.png", "eval.png", "summary.txt", "summary.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    rows = RunLogger.read_metrics(os.path.join(out, "metrics.jsonl"))
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    final = [r for r in rows if r["kind"] == "final"][-1]
    for k in ("teacher_knn", "student_knn", "random_knn", "teacher_probe", "random_probe"):
        assert 0 <= final[k] <= 100, k
    assert json.load(open(os.path.join(out, "config.json")))["epochs"] == 2
    # The exported encoder is a plain timm VisionTransformer state dict (strict load) ...
    model = ckpt.load_exported_encoder(os.path.join(out, "encoder_teacher.safetensors"))
    tensors, _ = ckpt.load_tensors(os.path.join(out, "checkpoint.safetensors"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, tensors[f"method/teacher.module.{k}"], rtol=0, atol=0)
    # ... that runs: features of the right width.
    assert model.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, 17, 32)


@pytest.mark.parametrize("extra", [
    ["--alibi"],
    ["--mask", "inverse_block", "--patch-size", "2", "--mask-ratio", "0.6"],
    ["--backend", "reference", "--clones", "2"],
    ["--clones", "1", "--mask-ratio", "0.5"],
], ids=["alibi", "inverse_block", "reference_backend", "one_mask"])
def test_recipe_options_run(tmp_path, extra):
    out = str(tmp_path / "run")
    res = _recipe().main(TINY + ["--out", out, "--steps", "2", "--no-probe"] + extra)
    rows = RunLogger.read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    assert 0 <= res["teacher"]["knn"] <= 100
    ckpt.load_exported_encoder(os.path.join(out, "encoder_student.safetensors"))


def test_resume_after_stop_matches_uninterrupted(tmp_path):
    recipe = _recipe()
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    recipe.main(TINY + ["--out", full, "--no-probe"])
    recipe.main(TINY + ["--out", part, "--no-probe", "--steps", "3"])  # stops mid-epoch 0
    recipe.main(TINY + ["--out", part, "--no-probe", "--resume"])
    (a, sa), (b, sb) = _final_state(full), _final_state(part)
    assert sa == sb == 8
    assert a.keys() == b.keys()
    for k in a:  # bitwise: same weights, teacher and optimizer state
        assert torch.equal(a[k], b[k]), k
    assert _deterministic_rows(full) == _deterministic_rows(part)


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    recipe = _recipe()
    out = str(tmp_path / "run")
    recipe.main(TINY + ["--out", out, "--no-probe", "--steps", "1"])
    with pytest.raises(SystemExit):
        recipe.main(TINY + ["--out", out, "--no-probe", "--resume", "--lr", "0.1"])
    err = capsys.readouterr().err
    assert "--resume:" in err and "'lr': (0.002, 0.1)" in err


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    """Kill the process (SIGKILL) once its first epoch checkpoint exists, resume, compare."""
    recipe = _recipe()
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    recipe.main(TINY + ["--out", full, "--no-probe"])
    step = kill_at_first_checkpoint("data2vec2", TINY + ["--no-probe"], part)
    assert step is not None and step < 8
    recipe.main(TINY + ["--out", part, "--no-probe", "--resume"])
    (a, _), (b, _) = _final_state(full), _final_state(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _deterministic_rows(full) == _deterministic_rows(part)


@pytest.mark.slow
def test_two_processes_torchrun_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    torchrun_recipe("data2vec2", TINY + ["--steps", "3", "--no-probe"], out)
    assert json.load(open(os.path.join(out, "config.json")))["world_size"] == 2
    rows = RunLogger.read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]  # rank 0 logs once per step
    final = [r for r in rows if r["kind"] == "final"][-1]
    assert final["teacher_replica_max_diff"] == 0.0  # EMA teachers identical on both ranks
    assert 0 <= final["teacher_knn"] <= 100
    ckpt.load_exported_encoder(os.path.join(out, "encoder_student.safetensors"))
    # Same global batches, augmentations, masks and noise as one process: same run up to
    # the order of floating-point sums (gradient all-reduce).
    single = str(tmp_path / "single")
    _recipe().main(TINY + ["--out", single, "--steps", "3", "--no-probe"])
    one = [r["loss"] for r in RunLogger.read_metrics(os.path.join(single, "metrics.jsonl")) if r["kind"] == "train"]
    two = [r["loss"] for r in rows if r["kind"] == "train"]
    np.testing.assert_allclose(two, one, rtol=1e-5)  # fp32 sums in another order
    (a, _), (b, _) = _final_state(single), _final_state(out)
    for k in a:
        if k.startswith("teacher/"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "--epochs expected a positive integer, got -1"),
    (["--batch-size", "0"], "--batch-size expected a positive integer"),
    (["--backend", "fast"], "invalid choice: 'fast'"),
    (["--data", "/nonexistent/dir"], "does not exist"),
    (["--mask-ratio", "1.5"], "--mask-ratio expected in (0, 1)"),
    (["--patch-size", "5"], "expected a multiple of --patch-size"),
    (["--top-k", "9"], "--top-k expected <= --depth"),
    (["--steps", "-2"], "--steps expected >= 0"),
    (["--mask", "blocks"], "invalid choice: 'blocks'"),
])
def test_bad_cli_input(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        _recipe().main(["--out", str(tmp_path / "x")] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_data_dir_is_a_clear_cli_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        _recipe().main(["--out", str(tmp_path / "x"), "--data", str(tmp_path / "empty")])
    assert "is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Plumbing
# ---------------------------------------------------------------------------------------
def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    ftr, fte = torch.randn(300, 12, generator=g), torch.randn(77, 12, generator=g)
    ytr, yte = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (77,), generator=g)
    correct = 0
    for i in range(77):  # one test sample at a time, plain loops over neighbours
        sims = [float(fte[i] @ ftr[j] / (fte[i].norm() * ftr[j].norm())) for j in range(300)]
        order = sorted(range(300), key=lambda j: -sims[j])[:20]
        votes = [0.0] * 5
        for j in order:
            votes[int(ytr[j])] += float(np.exp(sims[j] / 0.07))
        correct += int(int(np.argmax(votes)) == int(yte[i]))
    got = knn_accuracy(ftr, ytr, fte, yte, k=20, temperature=0.07, num_classes=5, chunk=30)
    assert got == pytest.approx(100.0 * correct / 77)
    # a separable case: perfect
    assert knn_accuracy(torch.eye(4).repeat(5, 1), torch.arange(4).repeat(5), torch.eye(4), torch.arange(4), k=3) == 100.0


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "c.safetensors")
    ckpt.save_tensors(path, {"w": torch.ones(3)}, {"step": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_tensors(path, {"w": torch.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    tensors, meta = ckpt.load_tensors(path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temp file left behind


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    path = str(tmp_path / "s.safetensors")
    ckpt.save_training_state(path, modules={"m": model}, optimizer=opt, generators={"g": gen}, extra={"step": 7})
    expect_gen, expect_global = torch.rand(3, generator=gen), torch.rand(3)
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    gen2 = torch.Generator()
    extra = ckpt.load_training_state(path, modules={"m": model2}, optimizer=opt2, generators={"g": gen2})
    assert extra["step"] == 7
    assert torch.equal(torch.rand(3, generator=gen2), expect_gen) and torch.equal(torch.rand(3), expect_global)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
    assert opt2.param_groups[0]["lr"] == 1e-2


def _write_tree(root, classes, per_class, size=(10, 7), mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_dataset(tmp_path):
    _write_tree(tmp_path, ["cat", "dog", "emu"], 4)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = open_dataset(str(tmp_path))  # stratified 70/30 split by labels, nothing decoded yet
    assert ds.classes == ["cat", "dog", "emu"] and ds.channels == 3
    assert len(ds.train) + len(ds.test) == 12 and sorted(set(ds.test.labels.tolist())) == [0, 1, 2]
    assert ds.train.load(0).shape == (7, 10, 3)


def test_image_folder_train_val_dirs_grey_images_read_as_rgb(tmp_path):
    _write_tree(tmp_path / "train", ["a", "b"], 3, mode="L")
    _write_tree(tmp_path / "val", ["a", "b"], 2, mode="L")
    ds = open_dataset(str(tmp_path))
    assert (len(ds.train), len(ds.test)) == (6, 4) and ds.test.load(0).shape == (7, 10, 3)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        open_dataset(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images"):
        open_dataset(str(tmp_path / "noimg"))
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataError, match="lacks data_batch_2"):
        open_dataset(str(tmp_path / "cifar"))


def test_cifar_reader_refuses_arbitrary_pickles(tmp_path):
    import pickle

    d = tmp_path / "cifar"
    d.mkdir()
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / n).write_bytes(pickle.dumps(batch))
    ds = open_dataset(str(d))
    assert (len(ds.train), len(ds.test)) == (10, 2) and ds.name == "cifar10" and ds.train.load(0).shape == (32, 32, 3)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": os.system}))
    with pytest.raises(DataError, match="refusing to unpickle"):
        open_dataset(str(d))


def test_digits_default_split():
    ds = open_dataset(None)
    assert (len(ds.train), len(ds.test)) == (1257, 540) and ds.train.load(0).shape == (8, 8, 1)
    assert np.bincount(ds.test.labels).min() >= 52  # stratified: 52-55 per class
