"""The MaskFeat recipe on the shared loop: its step against a transcription of SlowFast's
``MaskMViT._maskfeat_forward`` (image path, PRED_HOG) with ``HOGLayerC`` targets
(tests/_slowfast_hog.py) and ``MultipleMSELoss``, on the recipe's weights and the same
random draws; then a few steps end to end and the reference backend's losses."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _slowfast_hog import HOGLayerC, maskfeat_hog_labels
from recipe_helpers import digits_like, load_recipe, ragged, step_ctx
from sslkern.train import parse_args
from sslkern.train.logging import RunLogger

TINY = ["--dim", "32", "--heads", "2", "--depth", "2", "--batch-size", "256", "--epochs", "2", "--quiet",
        "--threads", "1"]
DATA = digits_like()


def _model(extra=()):
    mod = load_recipe("maskfeat")
    _, a = parse_args(mod.MaskFeat, TINY + ["--out", "/tmp/unused"] + list(extra))
    torch.manual_seed(0)
    return mod, mod.MaskFeat(a, DATA), a


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


def maskfeat_forward(model, x, mask, patch_size, pool, nbins):
    """SlowFast MaskMViT._maskfeat_forward (2-D patches, mask from the loader, PRED_HOG) on the
    recipe's ViT: labels, mask-token substitution, CLS + positions, blocks, head, MSE."""
    vit, enc = model.student.vit, model.student
    hog = HOGLayerC(nbins=nbins, pool=pool, channels=x.shape[1])
    labels = maskfeat_hog_labels(hog, x.detach(), x.shape[-1] // patch_size, mask)   # _get_hog_label_2d
    x_embed = vit.patch_embed(x)
    B, N, C = x_embed.shape
    mask_tokens = enc.mask_token.view(1, 1, -1).expand(B, N, -1)
    float_mask = mask.float().unsqueeze(-1)
    h = x_embed * (1 - float_mask) + mask_tokens * float_mask
    h = torch.cat((vit.cls_token.expand(B, -1, -1), h), dim=1) + vit.pos_embed
    for blk in vit.blocks:
        h = blk(h)
    pred = enc.head(vit.norm(h))[:, 1:][mask]   # MSSeparateHead: norm, linear, [mask]
    return F.mse_loss(pred, labels), labels


@pytest.mark.parametrize("extra", [[], ["--masking", "random", "--mask-ratio", "0.6"]], ids=["block", "random"])
def test_step_matches_slowfast_maskfeat(extra):
    mod, model, a = _model(extra)
    assert model.num_features == 1 * (4 // 2) ** 2 * 9 == 36
    images = ragged(6)
    views, = step_ctx(model, 4, 6).views(images, model.view)
    mask = model.make_masks(step_ctx(model, 4, 6))
    n_mask = round(16 * a.mask_ratio)
    assert mask.shape == (6, 16) and mask.dtype == torch.bool
    if a.masking == "random":
        assert (mask.sum(1) == n_mask).all()
    else:  # SlowFast MaskingGenerator: up to round(N·0.4) patches in blocks
        assert (mask.sum(1) <= n_mask).all() and (mask.sum(1) >= max(1, n_mask // 5)).all()
    loss_ref, labels = maskfeat_forward(model, views, mask, a.patch_size, a.hog_pool, a.hog_bins)
    loss, metrics = model(images, step_ctx(model, 4, 6))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert metrics["masked_share"] == pytest.approx(mask.float().mean().item())
    assert metrics["target_std"] == pytest.approx(labels.std(0).mean().item(), rel=1e-4)
    assert 0 < metrics["pred_std_ratio"]
    loss.backward()
    assert model.student.mask_token.grad.abs().sum() > 0


def test_smoke_run_directory(tmp_path):
    out = str(tmp_path / "maskfeat")
    res = load_recipe("maskfeat").main(TINY + ["--out", out, "--eval-every", "1"])
    assert res["step"] == 8
    train = _rows(out)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["method"] == "maskfeat" and s["steps"] == 8 and set(s["eval"]) == {"encoder", "random"}
    assert set(s["health"]) == {"pred_std_ratio"} and s["health"]["pred_std_ratio"]["final"] > 0
    assert s["verdict"].startswith(("not collapsed: pred_std_ratio", "collapsed: pred_std_ratio"))


def test_reference_backend_gives_the_same_20_losses(tmp_path):
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = ["--dim", "32", "--heads", "2", "--depth", "2", "--batch-size", "256", "--epochs", "5", "--quiet",
            "--threads", "1", "--steps", "20", "--no-probe", "--eval-every", "0"]
    mod = load_recipe("maskfeat")
    mod.main(args + ["--out", auto])
    mod.main(args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    assert len(a) == len(b) == 20
    np.testing.assert_allclose(a, b, rtol=1e-3)  # fused vs eager ops (views too): fp32 sums in another order, grown over 20 steps


@pytest.mark.parametrize("args, message", [
    (["--mask-ratio", "1.0"], "--mask-ratio expected in (0, 1), got 1.0"),
    (["--mask-ratio", "0.01"], "--mask-ratio 0.01 masks no patch of the 16"),
    (["--hog-pool", "3"], "--hog-pool expected a positive divisor of --patch-size 4, got 3"),
    (["--hog-bins", "0"], "--hog-bins expected in [1, 256], got 0"),
    (["--masking", "grid"], "invalid choice: 'grid'"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        load_recipe("maskfeat").main(["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
