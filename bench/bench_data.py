"""Feeding DINO multi-crop from JPEG files: images/s of whole input pipelines on this CPU.

Case: 2 global crops of 224 + 10 local crops of 96 per image (DINO ``main_dino.py``), from
JPEG files of about 400x350 (crops of the two photographs scikit-learn bundles, so the
decoder sees natural-image statistics), to normalised float tensors, batches of ``B``;
``WORKERS`` loader processes for every provider.

Providers (time per batch; the table's ratio is images/s of sslkern over the provider):
  sslkern     sslkern.data.TrainLoader (workers read + decode only) + sslkern.render_views of the
              12 views in the training process (C++ on CPU), parameters from sslkern.views
  dino        torchvision ImageFolder + dino's DataAugmentationDINO (PIL, per image, per crop) in a
              DataLoader
  lightly     the same DataLoader with lightly's DINOTransform
  decode      the decode-only ceiling: the same workers decoding (no views)
  renderer    sslkern.render_views alone on one decoded batch (no loading)

The training process renders with the cores the workers leave (one here), the other providers'
training processes only collate. Peak memory is the growth of the whole process tree (training process + workers, proportional
set size) while the pipeline runs. ``SSLKERN_BENCH_FULL=1`` adds rounds.
"""
from __future__ import annotations

import datetime
import os
import sys

import numpy as np
import pytest
import torch

import harness
import sslkern
from sslkern.data import BatchOrder, ImageFolderSource, TrainLoader

B, WORKERS, N_IMAGES = 32, 2, 256
ROUNDS = 12 if os.environ.get("SSLKERN_BENCH_FULL") else 6
ROOT = os.path.join(os.environ.get("TMPDIR", "/tmp"), "sslkern_bench_jpegs")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def jpeg_folder() -> str:
    """``N_IMAGES`` JPEGs of ~400x350 (random crops, flips and tints of sklearn's two sample
    photos), 4 class folders; made once per machine."""
    done = os.path.join(ROOT, ".complete")
    if os.path.exists(done):
        return ROOT
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photographs
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        p = photos[i % 2]
        h, w = int(rng.integers(330, 380)), int(rng.integers(380, 430))
        y, x = int(rng.integers(0, p.shape[0] - h)), int(rng.integers(0, p.shape[1] - w))
        crop = p[y:y + h, x:x + w].astype(np.float32) * rng.uniform(0.8, 1.2, size=3)
        crop = np.clip(crop, 0, 255).astype(np.uint8)[:, ::-1 if rng.random() < 0.5 else 1]
        os.makedirs(os.path.join(ROOT, f"c{i % 4}"), exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(os.path.join(ROOT, f"c{i % 4}", f"{i:04d}.jpg"), quality=90)
    open(done, "w").close()
    return ROOT


def tree_pss_mb() -> float:
    """Proportional set size of this process and its children, MiB (shared pages split fairly)."""
    def pss(pid):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return 0.0
        return 0.0

    pids = [os.getpid()]
    try:
        for t in os.listdir(f"/proc/{os.getpid()}/task"):
            with open(f"/proc/{os.getpid()}/task/{t}/children") as f:
                pids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return sum(pss(p) for p in pids)


# ---------------------------------------------------------------------------------------
# Providers: each yields batches forever; a timed call takes one batch
# ---------------------------------------------------------------------------------------
def sslkern_batches(render=True):
    source = ImageFolderSource(jpeg_folder())
    order = BatchOrder(len(source), B, seed=0)
    specs = sslkern.views.dino_multicrop()
    step = 0
    from sslkern.train.context import StepContext

    while True:
        loader = TrainLoader(source, order, start=step, stop=step + 1000, workers=WORKERS, min_side=448)
        for batch in loader:
            if render:
                ctx = StepContext(step, 0, 1, 1, torch.Generator().manual_seed(step), B,
                                  host_generator=torch.Generator().manual_seed(step), mean=MEAN, std=STD)
                yield ctx.views(batch.images(), specs)
            else:
                yield batch
            step += 1


def dino_transform():
    """dino's DataAugmentationDINO (an eager port in tests/_dino_augmentation.py), 10 local crops."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from _dino_augmentation import DataAugmentationDINO

    return DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 10)


def lightly_transform():
    from lightly.transforms import DINOTransform

    return DINOTransform(global_crop_size=224, local_crop_size=96, n_local_views=10, normalize={"mean": MEAN,
                                                                                                "std": STD})


def _collate_lists(batch):
    return batch  # keep the ragged / multi-crop samples as they are


def torchvision_batches(transform):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(jpeg_folder(), transform=transform)
    while True:
        dl = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True, num_workers=WORKERS, drop_last=True,
                                         collate_fn=_collate_lists, persistent_workers=False,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
        yield from dl


def renderer_batches():
    batch = next(sslkern_batches(render=False))
    specs = sslkern.views.dino_multicrop()
    from sslkern.train.context import StepContext

    step = 0
    while True:
        ctx = StepContext(step, 0, 1, 1, torch.Generator().manual_seed(step), B,
                          host_generator=torch.Generator().manual_seed(step), mean=MEAN, std=STD)
        yield ctx.views(batch.images(), specs)
        step += 1


PROVIDERS = {
    "sslkern": lambda: sslkern_batches(),
    "dino": lambda: torchvision_batches(dino_transform()),
    "lightly": lambda: torchvision_batches(lightly_transform()),
    "decode": lambda: sslkern_batches(render=False),
    "renderer": renderer_batches,
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_dino_multicrop_from_jpeg(benchmark, provider):
    cores = os.cpu_count() or 1
    # The training process renders while the workers decode: on a CPU "device" it gets the cores
    # the workers leave (at least one), so its OpenMP threads never wait on a busy core.
    torch.set_num_threads(max(1, cores - WORKERS) if provider == "sslkern" else cores)
    it = PROVIDERS[provider]()
    before = tree_pss_mb()
    for _ in range(2):  # warm-up: workers started, first batches prefetched
        next(it)

    def one():
        next(it)

    benchmark.group = f"data: DINO multi-crop 2x224 + 10x96 from ~400x350 JPEGs, B={B}, {WORKERS} workers"
    benchmark.extra_info.update(op="data", provider=provider)
    benchmark.pedantic(one, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    peak = 0.0
    for _ in range(3):  # memory, sampled between untimed batches (reading /proc is not free)
        next(it)
        peak = max(peak, tree_pss_mb())
    it.close()  # stops the loader workers
    if stats is None:
        return
    harness.RESULTS.append(harness.Result(
        op="data", case=f"DINO multi-crop 2x224 + 10x96 from ~400x350 JPEGs, B={B}, {WORKERS} workers "
                        f"(images/s = {B} / median)",
        provider=provider, median_ms=stats.median * 1e3, iqr_ms=stats.iqr * 1e3, min_ms=stats.min * 1e3,
        rounds=stats.rounds, peak_extra_mb=max(0.0, peak - before), bytes_moved=None, gbps=None,
        target={"dino": 2.0}.get(provider), machine=harness.machine(), torch_version=torch.__version__,
        date=datetime.date.today().isoformat(), extra={"images_per_s": B / stats.median}))
    print(f"\n{provider}: {B / stats.median:.1f} images/s (median of {stats.rounds} batches of {B}), "
          f"process tree +{max(0.0, peak - before):.0f} MiB")
