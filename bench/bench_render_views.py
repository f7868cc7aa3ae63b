"""DINO multi-crop views (2 x 224 + 10 x 96) from decoded uint8 images, CPU.

Images: ~400x350 RGB uint8 (sides 350 ± 40 by 400 ± 40), natural-like content from a fixed
seed: smooth noise at three scales, a few hard-edged shapes and fine grain. Every provider
makes the 12 views of every image with DINO's parameters (``sslkern.views.dino_multicrop``:
crop scales (0.4, 1) / (0.05, 0.4), flip 0.5, jitter 0.8, grayscale 0.2, blur 1.0 / 0.1 / 0.5,
solarize 0.2 on global crop 2) and ImageNet normalisation, from the decoded image (no JPEG
decode here), with one thread each (the per-image PIL and torchvision pipelines use one core;
``torch.set_num_threads(1)`` for all), timed round-robin in one run (``measure_interleaved``).

Providers:
  sslkern         ``draw_view_params`` for the 12 specs + two ``sslkern.render_views`` calls
                  (224 and 96) on the ``RaggedImages`` batch (C++ kernel on CPU)
  reference       the same parameters through ``sslkern.reference.render_views`` (eager, per view)
  torchvision_v2  ``torchvision.transforms.v2`` per image on uint8 CHW tensors, the same ops
                  (RandomResizedCrop(antialias=True), flip, RandomApply(ColorJitter), RandomGrayscale,
                  RandomApply(GaussianBlur(9)), RandomSolarize(128), ToDtype, Normalize) — dinov3's
                  ``DataAugmentationDINO`` form with bilinear resampling
  dino_pil        dino ``main_dino.py: DataAugmentationDINO`` on PIL images (tests/_dino_augmentation.py)

Default: 32 images (13 calls of every provider, ~40 s on a 2-core VM). ``SSLKERN_BENCH_FULL=1``:
64 images, and the 2-thread case (sslkern, reference and torchvision v2 with two intra-op
threads; the PIL pipeline has none). The minimal-traffic bound (read every image once, write the
fp32 views) is recorded on the sslkern row; the renderer is compute-bound, far from it.
"""
import os
import sys

import pytest
import torch

import harness
import sslkern
from harness import measure_interleaved
from sslkern import RaggedImages
from sslkern.views import ViewParams, dino_multicrop, draw_view_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _dino_augmentation import DataAugmentationDINO  # noqa: E402

FULL = os.environ.get("SSLKERN_BENCH_FULL", "0") not in ("", "0")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_images: dict = {}


def natural_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """n (H, W, 3) uint8 images: smooth noise at 3 scales + hard-edged rectangles + grain."""
    key = (n, seed)
    if key not in _images:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            H = 350 + int(torch.randint(-40, 41, (1,), generator=g))
            W = 400 + int(torch.randint(-40, 41, (1,), generator=g))
            x = torch.zeros(3, H, W)
            for cells, amp in ((4, 0.5), (16, 0.3), (64, 0.15)):
                coarse = torch.rand(1, 3, cells, cells, generator=g)
                x += amp * torch.nn.functional.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)[0]
            for _ in range(6):
                randint = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
                y0, x0 = randint(0, H - 20), randint(0, W - 20)
                h, w = randint(10, H - y0 + 1), randint(10, W - x0 + 1)
                x[:, y0:y0 + h, x0:x0 + w] = x[:, y0:y0 + h, x0:x0 + w] * 0.5 + torch.rand(3, 1, 1, generator=g) * 0.5
            x += 0.03 * torch.randn(3, H, W, generator=g)
            out.append((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous())
        _images[key] = out
    return _images[key]


def sslkern_views(batch: RaggedImages, gen: torch.Generator, render=None):
    """The 2 + 10 DINO views of every image: parameters drawn for the batch, two renders."""
    specs = dino_multicrop()
    B = len(batch)
    u = torch.rand(len(specs), B, specs[0].num_uniforms, generator=gen, dtype=torch.float64)
    params = [draw_view_params(s, batch.hw, u[k]) for k, s in enumerate(specs)]
    render = render or (lambda p, size: sslkern.render_views(batch, p, size, mean=MEAN, std=STD))
    return render(ViewParams.cat(params[:2]), 224), render(ViewParams.cat(params[2:]), 96)


def torchvision_v2_transforms():
    from torchvision.transforms import v2

    def pipe(size, scale, blur_p, solarize_p):
        ops = [v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(0.5),
               v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(0.2)]
        if blur_p:
            ops.append(v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur_p))
        if solarize_p:
            ops.append(v2.RandomSolarize(128, p=solarize_p))
        return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))])

    return pipe(224, (0.4, 1.0), 1.0, 0.0), pipe(224, (0.4, 1.0), 0.1, 0.2), pipe(96, (0.05, 0.4), 0.5, 0.0)


def make_fns(images):
    from PIL import Image

    batch = RaggedImages.from_list(images)
    gen = torch.Generator().manual_seed(1)
    ref = lambda p, size: sslkern.reference.render_views(batch, p, size, MEAN, STD)  # noqa: E731
    g1, g2, local = torchvision_v2_transforms()
    chw = [im.permute(2, 0, 1) for im in images]
    dino = DataAugmentationDINO()
    pil = [Image.fromarray(im.numpy()) for im in images]
    return {
        "sslkern": lambda: sslkern_views(batch, gen),
        "reference": lambda: sslkern_views(batch, gen, ref),
        "torchvision_v2": lambda: [[g1(x), g2(x)] + [local(x) for _ in range(10)] for x in chw],
        "dino_pil": lambda: [dino(im) for im in pil],
    }


def bytes_moved(images) -> float:
    """Fewest bytes: every source image read once, the fp32 views written once."""
    read = sum(im.numel() for im in images)
    return read + len(images) * 4 * 3 * (2 * 224 * 224 + 10 * 96 * 96)


def _run(benchmark, n_images: int, threads: int, providers):
    images = natural_images(n_images)
    fns = {k: f for k, f in make_fns(images).items() if k in providers}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = f"DINO 2x224 + 10x96 views of {n_images} ~400x350 RGB uint8 images, {threads} thread(s)"
        times = measure_interleaved(benchmark, op="render_views", case=case, fns=fns, rounds=5)
    finally:
        torch.set_num_threads(before)
    for r in harness.RESULTS:  # the bound on the sslkern row of this case
        if r.op == "render_views" and r.case == case and r.provider == "sslkern" and times:
            r.bytes_moved = bytes_moved(images)
            r.gbps = r.bytes_moved / times["sslkern"] / 1e9


def test_render_views_dino_multicrop_1thread(benchmark):
    _run(benchmark, 64 if FULL else 32, 1, ("sslkern", "reference", "torchvision_v2", "dino_pil"))


@pytest.mark.skipif(not FULL, reason="SSLKERN_BENCH_FULL=1 only")
def test_render_views_dino_multicrop_2threads(benchmark):
    _run(benchmark, 64, 2, ("sslkern", "reference", "torchvision_v2"))
