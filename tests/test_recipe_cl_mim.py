"""CL + MIM (recipes/cl_mim.py) end to end on the shared loop (tiny model, a few steps), and the
pieces that make it Park et al.'s combination of SimMIM and MoCo v3 on one ViT."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sslkern
from recipe_helpers import digits_like, load_recipe, ragged, step_ctx
from sslkern.train import parse_args
from sslkern.train.logging import RunLogger

TINY = ["--dim", "32", "--heads", "2", "--depth", "2", "--hidden-dim", "64", "--out-dim", "32", "--batch-size", "64",
        "--epochs", "2", "--eval-every", "1", "--quiet", "--threads", "1"]
mod = load_recipe("cl_mim")


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


def _method(argv=(), seed=0):
    _, a = parse_args(mod.CLMIM, TINY + ["--out", "/tmp/unused"] + list(argv))
    torch.manual_seed(seed)
    return mod.CLMIM(a, digits_like()), a


def _views(method, seed, n):
    """Rendered views (n, 1, 16, 16) of ``n`` random images, as a step draws them."""
    images = ragged(n, seed=seed)
    mim_view, *_ = step_ctx(method, seed, n).views(images, method.view_specs)
    return mim_view


def test_smoke_run_directory(tmp_path):
    out = str(tmp_path / "cl_mim")
    res = mod.run(mod.CLMIM, TINY + ["--out", out, "--steps", "3", "--cl-weight", "0.3"])
    assert res["step"] == 3
    for f in ["metrics.jsonl", "checkpoint.safetensors", "summary.json", "encoder_teacher.safetensors",
              "encoder_student.safetensors"]:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    for r in _rows(out):
        assert r["loss"] == pytest.approx(0.7 * r["loss_mim"] + 0.3 * r["loss_cl"], rel=1e-5)
        assert 0.05 < r["embedding_std"] <= 1 + 1e-6 and r["mim_gain"] < 1
        assert 0.99 <= r["momentum"] < 1
        dists = [r[f"attn_dist_{i}"] for i in range(2)]
        assert all(0 < d < 4 * 3 * math.sqrt(2) for d in dists)  # within the 4x4 grid of 4-pixel patches
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["method"] == "cl_mim" and set(s["eval"]) == {"teacher", "student", "random"}
    assert set(s["health"]) == {"embedding_std", "mim_gain"}


def test_reference_backend_gives_the_same_losses(tmp_path):
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = TINY + ["--steps", "20", "--no-probe", "--eval-every", "0"]
    mod.run(mod.CLMIM, args + ["--out", auto])
    mod.run(mod.CLMIM, args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    assert len(a) == 20
    np.testing.assert_allclose(a, b, rtol=2e-4)


def test_simmim_mask_is_simmims_mask_generator():
    """ceil(ratio·n) of the n mask patches per image, each covering scale×scale tokens."""
    gen = torch.Generator().manual_seed(0)
    m = mod.simmim_mask(50, 2, 2, 0.6, generator=gen)                    # 2x2 mask patches of 2x2 tokens
    assert m.shape == (50, 16) and m.dtype == torch.bool
    blocks = m.view(50, 2, 2, 2, 2)                                      # (b, gy, sy, gx, sx)
    assert bool((blocks == blocks[:, :, :1, :, :1]).all())               # constant inside a mask patch
    assert bool((blocks[:, :, 0, :, 0].sum((1, 2)) == math.ceil(0.6 * 4)).all())
    m1 = mod.simmim_mask(400, 4, 1, 0.6, generator=gen)
    assert bool((m1.sum(1) == 10).all())                                 # ceil(9.6)
    assert 0.55 < m1.float().mean(0).min() and m1.float().mean(0).max() < 0.7  # every position alike


def test_simmim_branch_is_simmims_forward():
    """Mask tokens in the encoder (masked pixels cannot reach the reconstruction), 1x1 conv +
    PixelShuffle to pixels, L1 on masked pixels / (count + 1e-5) / channels."""
    method, a = _method()
    images = _views(method, 0, 8)
    mask = mod.simmim_mask(8, 4, 1, 0.6, generator=torch.Generator().manual_seed(0))
    loss, baseline = method.simmim(images, mask)
    vit = method.base.backbone
    x = vit.patch_embed(images)
    w = mask.unsqueeze(-1).float()
    x = x * (1 - w) + method.mask_token * w
    x = vit.norm(vit.blocks(vit._pos_embed(x)))[:, 1:]
    rec = F.pixel_shuffle(F.conv2d(x.transpose(1, 2).reshape(8, 32, 4, 4), method.mim_head.conv.weight,
                                   method.mim_head.conv.bias), 4)
    pix = mask.view(8, 1, 4, 1, 4, 1).expand(8, 1, 4, 4, 4, 4).reshape(8, 1, 16, 16).float()
    want = ((images - rec).abs() * pix).sum() / (pix.sum() + 1e-5) / 1
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(baseline, (images.abs() * pix).sum() / (pix.sum() + 1e-5), atol=1e-6, rtol=1e-5)
    # the masked patches' pixels do not reach the encoder: change them, the reconstruction stays
    changed = images + 5 * pix
    x2 = vit.patch_embed(changed) * (1 - w) + method.mask_token * w
    rec2 = method.mim_head(vit.norm(vit.blocks(vit._pos_embed(x2)))[:, 1:], 4)
    torch.testing.assert_close(rec2, rec, atol=1e-5, rtol=1e-5)


def test_step_is_simmim_plus_moco_on_the_ctx_draws():
    """The step's views are ``ctx.views`` of (SimMIM crop, MoCo view 1, MoCo view 2) and its
    mask ``ctx.per_sample(simmim_mask, ...)``: rebuilt by hand from the same draws, the three
    terms give the logged losses and ``(1 − λ)·SimMIM + λ·MoCo``."""
    method, a = _method(["--cl-weight", "0.4"])
    images = ragged(12, seed=5)
    loss, metrics = method(images, step_ctx(method, 9, 12))
    ctx = step_ctx(method, 9, 12)
    assert [s.scale for s in method.view_specs] == [tuple(a.mim_scale)] + [tuple(a.crop_scale)] * 2
    mim_view, v1, v2 = ctx.views(images, method.view_specs)
    assert mim_view.shape == v1.shape == (12, 1, 16, 16) and not torch.equal(v1, v2)
    mask = mod.simmim_mask(12, 4, 1, a.mask_ratio, generator=torch.Generator().manual_seed(9))
    assert torch.equal(ctx.per_sample(mod.simmim_mask, 4, 1, a.mask_ratio), mask)
    loss_mim, _ = method.simmim(mim_view, mask)
    z = method.base([v1, v2])
    q1, q2 = method.predictor(z).chunk(2)
    with torch.no_grad():
        k1, k2 = method.momentum([v1, v2]).chunk(2)
    T = a.temperature
    loss_cl = 2 * T * (sslkern.info_nce_loss(q1, k2, T) + sslkern.info_nce_loss(q2, k1, T))
    torch.testing.assert_close(metrics["loss_mim"], loss_mim.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(metrics["loss_cl"], loss_cl.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, 0.6 * loss_mim + 0.4 * loss_cl, atol=1e-6, rtol=1e-6)


def test_paper_preset():
    """--preset paper: ViT-B/16 at 224, MoCo v3's ViT-B schedule and heads, SimMIM's 32-px mask patches."""
    _, a = parse_args(mod.CLMIM, ["--preset", "paper", "--out", "/tmp/unused"])
    assert (a.dim, a.depth, a.heads, a.patch_size, a.image_size) == (768, 12, 12, 16, 224)
    assert (a.epochs, a.batch_size, a.lr, a.weight_decay, a.warmup_epochs) == (300, 4096, 2.4e-3, 0.1, 40)
    assert (a.mask_patch, a.mask_ratio, tuple(a.mim_scale), a.temperature, a.hidden_dim, a.out_dim) == \
        (32, 0.6, (0.67, 1.0), 0.2, 4096, 256)
    assert a.cl_weight == 0.2 and a.pool == "cls"


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_weight_zero_and_one_switch_a_branch_off(lam):
    """λ = 0: no gradient reaches MoCo's predictor; λ = 1: none reaches the mask token or the
    SimMIM head; the shared ViT gets one in both cases."""
    method, a = _method(["--cl-weight", str(lam)])
    loss, _ = method(ragged(32), step_ctx(method, 1, 32))
    loss.backward()
    pred_grad = sum(float(p.grad.abs().sum()) for p in method.predictor.parameters() if p.grad is not None)
    mim_grad = float(method.mask_token.grad.abs().sum()) + float(method.mim_head.conv.weight.grad.abs().sum())
    vit_grad = float(method.base.backbone.blocks[0].attn.qkv.weight.grad.abs().sum())
    assert vit_grad > 0
    assert (pred_grad == 0) == (lam == 0.0) and (mim_grad == 0) == (lam == 1.0)


def test_attention_distance_is_the_attention_weighted_patch_distance():
    """From the captured qkv: softmax(q·kᵀ·scale) over patch keys (CLS dropped, renormalised),
    × the patch-centre distance in pixels, averaged (cl-vs-mim self_attention_analysis)."""
    method, a = _method()
    vit = method.base.backbone
    images = _views(method, 2, 16)
    attns = []
    for blk in vit.blocks:  # the unfused path keeps the probabilities: record them
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: attns.append(o.detach()))
    vit.eval()
    vit.forward_features(images)
    got = method.attention.read(16)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2).float()
    dist = torch.cdist(grid, grid) * 4
    for i, p in enumerate(attns):
        p = p[:, :, 1:, 1:]
        p = p / p.sum(-1, keepdim=True)
        assert got[f"attn_dist_{i}"] == pytest.approx(float((p * dist).sum(-1).mean()), rel=1e-5)


def test_collapse_is_detected_per_branch():
    method, _ = _method()
    assert method.verdict({"embedding_std": 0.02, "mim_gain": 0.4})[0] is True
    assert method.verdict({"embedding_std": 0.9, "mim_gain": 0.01})[0] is True
    collapsed, text = method.verdict({"embedding_std": 0.9, "mim_gain": 0.4})
    assert collapsed is False and "SimMIM reconstructs" in text
    only_mim, _ = _method(["--cl-weight", "0"])
    assert only_mim.verdict({"embedding_std": 0.02, "mim_gain": 0.4})[0] is False   # MoCo off: not judged
    only_cl, _ = _method(["--cl-weight", "1"])
    assert only_cl.verdict({"embedding_std": 0.9, "mim_gain": -0.1})[0] is False     # SimMIM off: not judged


@pytest.mark.parametrize("args, message", [
    (["--cl-weight", "1.5"], "--cl-weight expected in [0, 1], got 1.5"),
    (["--mask-ratio", "1"], "--mask-ratio expected in (0, 1), got 1.0"),
    (["--mask-patch", "6"], "--mask-patch expected a multiple of --patch-size 4 dividing --image-size 16, got 6"),
    (["--mim-scale", "0.9", "0.5"], "--mim-scale expected 0 < lo <= hi <= 1, got 0.9 0.5"),
    (["--mask-patch", "8", "--mask-ratio", "0.8"], "--mask-ratio 0.8 masks all 4 mask patches of 8 pixels"),
    (["--temperature", "0"], "--temperature expected > 0, got 0.0"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        mod.run(mod.CLMIM, ["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
