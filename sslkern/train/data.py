"""Datasets for the recipes: small, in memory, never downloaded.

Default: scikit-learn's bundled digits (``load_digits``: 1,797 real 8×8 grey images, 10
classes), upsampled to ``image_size`` (16 by default, see CALIBRATION), with the fixed
stratified split ``test_size=0.3, random_state=0`` (1,257 train / 540 test).

``--data PATH`` takes either
  * an ImageFolder tree ``PATH/<class>/<image>`` (a split is made as for digits), or
    ``PATH/train/<class>/...`` with ``PATH/test/`` (or ``PATH/val/``) used as given;
  * a CIFAR-10 "python version" directory (``data_batch_1..5``, ``test_batch``).
A missing or empty path raises :class:`DataError`; nothing is ever fetched.

Images are float tensors (N, C, H, W) normalized with the training set's per-channel mean
and std. Augmentation (random resized crop scale 0.5–1, aspect 3/4–4/3, rotation ±10°) is
one batched ``affine_grid``/``grid_sample`` drawn from a ``torch.Generator``, so a run is
reproducible and resumable from the generator's saved state.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """A dataset path that cannot be used (missing, empty, unknown layout)."""


@dataclass
class ImageDataset:
    """A train/test pair of in-memory image tensors with integer labels."""

    name: str
    train_images: torch.Tensor  # (N, C, H, W) float32, normalized
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: torch.Tensor | None = None  # (1, C, 1, 1) per-channel normalisation (train set)
    std: torch.Tensor | None = None

    @property
    def in_chans(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------
def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _split(images: torch.Tensor, labels: torch.Tensor, test_size: float = 0.3, seed: int = 0):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels.numpy())
    stratify = labels.numpy() if counts[counts > 0].min() >= 2 else None
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=stratify)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return images[tr], labels[tr], images[te], labels[te]


def load_digits_images(image_size: int = 16):
    """scikit-learn digits as (N, 1, S, S) in [0, 1] and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    return _resize(images, image_size), torch.from_numpy(digits.target.astype(np.int64)), [str(c) for c in digits.target_names]


def _read_image(path: str, size: int, mode: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode).resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def read_image_folder(root: str, image_size: int):
    """Read ``root/<class>/<file>`` (sorted classes, sorted files) into (N, C, S, S), labels, classes.

    Grey images stay single-channel only if every image in the tree is grey; otherwise all
    are read as RGB.
    """
    from PIL import Image

    if not os.path.isdir(root):
        raise DataError(f"data path {root!r} is not a directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    files: list[tuple[str, int]] = []
    for ci, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c))):
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((os.path.join(dirpath, n), ci))
    if not files:
        raise DataError(
            f"data path {root!r} holds no images: expected an ImageFolder tree root/<class>/<image> "
            f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    grey = True
    for p, _ in files:
        with Image.open(p) as im:
            if im.mode not in ("L", "1", "I", "I;16", "F"):
                grey = False
                break
    mode = "L" if grey else "RGB"
    images = torch.stack([_read_image(p, image_size, mode) for p, _ in files])
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    return images, labels, classes


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles; allow only what they contain (dicts, lists, numpy arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name} from a CIFAR-10 batch file")


def _read_cifar_batch(path: str):
    with open(path, "rb") as f:
        d = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    return torch.from_numpy(data.astype(np.float32) / 255.0), torch.from_numpy(labels)


def read_cifar10(root: str, image_size: int):
    train = [os.path.join(root, f"data_batch_{i}") for i in range(1, 6)]
    missing = [p for p in train + [os.path.join(root, "test_batch")] if not os.path.isfile(p)]
    if missing:
        raise DataError(f"CIFAR-10 directory {root!r} lacks {', '.join(os.path.basename(m) for m in missing)}")
    parts = [_read_cifar_batch(p) for p in train]
    xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    xte, yte = _read_cifar_batch(os.path.join(root, "test_batch"))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return _resize(xtr, image_size), ytr, _resize(xte, image_size), yte, classes


def _is_cifar_dir(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "data_batch_1")) or os.path.isfile(os.path.join(root, "test_batch"))


def load_dataset(path: str | None = None, image_size: int = 16) -> ImageDataset:
    """The default digits dataset (``path=None``) or a local ImageFolder / CIFAR-10 directory."""
    if image_size < 4:
        raise DataError(f"image_size expected >= 4, got {image_size}")
    if path is None:
        images, labels, classes = load_digits_images(image_size)
        xtr, ytr, xte, yte = _split(images, labels)
        name = "digits"
    else:
        if not os.path.exists(path):
            raise DataError(f"data path {path!r} does not exist (sslkern never downloads datasets)")
        if not os.path.isdir(path):
            raise DataError(f"data path {path!r} is not a directory (expected an ImageFolder tree or a CIFAR-10 batches dir)")
        if not any(not n.startswith(".") for n in os.listdir(path)):
            raise DataError(f"data path {path!r} is empty")
        if _is_cifar_dir(path):
            xtr, ytr, xte, yte, classes = read_cifar10(path, image_size)
            name = "cifar10"
        else:
            test_dir = next((os.path.join(path, d) for d in ("test", "val") if os.path.isdir(os.path.join(path, d))), None)
            if os.path.isdir(os.path.join(path, "train")) and test_dir is not None:
                xtr, ytr, classes = read_image_folder(os.path.join(path, "train"), image_size)
                xte, yte, test_classes = read_image_folder(test_dir, image_size)
                if test_classes != classes:
                    raise DataError(f"class folders differ between {path}/train and {test_dir}")
                if xte.shape[1] != xtr.shape[1]:  # one split grey, the other colour
                    xtr, xte = xtr.expand(-1, 3, -1, -1), xte.expand(-1, 3, -1, -1)
            else:
                images, labels, classes = read_image_folder(path, image_size)
                xtr, ytr, xte, yte = _split(images, labels)
            name = f"imagefolder:{os.path.basename(os.path.normpath(path))}"
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return ImageDataset(name, ((xtr - mean) / std).contiguous(), ytr, ((xte - mean) / std).contiguous(), yte, classes,
                        mean, std)


# ---------------------------------------------------------------------------------------
# Augmentation and batching
# ---------------------------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator, *, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
            degrees: float = 10.0, rows: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Random resized crop + rotation at the input size (``views.random_resized_crop``).

    The crop covers ``scale`` of the area with aspect ``ratio`` (log-uniform), placed
    uniformly inside the image, rotated by U(-degrees, degrees); output has the input size.
    ``rows=(rank, world_size)``: ``images`` are rows ``rank::world_size`` of a global batch;
    the parameters are drawn for the whole global batch and this rank's rows are used, so
    every rank count gives the same augmentation.
    """
    from .views import random_resized_crop

    return random_resized_crop(images, generator, scale=scale, ratio=ratio, degrees=degrees, rows=rows)


def epoch_batches(num_samples: int, batch_size: int, epoch: int, seed: int, *, rank: int = 0, world_size: int = 1):
    """This rank's index batches for one epoch (drop-last), like ``DistributedSampler``.

    The order is a permutation seeded by (seed, epoch), so it needs no saved state. Each
    *global* batch of ``batch_size`` indices is split across ranks by stride, so a run on
    any number of ranks sees the same global batches.
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size expected a multiple of the world size {world_size}, got {batch_size}")
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    steps = num_samples // batch_size
    return [perm[i * batch_size:(i + 1) * batch_size][rank::world_size] for i in range(steps)]
