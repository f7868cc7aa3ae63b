"""Datasets behind one interface: ``open_dataset(path)`` -> train and evaluation sources.

``path`` may be:
  * ``None``: scikit-learn's bundled digits (``load_digits``: 1,797 real 8×8 grey images, 10
    classes; stratified split ``test_size=0.3, random_state=0`` -> 1,257 train / 540 test),
    held in memory at their native 8×8 as uint8; the views are rendered at ``--image-size``.
  * a CIFAR-10 "python version" directory (``data_batch_1..5``, ``test_batch``), in memory.
  * a directory with ``train/`` and ``val/`` (or ``test/``) sub-folders, each an ImageFolder
    tree or a folder of indexed tar shards;
  * an ImageFolder tree ``path/<class>/<image>`` or a folder of indexed tar shards, split
    into train / test like the digits (stratified 70 / 30, by labels only: no image is read).

Nothing is ever downloaded. Opening reads metadata only (directory listings, shard indexes).
Disk datasets are RGB (grey, palette and CMYK images are converted) and normalised with the
ImageNet mean and std, and evaluated on a centre crop of 0.875 of the shorter side (timm's
and torchvision's ``Resize(256) + CenterCrop(224)``); the small in-memory sets are
normalised with their training set's per-channel mean and std and evaluated whole.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np

from .sources import ArraySource, DataError, ImageFolderSource, Source, SubsetSource, TarShardSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Dataset:
    """A training split and an evaluation split, with what the views need to know."""

    name: str
    train: Source
    test: Source
    mean: tuple          # per-channel normalisation, values in [0, 1] units
    std: tuple
    eval_crop: float     # evaluation view: centre crop of this fraction of the shorter side
    in_memory: bool

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def channels(self) -> int:
        return self.train.channels


def _split_indices(labels: np.ndarray, test_size: float = 0.3, seed: int = 0):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(te)


def _mean_std(images: np.ndarray) -> tuple[tuple, tuple]:
    x = images.astype(np.float64) / 255.0
    return tuple(x.mean(axis=(0, 1, 2)).tolist()), tuple(np.maximum(x.std(axis=(0, 1, 2)), 1e-6).tolist())


def _in_memory(name: str, images: np.ndarray, labels: np.ndarray, classes, test_images=None, test_labels=None):
    if test_images is None:
        tr, te = _split_indices(labels)
        images, labels, test_images, test_labels = images[tr], labels[tr], images[te], labels[te]
    mean, std = _mean_std(images)
    return Dataset(name, ArraySource(images, labels, classes, f"{name}/train"),
                   ArraySource(test_images, test_labels, classes, f"{name}/test"), mean, std, 1.0, True)


def digits() -> Dataset:
    """scikit-learn digits at their native 8×8, uint8 (the 17 grey levels 0..16 mapped to 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _in_memory("digits", images, d.target.astype(np.int64), [str(c) for c in d.target_names])


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
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(data), np.asarray(d[b"labels"], dtype=np.int64)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}") from None


def cifar10(root: str) -> Dataset:
    train = [os.path.join(root, f"data_batch_{i}") for i in range(1, 6)]
    missing = [p for p in train + [os.path.join(root, "test_batch")] if not os.path.isfile(p)]
    if missing:
        raise DataError(f"CIFAR-10 directory {root!r} lacks {', '.join(os.path.basename(m) for m in missing)}")
    parts = [_read_cifar_batch(p) for p in train]
    xte, yte = _read_cifar_batch(os.path.join(root, "test_batch"))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return _in_memory("cifar10", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                      classes, xte, yte)


def _tars(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".tar"))


def open_source(path: str, name: str | None = None) -> Source:
    """An ImageFolder tree or a folder of indexed tar shards (whichever ``path`` holds)."""
    tars = _tars(path)
    if tars:
        return TarShardSource(tars, name=name)
    return ImageFolderSource(path)


def open_dataset(path: str | None = None) -> Dataset:
    """The dataset at ``path`` (see the module docstring); :class:`DataError` if it cannot be used."""
    if path is None:
        return digits()
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist (sslkern never downloads datasets)")
    if not os.path.isdir(path):
        raise DataError(f"data path {path!r} is not a directory (expected an ImageFolder tree, a folder of tar "
                        "shards or a CIFAR-10 batches directory)")
    if not any(not n.startswith(".") for n in os.listdir(path)):
        raise DataError(f"data path {path!r} is empty")
    if os.path.isfile(os.path.join(path, "data_batch_1")) or os.path.isfile(os.path.join(path, "test_batch")):
        return cifar10(path)
    base = os.path.basename(os.path.normpath(path))
    test_dir = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
    if os.path.isdir(os.path.join(path, "train")) and test_dir is not None:
        train, test = open_source(os.path.join(path, "train")), open_source(test_dir)
        if len(test.classes) > len(train.classes) or test.classes != train.classes[:len(test.classes)]:
            raise DataError(f"class folders differ between {os.path.join(path, 'train')} and {test_dir}")
    else:
        whole = open_source(path)
        tr, te = _split_indices(whole.labels)
        train, test = SubsetSource(whole, tr, f"{whole.name}/train"), SubsetSource(whole, te, f"{whole.name}/test")
    kind = "shards" if isinstance(getattr(train, "base", train), TarShardSource) else "imagefolder"
    return Dataset(f"{kind}:{base}", train, test, IMAGENET_MEAN, IMAGENET_STD, 0.875, False)
