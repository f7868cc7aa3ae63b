"""``--preset paper``: every recipe's presets parse, name only the recipe's options and pass its
checks; the tables (``python -m sslkern.train.presets``, ``python tools/preset_tables.py``);
the options the presets brought (crop options of the one-crop recipes, data2vec's layer scale,
data2vec 2.0's EMA anneal length)."""
import os
import pathlib
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

import preset_tables  # tools/preset_tables.py (tests/conftest.py puts tools/ on sys.path)
from recipe_helpers import ROOT, digits_like, load_recipe
from sslkern.train import Method
from sslkern.train.loop import parse_args
from sslkern.train.presets import preset_table, recipe_methods, unknown_options

METHODS = recipe_methods()
WITH_PRESETS = [(script, cls) for script, cls in METHODS if cls.presets]
EXPECTED = {"beit", "byol", "data2vec", "data2vec2", "dino", "ibot", "ijepa", "mae", "maskfeat", "moco",
            "pretext-rotation", "pretext-jigsaw", "relvit", "simclr", "simsiam", "cpc", "cl_mim"}
ENV = {**os.environ, "PYTHONPATH": ROOT}


def _argv(script, cls, name):
    return (["--task", cls.task] if script == "pretext" else []) + ["--preset", name]


def test_every_recipe_of_the_task_has_a_paper_preset():
    names = {cls.name for _, cls in WITH_PRESETS}
    assert EXPECTED <= names, EXPECTED - names
    for _, cls in WITH_PRESETS:
        assert "paper" in cls.presets, cls.name
        for name, preset in cls.presets.items():
            doc = preset.get("_doc", "")
            assert len(doc) > 40, (cls.name, name, doc)
            assert preset.get("model", "").startswith("vit_"), (cls.name, name)


@pytest.mark.parametrize("script,cls", WITH_PRESETS, ids=[cls.name for _, cls in WITH_PRESETS])
def test_presets_name_only_options_and_parse(script, cls):
    assert unknown_options(cls) == {}
    for name, preset in cls.presets.items():
        _, a = parse_args(cls, _argv(script, cls, name))  # the recipe's checks run too (SystemExit on a bad value)
        for key, value in preset.items():
            if key.startswith("_"):
                continue
            assert _plain(getattr(a, key)) == _plain(value), (cls.name, key, getattr(a, key), value)
        # the timm name sets the ViT; the image size is a whole number of patches
        assert a.image_size % a.patch_size == 0 and a.dim % a.heads == 0
        # a flag given with the preset still wins
        _, b = parse_args(cls, _argv(script, cls, name) + ["--batch-size", "8", "--epochs", "2"])
        assert (b.batch_size, b.epochs) == (8, 2) and b.lr == a.lr


@pytest.mark.parametrize("script,cls", WITH_PRESETS, ids=[cls.name for _, cls in WITH_PRESETS])
def test_defaults_do_not_depend_on_the_preset(script, cls):
    """Without ``--preset`` every option keeps the recipe's digits default."""
    _, a = parse_args(cls, ["--task", cls.task] if script == "pretext" else [])
    assert a.preset is None and a.model is None
    for name, preset in cls.presets.items():
        changed = [k for k, v in preset.items() if not k.startswith("_") and _plain(getattr(a, k)) != _plain(v)]
        assert len(changed) >= 3, (cls.name, name, changed)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


class _Toy(Method):
    name, title = "toy", "Toy"
    presets = {"paper": {"epochs": 3, "not_an_option": 1, "_doc": "toy"}}

    @staticmethod
    def add_arguments(g):
        g.add_argument("--width", type=int, default=4)
        g.add_argument("--no-bias", dest="bias", action="store_false")


def test_an_unknown_preset_key_is_named():
    assert unknown_options(_Toy) == {"paper": ["not_an_option"]}
    with pytest.raises(ValueError, match="toy: presets name options the recipe does not have.*not_an_option"):
        preset_table(_Toy)


def test_table_rows_switches_and_docs():
    class Toy(_Toy):
        presets = {"paper": {"epochs": 3, "width": 8, "bias": False, "crop": (0.2, 1.0), "_doc": "the toy paper"},
                   "small": {"width": 2, "_doc": "a smaller one"}}

        @staticmethod
        def add_arguments(g):
            _Toy.add_arguments(g)
            g.add_argument("--crop", type=float, nargs=2, default=(0.5, 1.0))

    lines = preset_table(Toy).splitlines()
    assert lines[0] == "| option | digits default | `--preset paper` | `--preset small` |"
    assert "| `--epochs` | 70 | 3 | 70 |" in lines          # a preset without the key shows the default
    assert "| `--width` | 4 | 8 | 2 |" in lines
    assert "| `--no-bias` | – | given | – |" in lines        # a switch: given or not
    assert "| `--crop` | 0.5 1 | 0.2 1 | 0.5 1 |" in lines
    assert "`paper`: the toy paper" in lines and "`small`: a smaller one" in lines


def test_print_one_recipe_table():
    out = subprocess.run([sys.executable, "-m", "sslkern.train.presets", "--print", "mae"], env=ENV, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("MAE\n") and "| `--model` | – | vit_base_patch16_224 |" in out and "`paper`: MAE" in out
    bad = subprocess.run([sys.executable, "-m", "sslkern.train.presets", "--print", "nope"], env=ENV, cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--print 'nope'" in bad.stderr


def test_the_docs_tables_are_current():
    """``python tools/preset_tables.py --check`` passes on the repository (run the tool after
    changing a preset)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preset_tables.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tool_writes_checks_and_keeps_the_rest_of_a_doc(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(os.path.join(ROOT, "docs", "recipes", "mae.md"), docs / "mae.md")
    (docs / "simclr.md").write_text("# SimCLR\n\nintro\n")                       # no markers yet
    (docs / "moco.md").write_text(f"# MoCo\n\n{preset_tables.BEGIN}\nold table\n{preset_tables.END}\n\ntail\n")
    recipes_dir = pathlib.Path(ROOT) / "recipes"
    assert preset_tables.update(docs, recipes_dir, check=True) == [docs / "moco.md", docs / "simclr.md"]
    assert (docs / "simclr.md").read_text() == "# SimCLR\n\nintro\n"           # --check writes nothing
    assert preset_tables.main(["--check", "--docs", str(docs)]) == 1
    assert preset_tables.main(["--docs", str(docs)]) == 0
    assert preset_tables.main(["--check", "--docs", str(docs)]) == 0
    moco = (docs / "moco.md").read_text()
    assert moco.startswith("# MoCo\n\n") and moco.endswith(f"{preset_tables.END}\n\ntail\n")
    assert "old table" not in moco and "| `--temperature` | 0.2 | 0.2 |" in moco
    simclr = (docs / "simclr.md").read_text()
    assert simclr.startswith("# SimCLR\n\nintro\n\n## Published settings") and simclr.count(preset_tables.BEGIN) == 1
    assert preset_tables.update(docs, recipes_dir, check=False) == []            # idempotent
    (docs / "moco.md").write_text(f"{preset_tables.END}\n{preset_tables.BEGIN}\n")
    with pytest.raises(SystemExit, match="moco.md"):
        preset_tables.update(docs, recipes_dir, check=False)


def test_tool_titles_each_method_of_a_script():
    text = preset_tables.tables(pathlib.Path(ROOT) / "recipes")["pretext"]
    assert "**Pretext: rotation**" in text and "**Pretext: jigsaw**" in text


# --- the options the presets brought -----------------------------------------------------------
@pytest.mark.parametrize("name", ["mae", "beit", "data2vec", "data2vec2", "ijepa", "maskfeat", "relvit", "pretext"])
def test_one_crop_recipes_crop_options(name):
    from sslkern.train.views import single_view

    mod = load_recipe(name)
    cls = mod.Rotation if name == "pretext" else next(
        c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, Method) and c.__module__ == mod.__name__)
    _, a = parse_args(cls, [])
    assert (tuple(a.crop_scale), a.degrees, a.flip_p) == ((0.5, 1.0), 10.0, None)  # the view of before
    rgb = SimpleNamespace(**{**vars(digits_like(3)), "in_memory": False})
    default = single_view(SimpleNamespace(image_size=16), rgb)[0]
    assert single_view(a, rgb)[0] == default
    _, b = parse_args(cls, ["--crop-scale", "0.2", "1", "--degrees", "0", "--flip-p", "0"])
    (spec,) = single_view(b, rgb)
    assert (tuple(spec.scale), spec.degrees, spec.flip_p) == ((0.2, 1.0), 0.0, 0.0)
    for bad, message in ((["--crop-scale", "0", "1"], "--crop-scale expected 0 < lo <= hi <= 1"),
                         (["--degrees", "-1"], "--degrees expected >= 0"), (["--flip-p", "2"], "--flip-p expected")):
        with pytest.raises(SystemExit):
            parse_args(cls, bad)


def test_data2vec_layer_scale(capsys):
    import torch

    cls = load_recipe("data2vec").Data2Vec
    _, a = parse_args(cls, ["--layer-scale", "1e-4"])
    model = cls(a, digits_like())
    gammas = [m.gamma for m in model.student.modules() if type(m).__name__ == "LayerScale"]
    assert len(gammas) == 2 * a.depth and all(torch.all(g == 1e-4) for g in gammas)
    _, a0 = parse_args(cls, [])
    assert not [m for m in cls(a0, digits_like()).modules() if type(m).__name__ == "LayerScale"]
    with pytest.raises(SystemExit):
        parse_args(cls, ["--layer-scale", "-1"])
    assert "--layer-scale expected >= 0" in capsys.readouterr().err


def test_data2vec2_ema_anneal_epochs(capsys):
    cls = load_recipe("data2vec2").Data2Vec2
    ctx = lambda step: SimpleNamespace(step=step, total_steps=100, steps_per_epoch=10)  # noqa: E731
    _, a = parse_args(cls, ["--ema-start", "0.9", "--ema-end", "1.0", "--ema-anneal-epochs", "2"])
    model = SimpleNamespace(a=a)
    momentum = [cls.schedule(model, ctx(s))["momentum"] for s in (0, 10, 20, 50, 99)]
    assert momentum == pytest.approx([0.9, 0.95, 1.0, 1.0, 1.0])              # fairseq ema_anneal_end_step
    _, d = parse_args(cls, ["--ema-start", "0.9", "--ema-end", "1.0"])       # default: over the whole run
    model.a = d
    assert [cls.schedule(model, ctx(s))["momentum"] for s in (0, 50, 100)] == pytest.approx([0.9, 0.95, 1.0])
    with pytest.raises(SystemExit):
        parse_args(cls, ["--ema-anneal-epochs", "-1"])
    assert "--ema-anneal-epochs expected >= 0" in capsys.readouterr().err


def test_model_name_takes_the_recipes_overrides():
    """``build_vit`` with ``--model``: a recipe's override replaces the default it shares (I-JEPA's
    encoder without CLS, average-pooled), as without ``--model``."""
    from sslkern.train import build_vit

    for model in ("vit_tiny_patch16_224", None):
        a = SimpleNamespace(model=model, image_size=32, patch_size=16, dim=192, depth=2, heads=3, drop_path=0.1)
        vit = build_vit(a, 3, class_token=False, global_pool="avg")
        assert vit.cls_token is None and vit.global_pool == "avg" and vit.patch_embed.img_size == (32, 32)
        assert build_vit(a, 3).global_pool == "token"
