"""recipes/relvit.py on the shared loop: its shuffle and losses against a transcription of
RelViT's code (``datasets/transforms.py`` image2patches / patches2image, ``ShuffleDataset``,
``SSLSignal`` and ``RelViT.training_step``), then a few steps end to end."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkern.reference.relation_loss import relvit_losses
from sslkern.train import parse_args
from sslkern.train.logging import RunLogger

from recipe_helpers import digits_like, load_recipe, ragged, step_ctx

TINY = ["--dim", "18", "--heads", "2", "--depth", "1", "--batch-size", "256", "--quiet", "--threads", "1"]
DATA = digits_like()


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


def image2patches(x, p):
    """relvit datasets/transforms.py ``image2patches``: (C, H, W) → (C, N_PATCH, p, p)."""
    C = x.shape[0]
    x = F.unfold(x.unsqueeze(0), kernel_size=(p, p), stride=(p, p))
    return x.view(1, C, p, p, -1).transpose(0, 1).transpose(1, -1).squeeze(-1)


def patches2image(x, output_size):
    """relvit ``patches2image``."""
    C, n, hp, wp = x.shape
    x = x.unsqueeze(0).reshape(1, C, n, -1).transpose(2, 3).reshape(1, -1, n)
    return F.fold(x, output_size, kernel_size=(hp, wp), stride=(hp, wp)).squeeze(0)


def test_shuffle_is_relvits_shuffle_dataset():
    mod = load_recipe("relvit")
    images = torch.randn(3, 2, 12, 16)
    perm = torch.stack([torch.randperm(12) for _ in range(3)])
    want = torch.stack([patches2image(image2patches(x, 4)[:, idx], (12, 16)) for x, idx in zip(images, perm)])
    assert torch.equal(mod.shuffle_patches(images, perm, 4), want)


def test_majority_rate():
    mod = load_recipe("relvit")
    assert mod.majority_rate(4) == pytest.approx(36 / 256)  # LU etc.: C(4,2)² of the 16² pairs


def test_step_matches_relvit_training_step():
    """The recipe's loss = RelViT's rel + dist + angle + abs_pos on the same draws and weights."""
    mod = load_recipe("relvit")
    _, a = parse_args(mod.RelViT, TINY + ["--out", "/tmp/unused"])
    torch.manual_seed(0)
    model = mod.RelViT(a, DATA)
    images = ragged(8)
    loss, metrics = model(images, step_ctx(model, 7, 8))
    # the same draws, then RelViT's code
    views, = step_ctx(model, 7, 8).views(images, model.view)
    perm = torch.rand(8, 16, generator=torch.Generator().manual_seed(7)).argsort(1)
    x = torch.stack([patches2image(image2patches(v, 4)[:, idx], (16, 16)) for v, idx in zip(views, perm)])
    z = model.encoder.forward_features(x)[:, 1:]
    o = relvit_losses(z, model.rel_head.wq, model.rel_head.wk, perm, 4, (model.dist_head.wq, model.dist_head.wk),
                      (model.angle_head.wq, model.angle_head.wk))
    abs_pos = F.cross_entropy(model.abs_pos_head(z).transpose(1, 2), torch.stack([torch.arange(16)[p] for p in perm]))
    want = o["rel"] + o["dist"] + o["angle"] + abs_pos
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["rel_acc"], o["acc"])
    loss.backward()
    assert model.rel_head.wq.grad.abs().sum() > 0 and model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_smoke_run_directory(tmp_path):
    mod = load_recipe("relvit")
    out = str(tmp_path / "relvit")
    res = mod.main(TINY + ["--epochs", "2", "--out", out, "--eval-every", "1"])
    assert res["step"] == 8
    train = _rows(out)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert all(0 <= r["rel_acc"] <= 1 and r["token_std"] > 0 for r in train)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["method"] == "relvit" and s["steps"] == 8
    assert set(s["health"]) == {"rel_acc", "token_std"}
    assert s["verdict"].split(":")[0] in ("collapsed", "not collapsed") and "content-blind 0.141" in s["verdict"]


def test_reference_backend_gives_the_same_losses(tmp_path):
    mod = load_recipe("relvit")
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = TINY + ["--epochs", "5", "--steps", "20", "--no-probe", "--eval-every", "0"]
    mod.main(args + ["--out", auto])
    mod.main(args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    assert len(a) == 20
    np.testing.assert_allclose(a, b, rtol=1e-5)  # fused vs eager: fp32 sums in another order


@pytest.mark.parametrize("args, message", [
    (["--dim", "8", "--heads", "2"], "--dim expected >= 9"),
    (["--patch-size", "16"], "expected a grid of at least 2x2 patches, got 1x1"),
    (["--smooth-rel", "1.0"], "--smooth-rel expected in [0, 1), got 1.0"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, args, message):
    mod = load_recipe("relvit")
    with pytest.raises(SystemExit) as e:
        mod.main(["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
