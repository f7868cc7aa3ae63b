"""Pieces of the shared loop: views, health figures, heads, results table, loop mechanics."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import sslkern
from sslkern.train import results
from sslkern.train.data import augment
from sslkern.train.health import distillation_health, distillation_verdict, embedding_std
from sslkern.train.loop import _clip
from sslkern.train.views import MultiCrop, dino_color, gaussian_blur, random_resized_crop


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------
def test_random_resized_crop_sizes_and_reproducibility():
    x = torch.randn(6, 3, 16, 16)
    a = random_resized_crop(x, torch.Generator().manual_seed(1), size=8, scale=(0.1, 0.3), flip_p=0.5)
    b = random_resized_crop(x, torch.Generator().manual_seed(1), size=8, scale=(0.1, 0.3), flip_p=0.5)
    assert a.shape == (6, 3, 8, 8) and torch.equal(a, b)
    # augment (data2vec 2.0) is the same warp at the input size without flips
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(augment(x, g1), random_resized_crop(x, g2, degrees=10.0))


def test_full_crop_is_identity_and_flip_mirrors():
    x = torch.randn(4, 1, 8, 8)
    same = random_resized_crop(x, torch.Generator(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    flipped = random_resized_crop(x, torch.Generator(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rgb", [False, True])
def test_views_are_identical_on_any_number_of_ranks(rgb):
    c = 3 if rgb else 1
    x = torch.rand(8, c, 16, 16)
    mean, std = torch.full((1, c, 1, 1), 0.4), torch.full((1, c, 1, 1), 0.2)
    mc = MultiCrop(16, 8, n_local=3)
    one_g, one_l = mc(x, torch.Generator().manual_seed(7), mean=mean, std=std)
    for rank in range(2):
        g, l = mc(x[rank::2], torch.Generator().manual_seed(7), mean=mean, std=std, rows=(rank, 2))
        for v, w in zip(g + l, one_g + one_l):
            torch.testing.assert_close(v, w[rank::2], rtol=0, atol=1e-6)
    assert [v.shape[-1] for v in one_g + one_l] == [16, 16, 8, 8, 8]


def test_color_ops_keep_range_and_grey_data_gets_none():
    x = torch.rand(16, 3, 12, 12)
    y = dino_color(x, torch.Generator().manual_seed(0), (0, 1), blur_p=1.0, solarize_p=0.5)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)
    with pytest.raises(ValueError, match="mean and std"):
        MultiCrop(12, 6)(x, torch.Generator())
    grey = torch.rand(4, 1, 12, 12)  # single channel: crops only (no colour, no flips)
    g, _ = MultiCrop(12, 6, n_local=0, global_scale=(1, 1), ratio=(1, 1))(grey, torch.Generator())
    torch.testing.assert_close(g[0], grey, atol=1e-5, rtol=0)


def test_gaussian_blur_matches_a_dense_convolution():
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64)
    sigma = torch.tensor([0.7, 1.3], dtype=torch.float64)
    y = gaussian_blur(x, sigma)
    r = math.ceil(3 * 1.3)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    for i in range(2):
        k1 = torch.exp(-0.5 * (t / sigma[i]) ** 2)
        k1 = k1 / k1.sum()
        k2 = torch.outer(k1, k1).expand(3, 1, -1, -1)
        ref = F.conv2d(F.pad(x[i:i + 1], (r, r, r, r), mode="reflect"), k2, groups=3)
        torch.testing.assert_close(y[i:i + 1], ref)
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(2, dtype=torch.float64)), x)  # σ→0: identity


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
