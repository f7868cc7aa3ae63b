"""The masked-image-modeling recipes (MAE, data2vec v1, I-JEPA) on the shared loop.

Each recipe's step is checked against a transcription, written here, of the method's own
public code (mae ``models_mae.py``, fairseq ``data2vec_vision.py``, ijepa ``src/train.py``
with ``src/models/vision_transformer.py`` and ``src/masks/utils.py``) on small inputs, using
the recipe's weights and the same random draws; then a few steps end to end.
"""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkern.train import checkpoint as ckpt
from sslkern.train import parse_args
from sslkern.train.logging import RunLogger

from recipe_helpers import digits_like, ragged, step_ctx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--dim", "32", "--heads", "2", "--depth", "2", "--batch-size", "256", "--epochs", "2", "--quiet", "--threads", "1"]
TINY = {  # 1,257 training digits // 256 = 4 steps per epoch, 8 steps in 2 epochs
    "mae": COMMON + ["--decoder-dim", "16", "--decoder-depth", "1", "--decoder-heads", "2"],
    "data2vec": COMMON + ["--top-k", "2"],
    "ijepa": COMMON + ["--pred-dim", "16", "--pred-depth", "1", "--pred-heads", "2"],
}
CLASSES = {"mae": "MAE", "data2vec": "Data2Vec", "ijepa": "IJEPA"}
IJEPA_LAYOUT = ["--patch-size", "2", "--num-targets", "4", "--target-scale", "0.15", "0.2", "--min-keep", "4"]
DATA = digits_like()


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(name, argv):
    return _recipe(name).main(argv)


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


def _model(name, extra=()):
    mod = _recipe(name)
    cls = getattr(mod, CLASSES[name])
    _, a = parse_args(cls, TINY[name] + ["--out", "/tmp/unused"] + list(extra))
    torch.manual_seed(0)
    return mod, cls(a, DATA), a


def _ctx(model, seed=7, batch=6):
    return step_ctx(model, seed, batch)


def _same_draws(model, seed, images):
    """What the recipe's step draws with ``_ctx(model, seed)``: its view (from the host
    generator), and a generator in the state ``ctx.generator`` has when the masks are drawn."""
    view, = _ctx(model, seed, len(images)).views(images, model.view)
    return view, torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# MAE vs mae models_mae.py
# ---------------------------------------------------------------------------------------
def mae_sincos(embed_dim, grid_size, cls_token):
    """mae util/pos_embed.py get_2d_sincos_pos_embed (numpy, meshgrid with w first)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def mae_forward(model, imgs, noise, mask_ratio, norm_pix_loss=True):
    """mae MaskedAutoencoderViT.forward_encoder / forward_decoder / forward_loss with the recipe's weights."""
    enc, dec = model.encoder, model.decoder
    # forward_encoder + random_masking
    x = enc.patch_embed(imgs)
    x = x + enc.pos_embed[:, 1:, :]
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    cls_token = enc.cls_token + enc.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in enc.blocks:
        x = blk(x)
    latent = enc.norm(x)
    # forward_decoder
    x = dec.embed(latent)
    mask_tokens = dec.input.mask_token.reshape(1, 1, -1).repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + mae_sincos(x.shape[-1], int(L ** 0.5), cls_token=True)
    for blk in dec.blocks:
        x = blk(x)
    pred = dec.pred(dec.norm(x))[:, 1:, :]
    # forward_loss (patchify for C channels)
    p = enc.patch_embed.patch_size[0]
    h = w = imgs.shape[2] // p
    c = imgs.shape[1]
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(imgs.shape[0], c, h, p, w, p)).reshape(imgs.shape[0], h * w, p * p * c)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return latent, pred, mask, ids_restore, loss


@pytest.mark.parametrize("extra", [[], ["--no-norm-pix-loss", "--mask-ratio", "0.5"]], ids=["norm_pix", "raw_pix"])
def test_mae_step_matches_models_mae(extra):
    import sslkern

    mod, model, a = _model("mae", extra)
    n = model.grid[0] * model.grid[1]
    # sin-cos positions as mae's numpy code, fixed (no gradient)
    torch.testing.assert_close(model.encoder.pos_embed.detach(), mae_sincos(a.dim, model.grid[0], True), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.decoder.input.pos_embed, mae_sincos(a.decoder_dim, model.grid[0], True), rtol=0, atol=1e-6)
    assert not model.encoder.pos_embed.requires_grad
    images = ragged(6)
    views, g = _same_draws(model, 7, images)
    noise = torch.rand(6, n, generator=g)  # what random_mask draws next
    latent_ref, pred_ref, mask_ref, ids_restore_ref, loss_ref = mae_forward(model, views, noise, a.mask_ratio,
                                                                            a.norm_pix_loss)
    # the recipe's pieces on the same draws
    masks = sslkern.masks.random_mask(6, n, a.mask_ratio, generator=torch.Generator().manual_seed(7))
    assert torch.equal(masks.ids_restore, ids_restore_ref)
    assert torch.equal(masks.mask, mask_ref.bool())
    latent = sslkern.patch.forward_masked(model.encoder, views, masks.ids_keep)
    pred = model.decoder(latent, masks.ids_restore)
    nk = int(n * (1 - a.mask_ratio))
    assert latent.shape == latent_ref.shape == (6, 1 + nk, a.dim)
    assert pred.shape == pred_ref.shape == (6, n, a.patch_size ** 2)
    torch.testing.assert_close(latent, latent_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred, pred_ref, rtol=1e-5, atol=1e-5)
    # ... and the whole step (view, mask, encoder, decoder, loss) from the recipe's forward
    loss, _ = model(images, _ctx(model))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.encoder.pos_embed.grad is None and model.decoder.input.mask_token.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# data2vec v1 vs fairseq data2vec_vision.py
# ---------------------------------------------------------------------------------------
def data2vec_vision_forward(model, img, bool_mask, top_k, beta, loss_scale):
    """fairseq Data2VecVisionModel.forward (layer_norm_target_layer, end-of-block targets) on the recipe's weights."""
    vit, teacher = model.student.vit, model.teacher.module
    with torch.no_grad():  # teacher: unmasked sequence, outputs of every block, CLS dropped
        z, x = [], teacher._pos_embed(teacher.patch_embed(img))
        for blk in teacher.blocks:
            x = blk(x)
            z.append(x[:, 1:])
        y = [F.layer_norm(tl.float(), tl.shape[-1:]) for tl in z[-top_k:]]
        y = sum(y) / len(y)
        y = y[bool_mask].float()
    x = vit.patch_embed(img)
    w = bool_mask.view(bool_mask.size(0), -1, 1).type_as(x)
    x = x * (1 - w) + model.student.mask_token.view(1, 1, -1) * w
    x = vit.norm(vit.blocks(vit._pos_embed(x)))[:, 1:]
    x = model.student.head(x)[bool_mask].float()
    loss = F.smooth_l1_loss(x, y, reduction="none", beta=beta).sum(dim=-1) if beta else \
        F.mse_loss(x, y, reduction="none").sum(dim=-1)
    loss = loss * loss_scale
    return loss.sum() / loss.numel(), y


@pytest.mark.parametrize("extra", [[], ["--loss-beta", "0"]], ids=["smooth_l1", "l2"])
def test_data2vec_step_matches_fairseq_data2vec_vision(extra):
    mod, model, a = _model("data2vec", extra)
    with torch.no_grad():  # a teacher that differs from the student, as after some EMA steps
        for p in model.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = ragged(6)
    views, _ = _same_draws(model, 3, images)
    mask = model.make_masks(_ctx(model, 3))
    n = model.grid[0] * model.grid[1]
    assert mask.shape == (6, n) and mask.dtype == torch.bool
    assert (mask.sum(1) <= int(n * a.mask_ratio)).all() and (mask.sum(1) >= a.min_block_patches).all()
    loss_ref, y = data2vec_vision_forward(model, views, mask, a.top_k, a.loss_beta, 1 / math.sqrt(a.dim))
    loss, metrics = model(images, _ctx(model, seed=3))
    torch.testing.assert_close(loss.float(), loss_ref, rtol=1e-5, atol=1e-6)
    assert metrics["masked_share"] == pytest.approx(mask.float().mean().item())
    assert 0 < metrics["target_std"] < 2


def test_data2vec_block_masks_reach_the_ratio():
    mod, model, a = _model("data2vec", ["--batch-size", "256"])
    masks = model.make_masks(_ctx(model, 0, batch=512))
    share = masks.float().mean().item()
    assert 0.45 < share <= 0.6, share  # target int(16 · 0.6) = 9 of 16; a few images stop short


# ---------------------------------------------------------------------------------------
# I-JEPA vs ijepa src/train.py, src/models/vision_transformer.py
# ---------------------------------------------------------------------------------------
def apply_masks(x, masks):
    """ijepa src/masks/utils.py."""
    all_x = []
    for m in masks:
        all_x += [torch.gather(x, dim=1, index=m.unsqueeze(-1).repeat(1, 1, x.size(-1)))]
    return torch.cat(all_x, dim=0)


def repeat_interleave_batch(x, B, repeat):
    """ijepa src/utils/tensors.py."""
    N = len(x) // B
    return torch.cat([torch.cat([x[i * B:(i + 1) * B] for _ in range(repeat)], dim=0) for i in range(N)], dim=0)


def ijepa_forward(model, imgs, masks_enc, masks_pred):
    """ijepa train_step: forward_target, forward_context (encoder + VisionTransformerPredictor), loss_fn."""
    enc, pred, target = model.encoder, model.predictor, model.target_encoder.module
    with torch.no_grad():
        h = target.forward_features(imgs)
        h = F.layer_norm(h, (h.size(-1),))
        B = len(h)
        h = apply_masks(h, masks_pred)
        h = repeat_interleave_batch(h, B, repeat=len(masks_enc))
    # encoder(imgs, masks_enc)
    x = enc.patch_embed(imgs) + enc.pos_embed
    x = apply_masks(x, masks_enc)
    z = enc.norm(enc.blocks(x))
    # predictor(z, masks_enc, masks_pred)
    x = pred.embed(z)
    x_pos_embed = pred.pos_embed.repeat(B, 1, 1)
    x = x + apply_masks(x_pos_embed, masks_enc)
    _, N_ctxt, D = x.shape
    pos_embs = apply_masks(pred.pos_embed.repeat(B, 1, 1), masks_pred)
    pos_embs = repeat_interleave_batch(pos_embs, B, repeat=len(masks_enc))
    pred_tokens = pred.mask_token.view(1, 1, -1).repeat(pos_embs.size(0), pos_embs.size(1), 1)
    pred_tokens = pred_tokens + pos_embs
    x = x.repeat(len(masks_pred), 1, 1)
    x = torch.cat([x, pred_tokens], dim=1)
    for blk in pred.blocks:
        x = blk(x)
    x = pred.norm(x)[:, N_ctxt:]
    z = pred.proj(x)
    return F.smooth_l1_loss(z, h), z, h


def test_ijepa_step_matches_ijepa_train():
    import sslkern

    mod, model, a = _model("ijepa", IJEPA_LAYOUT)  # ijepa's own proportions: 8x8 grid, 4 targets
    with torch.no_grad():
        for p in model.target_encoder.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert model.grid == (8, 8) and model.encoder.num_prefix_tokens == 0
    torch.testing.assert_close(model.encoder.pos_embed.detach(), mae_sincos(a.dim, 8, False), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.predictor.pos_embed, mae_sincos(a.pred_dim, 8, False), rtol=0, atol=1e-6)
    images = ragged(6)
    views, _ = _same_draws(model, 5, images)
    masks = model.make_masks(_ctx(model, 5))
    masks_enc, masks_pred = masks.as_lists()
    assert len(masks_enc) == 1 and len(masks_pred) == a.num_targets
    for m in masks_enc:  # the context avoids every target block (allow_overlap=False)
        for t in masks_pred:
            assert not any(set(m[b].tolist()) & set(t[b].tolist()) for b in range(6))
    # token plumbing: sslkern.gather_tokens in ijepa's order equals apply_masks
    x = torch.randn(6, 64, 5)
    assert torch.equal(sslkern.gather_tokens(x, masks.targets, mask_major=True), apply_masks(x, masks_pred))
    assert torch.equal(sslkern.gather_tokens(x, masks.context[:, 0]), apply_masks(x, masks_enc))
    loss_ref, z_ref, h_ref = ijepa_forward(model, views, masks_enc, masks_pred)
    # the recipe's predictor rows are image-major (b·T + m); ijepa's are mask-major (m·B + b)
    ctx_ids, tgt_ids = masks.context[:, 0], masks.targets
    z = model.predictor(sslkern.patch.forward_masked(model.encoder, views, ctx_ids), ctx_ids, tgt_ids)
    perm = torch.arange(6 * a.num_targets).view(6, a.num_targets).T.reshape(-1)  # image-major row of mask-major row
    torch.testing.assert_close(z[perm], z_ref, rtol=1e-5, atol=1e-5)
    loss, metrics = model(images, _ctx(model, seed=5))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert metrics["target_tokens"] == tgt_ids.shape[2] and metrics["context_tokens"] == ctx_ids.shape[1]
    loss.backward()
    assert model.predictor.mask_token.grad.abs().sum() > 0 and model.encoder.pos_embed.grad is None
    assert all(p.grad is None for p in model.target_encoder.parameters())


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mae", "data2vec", "ijepa"])
def test_smoke_run_directory(tmp_path, name):
    out = str(tmp_path / name)
    res = _run(name, TINY[name] + ["--out", out, "--eval-every", "1"])
    assert res["step"] == 8
    encoders = ["encoder"] if name == "mae" else ["teacher", "student"]
    files = ["config.json", "metrics.jsonl", "checkpoint.safetensors", "loss.png", "eval.png", "summary.txt",
             "summary.json"] + [f"encoder_{e}.safetensors" for e in encoders] + ([] if name == "mae" else ["health.png"])
    for f in files:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    train = _rows(out)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert len(_rows(out, "eval")) == 1  # after epoch 1 (the end of epoch 2 is the final evaluation)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["method"] == name and s["steps"] == 8 and s["dataset"] == "digits"
    assert set(s["eval"]) == set(encoders) | {"random"} and all("probe" in v for v in s["eval"].values())
    assert s["knn_gain"] == pytest.approx(max(s["eval"][e]["knn"] for e in encoders) - s["eval"]["random"]["knn"], abs=0.01)
    if name == "mae":
        assert s["health"] == {} and not s["collapsed"]
    else:
        assert set(s["health"]) == {"target_std"} and s["health"]["target_std"]["final"] > 0.05
        assert s["collapsed"] is False and s["verdict"].startswith("not collapsed: target_std")
        assert all(0.99 <= r["momentum"] <= 1 for r in train) and all("target_std" in r for r in train)
    model = ckpt.load_exported_encoder(os.path.join(out, f"encoder_{encoders[0]}.safetensors"))
    n_tokens = (16 // 4) ** 2 + (0 if name == "ijepa" else 1)
    assert model.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, n_tokens, 32)


@pytest.mark.parametrize("name", ["mae", "data2vec", "ijepa"])
def test_reference_backend_gives_the_same_losses(tmp_path, name):
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = TINY[name] + ["--steps", "4", "--no-probe", "--eval-every", "0"]
    _run(name, args + ["--out", auto])
    _run(name, args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    np.testing.assert_allclose(a, b, rtol=1e-5)  # fused vs eager ops: fp32 sums in another order


@pytest.mark.parametrize("name, args, message", [
    ("mae", ["--mask-ratio", "1.0"], "--mask-ratio expected in (0, 1), got 1.0"),
    ("mae", ["--mask-ratio", "0.99"], "--mask-ratio 0.99 keeps no patch of the 16"),
    ("mae", ["--decoder-dim", "30", "--decoder-heads", "4"], "--decoder-dim 30 expected a multiple of --decoder-heads 4"),
    ("mae", ["--decoder-depth", "0"], "--decoder-depth expected a positive integer, got 0"),
    ("mae", ["--dim", "90", "--heads", "3"], "--dim expected a multiple of 4 (2-D sin-cos positions), got 90"),
    ("data2vec", ["--top-k", "5"], "--top-k expected in [1, --depth 4], got 5"),
    ("data2vec", ["--min-block-patches", "10"], "--min-block-patches expected in [1, 9] (the masked count), got 10"),
    ("data2vec", ["--loss-beta", "-1"], "--loss-beta expected >= 0, got -1.0"),
    ("data2vec", ["--layer-norm", "batch"], "invalid choice: 'batch'"),
    ("data2vec", ["--ema-end", "1.5"], "--ema-end expected in [0, 1], got 1.5"),
    ("ijepa", ["--target-scale", "0.15", "0.2", "--min-keep", "4"], "--target-scale 0.15 0.2 gives target blocks as small as 1x1 on the 4x4 grid, "
                                     "not more than --min-keep 4 tokens"),
    ("ijepa", ["--patch-size", "8"], "expected a grid of at least 4x4 for multi-block masks, got 2x2"),
    ("ijepa", ["--context-scale", "0.9", "0.5"], "--context-scale expected 0 < lo <= hi <= 1, got 0.9 0.5"),
    ("ijepa", ["--pred-heads", "3"], "--pred-dim 64 expected a multiple of --pred-heads 3"),
    ("ijepa", ["--num-targets", "0"], "--num-targets expected a positive integer, got 0"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, name, args, message):
    with pytest.raises(SystemExit) as e:
        _run(name, ["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_std_verdict_floor_and_slow_collapse():
    from sslkern.train.health import batch_std, std_verdict

    same = torch.randn(1, 5, 3).expand(8, 5, 3)  # every image the same features
    assert batch_std(same) == 0.0 and batch_std(torch.randn(64, 5, 3)) == pytest.approx(1.0, abs=0.15)
    assert std_verdict({"s": 0.01}, "s", 0.05)[0] is True
    collapsed, line = std_verdict({"s": 0.077}, "s", 0.05, initial=0.441)  # I-JEPA's first default (patch 2)
    assert collapsed and line.startswith("collapsing: s fell to 0.077 from 0.441")
    collapsed, line = std_verdict({"s": 0.548}, "s", 0.05, initial=0.69)  # data2vec's
    assert not collapsed and "0.79x" in line
    assert std_verdict({}, "s", 0.05) == (False, "s not logged")
