"""One data2vec 2.0 training step of the default recipe model (issue #7).

Default model: ViT dim 96, depth 4, 3 heads on 16×16 digits (patch 4: 16 tokens + CLS),
batch 128, 4 clone masks (512 student sequences of 1 + 4 visible tokens), conv decoder
dim 64. One timed call = masks, teacher targets, student + decoder, loss, backward, AdamW
step and EMA, on the same images each call, 1 torch thread (the recipe default).

Providers: ``sslkern`` (auto backend: C++ kernels on CPU) and ``reference`` (the same
recipe under ``sslkern.use_backend("reference")``: eager reference ops for masks, gather,
restore, targets, loss and EMA). timm's linear layers, the decoder and AdamW are the same
in both.
"""
import importlib.util
import os

import pytest
import torch

import sslkern
from harness import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_data2vec2", os.path.join(ROOT, "recipes", "data2vec2.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("provider", ["sslkern", "reference"])
def test_data2vec2_train_step_default(benchmark, provider):
    from sslkern.train.data import augment, load_dataset
    from sslkern.train.distributed import DistInfo

    recipe = _recipe()
    _, a = recipe.parse_args(["--out", "/tmp/sslkern-bench-recipe"])
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)  # the recipe's default (1 thread per rank)
    data = load_dataset(None, a.image_size)
    student, teacher, model, opt = recipe.build(a, data.in_chans, DistInfo())
    gen = torch.Generator()
    images = augment(data.train_images[: a.batch_size], gen.manual_seed(0))
    backend = None if provider == "sslkern" else "reference"

    def step():
        with sslkern.use_backend(backend):
            recipe.train_step(a, model, student, teacher, opt, images, gen, 0.995)

    measure(benchmark, op="data2vec2 recipe", case=f"train step, default model, B={a.batch_size}x{a.clones} masks, fp32",
            provider=provider, fn=step, setup=lambda: gen.manual_seed(1), rounds=10)
    torch.set_num_threads(threads)
