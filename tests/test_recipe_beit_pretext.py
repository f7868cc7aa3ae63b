"""BEiT and the pretext-task recipes (rotation, jigsaw) on the shared loop.

BEiT's step is checked against a transcription, written here, of unilm ``beit/``
``modeling_pretrain.py`` (``forward_features`` / ``forward``) and ``engine_for_pretraining.py``
(labels = tokens at the masked positions, ``nn.CrossEntropyLoss``) on the recipe's weights and
the same random draws; the pretext tasks against direct constructions of their inputs; then
a few steps end to end, ``--backend reference`` and the options' errors.
"""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipe_helpers import load_recipe, ragged, step_ctx, tiny_dataset
from sslkern.train import parse_args
from sslkern.train.logging import RunLogger

COMMON = ["--dim", "32", "--heads", "2", "--depth", "2", "--batch-size", "256", "--epochs", "2", "--quiet", "--threads", "1"]
TINY = {  # 1,257 training digits // 256 = 4 steps per epoch, 8 steps in 2 epochs
    "beit": COMMON + ["--vocab-size", "16", "--kmeans-iters", "5"],
    "rotation": COMMON + ["--task", "rotation", "--head-dim", "16"],
    "jigsaw": COMMON + ["--task", "jigsaw", "--head-dim", "16"],
}
SCRIPT = {"beit": "beit", "rotation": "pretext", "jigsaw": "pretext"}
DATA = tiny_dataset()


def _run(name, argv):
    return load_recipe(SCRIPT[name]).main(argv)


def _rows(out, kind="train"):
    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == kind]


def _model(name, tmp_path, extra=()):
    mod = load_recipe(SCRIPT[name])
    cls = {"beit": "BEiT", "rotation": "Rotation", "jigsaw": "Jigsaw"}[name]
    cls = getattr(mod, cls)
    _, a = parse_args(cls, TINY[name] + ["--out", str(tmp_path / "m")] + list(extra))
    torch.manual_seed(0)
    return mod, cls(a, DATA), a


def _ctx(model, seed=7, batch=6):
    return step_ctx(model, seed, batch)


# ---------------------------------------------------------------------------------------
# BEiT vs unilm beit/
# ---------------------------------------------------------------------------------------
def beit_forward(model, samples, bool_masked_pos, codebook, p, context=1):
    """modeling_pretrain VisionTransformerForMaskedImageModeling.forward(return_all_tokens=False) and the
    engine's loss, with the recipe's weights; the tokenizer's ``get_codebook_indices`` = nearest centroid
    of the patch (context 0) or of the zero-padded window of (2·context + 1)² patches centred on it."""
    vit, mim = model.model.vit, model.model
    x = vit.patch_embed(samples)
    batch_size, seq_len, _ = x.size()
    cls_tokens = vit.cls_token.expand(batch_size, -1, -1)
    mask_token = mim.mask_token.expand(batch_size, seq_len, -1)
    w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)
    x = x * (1 - w) + mask_token * w
    x = torch.cat((cls_tokens, x), dim=1)
    x = x + vit.pos_embed
    for blk in vit.blocks:
        x = blk(x)
    x = vit.norm(x)[:, 1:]
    outputs = mim.lm_head(x[bool_masked_pos])
    b, c, h, w_ = samples.shape
    if context == 0:
        patches = samples.reshape(b, c, h // p, p, w_ // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    else:
        k = (2 * context + 1) * p
        win = torch.nn.functional.pad(samples, (context * p,) * 4).unfold(2, k, p).unfold(3, k, p)  # (b, c, gh, gw, k, k)
        patches = win.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * k * k)
    input_ids = torch.cdist(patches, codebook.expand(b, -1, -1)).argmin(-1)
    labels = input_ids[bool_masked_pos]
    return torch.nn.CrossEntropyLoss()(input=outputs, target=labels), outputs, labels


def test_beit_step_matches_modeling_pretrain(tmp_path):
    import sslkern

    mod, model, a = _model("beit", tmp_path)
    assert model.grid == (4, 4) and model.tokenizer.num_codes == 16
    # BEiT init: truncated normal (±0.02), output projections of block l scaled by 1/sqrt(2l)
    vit = model.model.vit
    assert float(model.model.lm_head.weight.detach().abs().max()) <= 0.02 and float(model.model.mask_token.detach().abs().max()) <= 0.02
    assert vit.blocks[1].attn.proj.weight.abs().max() <= 0.02 / 2 + 1e-7
    images = ragged(6)
    views, = _ctx(model).views(images, model.view)
    mask = sslkern.masks.block_mask(6, (4, 4), 0.4, min_num_patches=2, max_num_patches=6,
                                    generator=torch.Generator().manual_seed(7)).mask
    # MaskingGenerator semantics: at most 6 of 16 patches per image, at least one block of >= 2
    assert (mask.sum(1) <= 6).all() and (mask.sum(1) >= 2).all()
    assert model.tokenizer.context == 1 and model.tokenizer.codebook.shape[1] == 12 * 12
    loss_ref, out_ref, labels_ref = beit_forward(model, views, mask, model.tokenizer.codebook, 4)
    loss, metrics = model(images, _ctx(model, seed=7))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert 0 < loss < 2 * math.log(16)
    acc = (out_ref.argmax(-1) == labels_ref).float().mean()
    assert metrics["mlm_acc"] == pytest.approx(float(acc), abs=1e-6)  # fp32 metric vs fp64 recount
    majority = torch.bincount(labels_ref, minlength=16).max() / labels_ref.numel()
    assert metrics["mlm_gain"] == pytest.approx(float(acc - majority), abs=1e-6)
    assert 0 < metrics["pred_entropy_frac"] <= 1 and 1 <= metrics["token_perplexity"] <= 16
    loss.backward()
    assert model.model.mask_token.grad.abs().sum() > 0 and model.tokenizer.codebook.grad is None


def test_beit_patch_only_tokens_match_modeling_pretrain(tmp_path):
    """--tokenizer-context 0 (each token from its own patch's pixels) against the same transcription."""
    import sslkern

    _, model, _ = _model("beit", tmp_path, ["--tokenizer-context", "0"])
    assert model.tokenizer.codebook.shape[1] == 16
    images = ragged(6)
    views, = _ctx(model).views(images, model.view)
    mask = sslkern.masks.block_mask(6, (4, 4), 0.4, min_num_patches=2, max_num_patches=6,
                                    generator=torch.Generator().manual_seed(7)).mask
    loss_ref, _, _ = beit_forward(model, views, mask, model.tokenizer.codebook, 4, context=0)
    loss, _ = model(images, _ctx(model, seed=7))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)


def test_beit_tokenizer_cached_in_run_directory_and_loaded(tmp_path):
    from sslkern.train.tokenizer import PatchKMeansTokenizer

    mod, model, a = _model("beit", tmp_path)
    path = tmp_path / "m" / "tokenizer.safetensors"
    assert path.exists()
    tok, meta = PatchKMeansTokenizer.load(str(path))
    assert torch.equal(tok.codebook, model.tokenizer.codebook) and meta["dataset"] == "fake" and meta["seed"] == 0
    # the cache is reused (same codebook even if the file's codebook is changed), refitted when settings change
    tok.codebook.add_(1.0)
    tok.save(str(path), **{k: meta[k] for k in ("dataset", "train_images", "seed", "iters", "image_size")})
    _, again, _ = _model("beit", tmp_path)
    assert torch.equal(again.tokenizer.codebook, tok.codebook)
    _, other_seed, _ = _model("beit", tmp_path, ["--seed", "1"])
    assert not torch.equal(other_seed.tokenizer.codebook, tok.codebook)
    # --tokenizer loads another file; a patch-size mismatch is refused
    other = PatchKMeansTokenizer(7, 4, 1)
    other.fit(torch.randn(40, 1, 16, 16), torch.Generator().manual_seed(0))
    other.save(str(tmp_path / "t7.safetensors"))
    _, m7, _ = _model("beit", tmp_path, ["--tokenizer", str(tmp_path / "t7.safetensors")])
    assert m7.tokenizer.num_codes == 7 and m7.model.lm_head.out_features == 7
    PatchKMeansTokenizer(7, 2, 1).save(str(tmp_path / "p2.safetensors"))
    with pytest.raises(ValueError, match="patch size 2"):
        _model("beit", tmp_path, ["--tokenizer", str(tmp_path / "p2.safetensors")])


def test_beit_verdict():
    mod = load_recipe("beit")
    m = SimpleNamespace(tokenizer=SimpleNamespace(num_codes=64))
    v = lambda h: mod.BEiT.verdict(m, h)  # noqa: E731
    assert v({"mlm_gain": 0.3, "pred_perplexity": 40, "token_perplexity": 50})[0] is False
    c, line = v({"mlm_gain": 0.3, "pred_perplexity": 1.2, "token_perplexity": 50})
    assert c and "one token" in line
    c, line = v({"mlm_gain": 0.0, "pred_perplexity": 10, "token_perplexity": 50})
    assert c and "most common" in line and "50 of 64" in line


# ---------------------------------------------------------------------------------------
# Pretext tasks
# ---------------------------------------------------------------------------------------
def test_rotation_inputs_and_loss(tmp_path):
    mod, model, a = _model("rotation", tmp_path)
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    r, labels = mod.rotate4(x)
    assert labels.tolist() == [0, 1, 2, 3] * 2
    assert torch.equal(r[1], x[0].rot90(1, (1, 2))) and torch.equal(r[6], x[1].rot90(2, (1, 2)))
    assert torch.equal(r[3, 0, 0, 0], x[0, 0, -1, 0]) and torch.equal(r[3, 0, 0, -1], x[0, 0, 0, 0])  # 270° ccw
    images = ragged(5)
    views, = _ctx(model, batch=5).views(images, model.view)
    rot, lab = mod.rotate4(views)
    feats = model.encoder.forward_features(rot)[:, 1:].mean(1)
    ref = F.cross_entropy(model.head(feats), lab)
    loss, metrics = model(images, _ctx(model, batch=5))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert 0 <= metrics["pretext_acc"] <= 1 and metrics["feature_std"] > 0


def test_jigsaw_inputs_and_loss(tmp_path):
    mod, model, a = _model("jigsaw", tmp_path)
    assert model.perms.shape == (24, 4) and len({tuple(p) for p in model.perms.tolist()}) == 24
    assert model.chance == pytest.approx(1 / 24)
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    t = mod.tiles(x, 2)
    assert t.shape == (1, 4, 1, 2, 2) and t[0, 1, 0].tolist() == [[2, 3], [6, 7]] and t[0, 2, 0].tolist() == [[8, 9], [12, 13]]
    n = mod.normalise_tiles(torch.randn(3, 4, 1, 8, 8) * 3 + 2)
    torch.testing.assert_close(n.mean(dim=(2, 3, 4)), torch.zeros(3, 4), atol=1e-5, rtol=0)
    # the step by hand: same view, same permutation draw
    images = ragged(5)
    views, = _ctx(model, batch=5).views(images, model.view)
    labels = torch.randint(24, (5,), generator=torch.Generator().manual_seed(7))
    tl = mod.normalise_tiles(mod.tiles(views, 2))
    shuffled = torch.stack([tl[b, model.perms[labels[b]]] for b in range(5)])   # slot j holds tile perm[j]
    feats = torch.stack([model.encoder.forward_features(shuffled[:, j])[:, 1:].mean(1) for j in range(4)], 1)
    assert feats.shape == (5, 4, 32)
    ref = F.cross_entropy(model.head(feats.reshape(5, -1)), labels)
    loss, metrics = model(images, _ctx(model, batch=5))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # more tiles: Noroozi's maximal-Hamming selection, all distinct, min distance large
    p9 = mod.permutation_set(6, size=30)  # the 3x3 grid uses 9 (362,880 candidates: seconds)
    assert p9.shape == (30, 6) and len({tuple(p) for p in p9.tolist()}) == 30
    d = (p9[:, None] != p9[None]).sum(-1) + 100 * torch.eye(30, dtype=torch.long)
    assert int(d.min()) >= 4


def test_pretext_verdict():
    mod = load_recipe("pretext")
    rot = SimpleNamespace(chance=0.25)
    assert mod.Pretext.verdict(rot, {"pretext_acc": 0.9, "feature_std": 0.2})[0] is False
    c, line = mod.Pretext.verdict(rot, {"pretext_acc": 0.27, "feature_std": 0.2})
    assert c and "chance 0.250" in line
    c, line = mod.Pretext.verdict(rot, {"pretext_acc": 0.9, "feature_std": 0.001})
    assert c and "same feature" in line


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["beit", "rotation", "jigsaw"])
def test_smoke_run_directory(tmp_path, name):
    out = str(tmp_path / name)
    res = _run(name, TINY[name] + ["--out", out, "--eval-every", "1", "--no-probe"])
    assert res["step"] == 8
    files = ["config.json", "metrics.jsonl", "checkpoint.safetensors", "summary.json", "encoder_encoder.safetensors",
             "health.png"] + (["tokenizer.safetensors"] if name == "beit" else [])
    for f in files:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    train = _rows(out)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    s = json.load(open(os.path.join(out, "summary.json")))
    method = "beit" if name == "beit" else f"pretext-{name}"
    assert s["method"] == method and s["steps"] == 8 and set(s["eval"]) == {"encoder", "random"}
    health = {"mlm_gain", "pred_perplexity", "token_perplexity"} if name == "beit" else {"pretext_acc", "feature_std"}
    assert set(s["health"]) == health and isinstance(s["verdict"], str) and s["verdict"]
    assert os.path.basename(json.load(open(os.path.join(out, "config.json")))["out"]) == name


def test_pretext_default_run_names_differ():
    mod = load_recipe("pretext")
    from sslkern.train.loop import build_parser
    assert build_parser(mod.Rotation).parse_args([]).out == "runs/pretext-rotation"
    assert build_parser(mod.Jigsaw).parse_args([]).out == "runs/pretext-jigsaw"


@pytest.mark.parametrize("name", ["beit", "rotation", "jigsaw"])
def test_reference_backend_gives_the_same_losses(tmp_path, name):
    auto, ref = str(tmp_path / "auto"), str(tmp_path / "ref")
    args = TINY[name] + ["--steps", "4", "--no-probe", "--eval-every", "0"]
    _run(name, args + ["--out", auto])
    _run(name, args + ["--out", ref, "--backend", "reference"])
    a, b = [r["loss"] for r in _rows(auto)], [r["loss"] for r in _rows(ref)]
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("name, args, message", [
    ("beit", ["--mask-ratio", "1.0"], "--mask-ratio expected in (0, 1), got 1.0"),
    ("beit", ["--mask-ratio", "0.05"], "--mask-ratio 0.05 masks no patch of the 16"),
    ("beit", ["--min-block-patches", "7"], "--min-block-patches expected in [1, 6] (the masked count), got 7"),
    ("beit", ["--vocab-size", "1"], "--vocab-size expected >= 2, got 1"),
    ("beit", ["--kmeans-iters", "0"], "--kmeans-iters expected a positive integer, got 0"),
    ("beit", ["--tokenizer-context", "-1"], "--tokenizer-context expected >= 0, got -1"),
    ("beit", ["--layer-scale", "-0.1"], "--layer-scale expected >= 0 (0 = none), got -0.1"),
    ("beit", ["--tokenizer", "/nonexistent/tok.safetensors"], "--tokenizer '/nonexistent/tok.safetensors' does not exist"),
    ("rotation", ["--task", "colour"], "invalid choice: 'colour'"),
    ("rotation", ["--head-dim", "0"], "--head-dim expected a positive integer, got 0"),
    ("jigsaw", ["--task", "jigsaw", "--jigsaw-grid", "4"], "--jigsaw-grid expected 2 or 3, got 4"),
    ("jigsaw", ["--task", "jigsaw", "--jigsaw-grid", "3"], "--jigsaw-grid 3: tiles of --image-size 16 / 3 expected"),
    ("jigsaw", ["--task", "jigsaw", "--image-size", "24", "--patch-size", "8"], "tiles of --image-size 24 / 2 expected a whole multiple of --patch-size 8"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, name, args, message):
    with pytest.raises(SystemExit) as e:
        _run(name, ["--out", str(tmp_path / "x"), "--quiet"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
