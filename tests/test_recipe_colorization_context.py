"""Colorization and context-encoder recipes on the shared loop: each step against a construction
by hand from the same random draws (targets, L-only input, gradient-only weights, regions, the
adversarial split), the colour default and the refusal of grey data, a few steps end to end,
``--backend reference`` and the options' errors."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sslkern
from recipe_helpers import digits_like, load_recipe, ragged, source_batch, step_ctx, tiny_dataset
from sslkern.data import DataError, digits
from sslkern.reference.colorization_targets import rgb_to_lab
from sslkern.train import parse_args
from sslkern.train.colour_data import orientation_colour, orientation_coloured_digits, stroke_orientation
from sslkern.train.logging import RunLogger

COMMON = ["--dim", "32", "--heads", "2", "--depth", "2", "--batch-size", "256", "--epochs", "1", "--quiet",
          "--threads", "1", "--no-probe", "--eval-every", "0", "--eval-images", "64"]
TINY = {
    "colorization": COMMON + ["--prior-images", "256"],
    "context_encoder": COMMON + ["--decoder-dim", "16", "--decoder-depth", "1"],
}
CLASSES = {"colorization": "Colorization", "context_encoder": "ContextEncoder"}


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


def _model(name, extra=(), data=None):
    mod = load_recipe(name)
    cls = getattr(mod, CLASSES[name])
    _, a = parse_args(cls, TINY[name] + ["--out", "/tmp/unused"] + list(extra))
    data = data or (tiny_dataset(n=24, channels=3) if name == "colorization" else digits_like())
    torch.manual_seed(0)
    return mod, cls(a, data), a, data


def _ctx(model, data, batch=6, seed=7):
    return step_ctx(model, seed, batch, mean=tuple(data.mean), std=tuple(data.std))


def _view(model, data, images, seed=7):
    """The view the recipe's step renders with ``_ctx(model, data, len(images), seed)``."""
    view, = _ctx(model, data, len(images), seed).views(images, model.view)
    return view


# ---------------------------------------------------------------------------------------
# The colour default
# ---------------------------------------------------------------------------------------
def test_orientation_colour_is_a_function_of_the_grey_image():
    d, grey = orientation_coloured_digits(), digits()
    assert d.train.images.shape == (1257, 16, 16, 3) and d.test.images.shape == (540, 16, 16, 3)
    assert d.train.images.dtype == np.uint8 and d.channels == 3 and d.in_memory
    np.testing.assert_array_equal(d.train.labels, grey.train.labels)
    np.testing.assert_array_equal(d.test.labels, grey.test.labels)
    # a vertical bar runs vertically: hue of θ = π/2; a horizontal one θ = 0 (red)
    img = torch.zeros(2, 1, 9, 9)
    img[0, 0, :, 4] = 1.0
    img[1, 0, 4, :] = 1.0
    th = stroke_orientation(img)
    assert abs(float(th[0, 0, 4, 4]) - np.pi / 2) < 1e-5 and abs(float(th[1, 0, 4, 4])) < 1e-5
    rgb = orientation_colour(img)
    lab = rgb_to_lab(rgb)
    torch.testing.assert_close(lab[:, 0], 100 - 60 * img[:, 0], atol=1.5, rtol=0)    # L is the digit (sRGB clamp)
    assert float(lab[1, 1, 4, 4]) > 30 and abs(float(lab[1, 2, 4, 4])) < 1         # horizontal: +a
    assert float(lab[0, 1, 4, 4]) < -25 and abs(float(lab[0, 2, 4, 4])) < 3        # vertical: −a (clamped a little)
    torch.testing.assert_close(rgb[1, :, 0, 0], torch.ones(3), atol=1e-4, rtol=0)  # white background
    # L of the stored images is the upsampled grey digit (uint8 rounding, a few clamped pixels)
    x = torch.from_numpy(d.train.images).permute(0, 3, 1, 2).float() / 255
    g = F.interpolate(torch.from_numpy(grey.train.images).permute(0, 3, 1, 2).double() / 255, size=(16, 16),
                      mode="bilinear", align_corners=False, antialias=True).float()
    err = (rgb_to_lab(x)[:, 0] - (100 - 60 * g[:, 0])).abs()
    assert float(err.median()) < 0.5 and float((err > 1.5).float().mean()) < 0.03
    mean = x.double().mean((0, 2, 3))
    np.testing.assert_allclose(d.mean, mean.numpy(), rtol=1e-6)
    # every digit class uses many hues: colour alone does not give the label
    t = sslkern.colorization_targets(x, stride=1)
    labels = torch.from_numpy(d.train.labels)
    for c in range(10):
        assert t.bin_ids[labels == c][..., 0].unique().numel() > 40


def test_grey_data_is_refused():
    mod = load_recipe("colorization")
    with pytest.raises(DataError, match="1 channel"):
        mod.require_colour(digits())
    grey_rgb = torch.rand(8, 1, 16, 16).expand(-1, 3, -1, -1)
    with pytest.raises(DataError, match="only 0.0 % of the training images"):
        mod.require_colour(SimpleNamespace(channels=3, name="grey-rgb"), grey_rgb)
    mod.require_colour(SimpleNamespace(channels=3, name="colour"), torch.rand(8, 3, 16, 16))


def test_grey_folder_is_a_clear_error(tmp_path, capsys):
    from PIL import Image

    for c in ("a", "b"):
        os.makedirs(tmp_path / "grey" / c)
        for i in range(6):
            Image.fromarray((np.random.rand(8, 8) * 255).astype(np.uint8), mode="L").save(tmp_path / "grey" / c / f"{i}.png")
    with pytest.raises(SystemExit) as e:
        load_recipe("colorization").main(["--data", str(tmp_path / "grey"), "--out", str(tmp_path / "x"), "--quiet"])
    assert e.value.code == 2 and "colorization needs colour images" in capsys.readouterr().err


def test_colour_folder_trains(tmp_path):
    """A colour ImageFolder of images at their own sizes: streamed, rendered, one step, evaluated."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(tmp_path / "rgb" / c)
        for i in range(10):
            h, w = rng.integers(12, 24, size=2)
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(tmp_path / "rgb" / c / f"{i}.png")
    out = str(tmp_path / "run")
    res = load_recipe("colorization").main(TINY["colorization"] + ["--data", str(tmp_path / "rgb"), "--batch-size", "8",
                                                                   "--steps", "1", "--out", out])
    assert res["step"] == 1
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["dataset"] == "imagefolder:rgb" and np.isfinite(_rows(out)[0]["loss"])


# ---------------------------------------------------------------------------------------
# Colorization step
# ---------------------------------------------------------------------------------------
def test_colorization_step_by_hand():
    mod, model, a, data = _model("colorization")
    images = source_batch(data.train, 6)
    views = _view(model, data, images)
    mean, std = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    rgb = (views * std + mean).clamp(0, 1)
    # the encoder sees L only: its output equals the same ViT without the hook on (L − 50) / 50
    from timm.models.vision_transformer import VisionTransformer

    plain = VisionTransformer(**model.encoder._sslkern_timm_kwargs)
    plain.load_state_dict(model.encoder.state_dict())
    feats = plain.forward_features((rgb_to_lab(rgb)[:, :1] - 50) / 50)
    torch.testing.assert_close(model.encoder.forward_features(views), feats)
    t = sslkern.colorization_targets(rgb, model.factor, stride=2, backend="reference")
    assert t.bin_ids.shape == (6, 8, 8, 10)
    tok = feats[:, 1:]                                                    # (6, 16, 32): 4x4 tokens
    z = model.head(tok).view(6, 4, 4, 2, 2, 313).permute(0, 1, 3, 2, 4, 5).reshape(6, 8, 8, 313)
    dense = torch.zeros(6, 8, 8, 313).scatter_(-1, t.bin_ids.long(), t.weights)
    want = -(dense * torch.log_softmax(z, -1)).sum(-1).mean()
    loss, metrics = model(images, _ctx(model, data))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # token (0, 1) predicts target pixels rows 0-1, columns 2-3
    torch.testing.assert_close(z[0, 1, 3], model.head(tok[0, 1]).view(2, 2, 313)[1, 1])
    prior_loss = -(t.weights * model.log_prior[t.bin_ids.long()]).sum(-1).mean()
    assert float(metrics["colour_gain"]) == pytest.approx(float(1 - want.detach() / prior_loss), abs=1e-5)
    # the rebalancing weight enters the gradient only
    loss.backward()
    zz = z.detach().requires_grad_()
    (-(dense * torch.log_softmax(zz, -1)).sum(-1) * t.rebalance).mean().backward()
    g_head = torch.autograd.grad((zz.grad.detach() * z).sum(), model.head.weight)[0]
    torch.testing.assert_close(model.head.weight.grad, g_head, rtol=1e-4, atol=1e-7)
    # the prior: the training images' nearest bins at stride 2 (rendered whole at 16 px), smoothed
    x = torch.from_numpy(data.train.images).permute(0, 3, 1, 2).float() / 255
    p = sslkern.colorization_prior(x, stride=2, smooth_sigma=5.0)
    torch.testing.assert_close(model.factor, sslkern.rebalance_factor(p, 0.5), rtol=1e-4, atol=1e-6)


def test_colorization_verdict():
    mod = load_recipe("colorization")
    v = lambda h: mod.Colorization.verdict(None, h)  # noqa: E731
    assert v({"colour_gain": 0.3, "feature_std": 0.1})[0] is False
    c, line = v({"colour_gain": 0.0, "feature_std": 0.1})
    assert c and "prior" in line
    c, line = v({"colour_gain": 0.3, "feature_std": 0.001})
    assert c and "same feature" in line


# ---------------------------------------------------------------------------------------
# Context encoder step
# ---------------------------------------------------------------------------------------
def test_regions():
    mod = load_recipe("context_encoder")
    r, hole = mod.center_region(2, 16, 1)
    assert int(r[0].sum()) == 64 and bool(r[0, 0, 4, 4]) and bool(r[0, 0, 11, 11]) and not bool(r[0, 0, 3, 4])
    assert int(hole[0].sum()) == 36 and bool(hole[0, 0, 5, 5]) and not bool(hole[0, 0, 4, 5])
    r0, h0 = mod.center_region(1, 16, 0)
    assert torch.equal(r0, h0)
    g = torch.Generator().manual_seed(3)
    r, hole = mod.random_region(64, 16, 1, generator=g)
    frac = r.float().mean((1, 2, 3))
    assert (frac >= 0.2 - 1 / 256).all() and (frac <= 0.3 + 1 / 256).all()
    assert not (hole & ~r).any() and (hole.sum() < r.sum())
    # erosion: a hole pixel has its whole 3x3 neighbourhood in R (beyond the image border counts as R)
    rp = F.pad(r.float(), (1, 1, 1, 1), value=1.0)
    full = F.avg_pool2d(rp, 3, stride=1) > 1 - 1e-6
    assert torch.equal(hole, full & r)


@pytest.mark.parametrize("region", ["center", "random"])
def test_context_encoder_step_by_hand(region):
    mod, model, a, data = _model("context_encoder", ["--region", region])
    images = ragged(6, size=8)
    views = _view(model, data, images)
    if region == "center":
        r, hole = mod.center_region(6, 16, 1)
    else:  # ctx.per_sample: the global batch's draws from ctx.generator (seeded 7; views use the host one)
        r, hole = mod.random_region(6, 16, 1, generator=torch.Generator().manual_seed(7))
    filled = views.masked_fill(hole, 0.0)                       # the mean in pixel space: 0 after normalisation
    tok = model.encoder.forward_features(filled)[:, 1:]
    pred = model.decoder(tok)
    target = mod.patchify(views, 4)
    rr = mod.patchify(r.float(), 4)
    band = mod.patchify((r & ~hole).float(), 4)
    plain = (((pred - target) ** 2) * rr).sum() / rr.sum()
    loss, metrics = model(images, _ctx(model, data))
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)              # logged: plain L2 on R
    fill = ((target * rr) ** 2).sum() / rr.sum()
    assert float(metrics["hole_gain"]) == pytest.approx(float(1 - plain.detach() / fill), abs=1e-5)
    loss.backward()
    got = model.decoder.pred.weight.grad.clone()
    model.zero_grad()
    weighted = (((pred - target) ** 2) * (rr + 9 * band)).sum() / rr.sum()     # gradient: the band x10
    weighted.backward()
    torch.testing.assert_close(got, model.decoder.pred.weight.grad, rtol=1e-4, atol=1e-7)


def test_random_regions_are_per_sample():
    """Rows of a two-rank step are the rows of the one-rank step (the recipe never sees a rank)."""
    mod, model, a, data = _model("context_encoder", ["--region", "random"])
    whole = _ctx(model, data, batch=6)
    r, hole = model.regions(whole, 6, "cpu")
    for rank in (0, 1):
        ctx = _ctx(model, data, batch=6)
        ctx.rank, ctx.world_size = rank, 2
        rr, hh = model.regions(ctx, 3, "cpu")
        assert torch.equal(rr, r[rank::2]) and torch.equal(hh, hole[rank::2])


def test_context_encoder_adversarial_split():
    mod, model, a, data = _model("context_encoder", ["--adversarial"])
    d_ids = {id(p) for p in model.discriminator.parameters()}
    for grp in model.param_groups():
        kinds = {id(p) in d_ids for p in grp["params"]}
        assert len(kinds) == 1
        assert grp.get("lr_scale", 1.0) == (0.1 if kinds == {True} else 1.0)
    images = ragged(6, size=8)
    loss, metrics = model(images, _ctx(model, data))
    assert {"d_loss", "g_adv", "d_acc"} <= set(metrics)
    loss.backward()
    d_grad = {n: p.grad.clone() for n, p in model.discriminator.named_parameters()}
    enc_grad = model.encoder.blocks[0].attn.qkv.weight.grad.clone()
    # D's gradient is d_loss's alone (G's adversarial term goes through a detached D) ...
    views = _view(model, data, images)
    r, hole = mod.center_region(6, 16, 1)
    pred = model.decoder(model.encoder.forward_features(views.masked_fill(hole, 0.0))[:, 1:])
    dl, g_adv, _ = model.adversarial(views, pred, r)
    grads = torch.autograd.grad(dl, list(model.discriminator.parameters()))
    for (n, _), gr in zip(model.discriminator.named_parameters(), grads):
        torch.testing.assert_close(d_grad[n], gr, rtol=1e-4, atol=1e-6)
    # ... and the generator's includes (1 − 0.999)·g_adv but not d_loss
    assert g_adv.requires_grad and float(enc_grad.abs().sum()) > 0


def test_context_encoder_verdict():
    mod = load_recipe("context_encoder")
    v = lambda h: mod.ContextEncoder.verdict(None, h)  # noqa: E731
    assert v({"hole_gain": 0.4, "feature_std": 0.1})[0] is False
    assert v({"hole_gain": 0.01, "feature_std": 0.1})[0] is True
    assert v({"hole_gain": 0.4, "feature_std": 0.001})[0] is True


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,extra", [("colorization", []),
                                        ("context_encoder", ["--region", "random", "--adversarial"])])
def test_smoke_run_directory(tmp_path, name, extra):
    out = str(tmp_path / name)
    res = load_recipe(name).main(TINY[name] + extra + ["--out", out])
    assert res["step"] == 4
    for f in ("config.json", "metrics.jsonl", "checkpoint.safetensors", "summary.json", "encoder_encoder.safetensors"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    train = _rows(out)
    assert [r["step"] for r in train] == list(range(1, 5))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["method"] == {"colorization": "colorization", "context_encoder": "context-encoder"}[name]
    assert set(s["eval"]) == {"encoder", "random"} and isinstance(s["verdict"], str)
    if name == "colorization":
        assert s["dataset"] == "digits-orientation-colour"
        assert set(s["health"]) == {"colour_gain", "feature_std"}
    else:
        assert set(s["health"]) == {"hole_gain", "feature_std"}


@pytest.mark.parametrize("name", ["colorization", "context_encoder"])
def test_reference_backend_gives_the_same_losses(tmp_path, name):
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = TINY[name] + ["--steps", "2"]
    load_recipe(name).main(args + ["--out", auto])
    load_recipe(name).main(args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    assert len(a) == 2
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_presets_parse():
    for name in ("colorization", "context_encoder"):
        cls = getattr(load_recipe(name), CLASSES[name])
        _, a = parse_args(cls, ["--preset", "paper", "--out", "/tmp/unused"])
        assert a.image_size == 224 and a.patch_size == 16 and a.dim == 384
    _, a = parse_args(getattr(load_recipe("colorization"), "Colorization"), ["--preset", "paper", "--lr", "1e-4"])
    assert a.lr == 1e-4 and a.batch_size == 40 and a.target_stride == 4 and tuple(a.betas) == (0.9, 0.99)


@pytest.mark.parametrize("name, args, message", [
    ("colorization", ["--target-stride", "3"], "--target-stride expected a positive divisor of --patch-size 4, got 3"),
    ("colorization", ["--gamma", "1.5"], "--gamma expected in [0, 1], got 1.5"),
    ("colorization", ["--prior-sigma", "-1"], "--prior-sigma expected >= 0, got -1.0"),
    ("colorization", ["--crop-scale", "0", "1"], "--crop-scale expected 0 < min <= max <= 1"),
    ("colorization", ["--flip-p", "2"], "--flip-p expected in [0, 1], got 2.0"),
    ("context_encoder", ["--betas", "0.9", "1"], "--betas expected two values in [0, 1)"),
    ("context_encoder", ["--overlap", "4"], "--overlap expected in [0, 3]"),
    ("context_encoder", ["--overlap-weight", "0"], "--overlap-weight expected > 0, got 0.0"),
    ("context_encoder", ["--l2-weight", "0"], "--l2-weight expected in (0, 1], got 0.0"),
    ("context_encoder", ["--region", "square"], "invalid choice: 'square'"),
    ("context_encoder", ["--decoder-dim", "15", "--decoder-heads", "2"], "--decoder-dim 15 expected a multiple"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, name, args, message):
    with pytest.raises(SystemExit) as e:
        load_recipe(name).main(["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
