"""Pieces of the shared loop: views, health figures, heads, results table, loop mechanics."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import sslkern
from sslkern.train import results
from sslkern.train.health import distillation_health, distillation_verdict, embedding_std
from sslkern.train import views as train_views
from sslkern.train.context import StepContext
from sslkern.train.loop import _clip

from recipe_helpers import digits_like, ragged


# ---------------------------------------------------------------------------------------
# The step context: per-sample draws and views, the same on any number of ranks
# ---------------------------------------------------------------------------------------
def _ctx(seed, batch, rank=0, world=1, mean=(0.5,), std=(0.25,)):
    return StepContext(3, 0, 8, 4, torch.Generator().manual_seed(seed), batch, rank, world,
                       host_generator=torch.Generator().manual_seed(seed), mean=mean, std=std)


def _spec_args(**kw):
    a = SimpleNamespace(image_size=16, local_size=8, local_crops=3, global_scale=(0.5, 1.0), local_scale=(0.1, 0.25),
                        degrees=10.0, crop_scale=(0.3, 1.0), flip_p=None)
    a.__dict__.update(kw)
    return a


@pytest.mark.parametrize("channels", [1, 3])
def test_views_masks_and_noise_are_identical_on_any_number_of_ranks(channels):
    data = digits_like(channels)
    specs = train_views.multicrop(_spec_args(), data, inverted_blur=False)
    images = ragged(8, size=12, channels=channels)
    one = _ctx(7, 8, mean=data.mean, std=data.std)
    views = one.views(images, specs)
    masks = one.per_sample(sslkern.masks.random_mask, 16, 0.5, num_masks=2)
    noise, ints = one.randn(3, 2), one.randint(5)
    assert [v.shape for v in views] == [(8, channels, 16, 16)] * 2 + [(8, channels, 8, 8)] * 3
    for rank in range(2):
        part = ragged(8, size=12, channels=channels)  # the same images; keep this rank's rows
        from sslkern.data.loader import pack
        rows = pack([part_image.numpy() for part_image in (part.image(i) for i in range(rank, 8, 2))], [0] * 4,
                    channels).images()
        ctx = _ctx(7, 8, rank, 2, mean=data.mean, std=data.std)
        for v, w in zip(ctx.views(rows, specs), views):
            torch.testing.assert_close(v, w[rank::2], rtol=0, atol=1e-6)
        m = ctx.per_sample(sslkern.masks.random_mask, 16, 0.5, num_masks=2)
        assert torch.equal(m.ids_keep, masks.ids_keep[rank::2]) and torch.equal(m.mask, masks.mask[rank::2])
        assert torch.equal(ctx.randn(3, 2), noise[rank::2]) and torch.equal(ctx.randint(5), ints[rank::2])


def test_recipe_views_follow_the_data():
    grey, rgb = digits_like(1), digits_like(3, in_memory=False)
    g = train_views.multicrop(_spec_args(), grey)
    assert all(s.flip_p == 0 and s.jitter_p == 0 and s.blur_p == 0 and s.solarize_p == 0 for s in g)
    assert all(not s.integer_boxes and s.degrees == 10.0 for s in g)
    c = train_views.multicrop(_spec_args(image_size=224, local_size=96, degrees=0.0), rgb)
    assert [s.size for s in c] == [224, 224, 96, 96, 96] and all(s.integer_boxes for s in c)
    assert [s.blur_p for s in c[:2]] == [1.0, 0.1] and [s.solarize_p for s in c[:2]] == [0.0, 0.2]
    assert c[0].blur_sigma == pytest.approx((0.1, 2.0))  # DINO's σ at 224 pixels
    small = train_views.two_views(_spec_args(image_size=32), rgb)
    assert small[0].blur_sigma == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))  # scaled with the crop


# ---------------------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------------------
def test_distillation_health_extremes():
    k = 64
    center = torch.zeros(k)
    uniform = distillation_health(torch.zeros(10, k), center, 0.04, torch.tensor(math.log(k)))
    assert uniform["teacher_entropy_frac"] == pytest.approx(1.0) and uniform["kl"] == pytest.approx(0, abs=1e-5)
    one = torch.zeros(10, k)
    one[:, 3] = 100.0  # every image on prototype 3
    h = distillation_health(one, center, 0.04, torch.tensor(2.0))
    assert h["teacher_entropy_frac"] < 1e-3 and h["batch_entropy_frac"] < 1e-3 and h["kl"] == pytest.approx(2.0, abs=1e-3)
    spread = torch.full((k, k), -50.0).fill_diagonal_(50.0)  # each image its own prototype
    h = distillation_health(spread, center, 0.04, torch.tensor(1.0))
    assert h["teacher_entropy_frac"] < 1e-3 and h["batch_entropy_frac"] == pytest.approx(1.0)
    assert distillation_verdict(uniform)[0] and distillation_verdict(h)[0] is False
    assert "one prototype" in distillation_verdict(distillation_health(one, center, 0.04, torch.tensor(2.0)))[1]


def test_embedding_std():
    assert embedding_std(torch.randn(4096, 32)) == pytest.approx(1.0, abs=0.05)
    assert embedding_std(torch.ones(64, 32) + 1e-4 * torch.randn(64, 32)) < 0.01


# ---------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------
def test_dino_head_matches_torch_weight_norm_and_dino_names():
    head = sslkern.nn.DINOHead(16, 40, use_bn=True, nlayers=3, hidden_dim=24, bottleneck_dim=8)
    names = set(head.state_dict())
    assert {"mlp.0.weight", "mlp.1.running_mean", "mlp.3.weight", "mlp.6.bias", "last_layer.weight_g",
            "last_layer.weight_v"} <= names
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer: gain fixed to 1
    lin = torch.nn.Linear(8, 40, bias=False)
    lin.weight.data.copy_(head.last_layer.weight_v.data)
    wn = torch.nn.utils.parametrizations.weight_norm(lin)
    with torch.no_grad():
        wn.parametrizations.weight.original0.fill_(1.0)
    z = F.normalize(torch.randn(5, 8), dim=-1)
    torch.testing.assert_close(head.last_layer(z), wn(z))
    logits, zb = head(torch.randn(7, 16), return_bottleneck=True)
    assert logits.shape == (7, 40) and torch.allclose(zb.norm(dim=-1), torch.ones(7))
    assert logits.abs().max() <= 1 + 1e-5  # unit prototypes and unit features: cosine logits


def test_global_batchnorm_is_batchnorm_in_one_process():
    bn, ref = sslkern.nn.GlobalBatchNorm1d(6), torch.nn.BatchNorm1d(6)
    x = torch.randn(9, 6)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_multicrop_wrapper_groups_by_resolution():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2, num_classes=0,
                            dynamic_img_size=True)
    wrap = sslkern.nn.MultiCropWrapper(vit, torch.nn.Identity(), "mean").eval()
    crops = [torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16), torch.randn(3, 1, 8, 8)]
    out = wrap(crops)
    each = torch.cat([vit.forward_features(c)[:, 1:].mean(1) for c in crops])
    torch.testing.assert_close(out, each, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pool expected"):
        sslkern.nn.MultiCropWrapper(vit, torch.nn.Identity(), "max")


# ---------------------------------------------------------------------------------------
# Loop mechanics
# ---------------------------------------------------------------------------------------
def test_per_parameter_clipping_follows_dino():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    _clip([a, b], 1.0, "per-param")
    assert a.grad.norm() == pytest.approx(1.0, rel=1e-5) and torch.allclose(b.grad, torch.tensor([0.3, 0.4]))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    _clip([a, b], 1.0, "global")
    assert torch.cat([a.grad, b.grad]).norm() == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------------------------------
# Results table
# ---------------------------------------------------------------------------------------
def _summary(d, method, seed, knn, random_knn):
    os.makedirs(d, exist_ok=True)
    s = {"method": method, "title": method.upper(), "dataset": "digits", "seed": seed, "steps": 720, "epochs": 80,
         "world_size": 1, "backend": "auto", "train_s": 100.0 + seed, "total_s": 110.0,
         "eval": {"teacher": {"knn": knn, "probe": 95.0}, "student": {"knn": knn + 1, "probe": 96.0},
                  "random": {"knn": random_knn, "probe": 80.0}},
         "knn_gain": knn + 1 - random_knn, "health": {"teacher_entropy_frac": {"final": 0.25, "worst": 0.3, "bad": "high"}},
         "collapsed": False, "verdict": "teacher: not collapsed"}
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(s, f)


def test_results_table_groups_seeds_and_rewrites_the_readme(tmp_path, capsys):
    _summary(tmp_path / "dino_s0", "dino", 0, 80.0, 44.0)
    _summary(tmp_path / "dino_s1", "dino", 1, 82.0, 44.0)
    _summary(tmp_path / "ibot", "ibot", 0, 70.0, 43.0)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.BEGIN}\nold table\n{results.END}\nrest\n")
    text = results.main([str(tmp_path / "dino_s0"), str(tmp_path / "dino_s1"), str(tmp_path / "ibot"),
                         "--readme", str(readme)])
    rows = [r for r in text.splitlines() if r.startswith("| DINO") or r.startswith("| IBOT")]
    assert len(rows) == 2
    assert "0, 1" in rows[0] and "81.0 (80.0 / 82.0)" in rows[0] and "38.0 (37.0 / 39.0)" in rows[0]
    body = readme.read_text()
    assert body.startswith("intro\n") and body.endswith("rest\n") and "old table" not in body and rows[1] in body
    with pytest.raises(SystemExit):
        results.main([str(tmp_path / "nothing-here")])
