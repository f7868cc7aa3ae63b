"""Decode-only loading: worker processes read and decode this rank's images of each step.

A step's batch is a pure function of the step (:class:`~sslkern.data.sampler.BatchOrder`),
so the loader is a ``DataLoader`` over step numbers: item ``s`` is this rank's rows of
global batch ``s``, decoded at their own sizes into one ragged uint8 batch. Workers draw no
random numbers — every random choice (crops, colours, masks) is made on the training
device from the run's seeded generator — so any ``--workers`` and any prefetch depth give
the same batches, and resuming at step ``s`` is starting the loader at ``s``.

Unreadable images. An image that fails to decode is reported (its file and the cause, once
per run in the log) and replaced by the next sample of the epoch's order that decodes —
a rule that depends on the data only, so it too is the same for any worker count and
world size. More than ``MAX_BAD_IN_A_ROW`` failures for one row stop the run with a
:class:`DataError` naming the files. Errors never surface as a worker's bare traceback:
the worker returns them and the training process raises them.

On CUDA, batches are pinned by the workers' loader and copied to the device on a side
stream one step ahead (timm's ``PrefetchLoader`` pattern).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .decode import DecodeError
from .sampler import BatchOrder
from .sources import DataError, Source

MAX_BAD_IN_A_ROW = 16


@dataclass
class DecodedBatch:
    """One rank's rows of one step: ragged uint8 images, labels, and what could not be read."""

    step: int
    data: torch.Tensor      # (T,) uint8, images back to back, each (H, W, C) row-major
    offsets: torch.Tensor   # (B,) int64
    hw: torch.Tensor        # (B, 2) int64
    labels: torch.Tensor    # (B,) int64
    channels: int
    bad: list = field(default_factory=list)  # messages of images replaced in this batch
    hw_device: torch.Tensor | None = None    # ``hw`` on the data's device (``hw`` itself stays on the host)

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def pin_memory(self):
        self.data, self.offsets, self.hw, self.labels = (t.pin_memory() for t in (self.data, self.offsets, self.hw,
                                                                                   self.labels))
        return self

    def to(self, device, non_blocking: bool = False) -> "DecodedBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return DecodedBatch(self.step, move(self.data), move(self.offsets), self.hw, move(self.labels), self.channels,
                            self.bad, move(self.hw))

    def images(self):
        """The images as :class:`sslkern.RaggedImages`, on the data's device."""
        from sslkern.ops.render_views import RaggedImages

        hw = self.hw_device if self.hw_device is not None else self.hw.to(self.data.device)
        images = RaggedImages(self.data, self.offsets, hw, self.channels)
        images.hw_host = self.hw  # view parameters are drawn on the host from the sizes
        return images


@dataclass
class _Failure:
    """An error raised in a worker, carried to the training process as a value."""

    message: str


def pack(images: list[np.ndarray], labels, channels: int, step: int = -1, bad=None) -> DecodedBatch:
    """Ragged uint8 batch from a list of (H, W, C) arrays (one copy into one buffer)."""
    sizes = [im.shape[0] * im.shape[1] * im.shape[2] for im in images]
    offsets = np.zeros(len(images), dtype=np.int64)
    if images:
        offsets[1:] = np.cumsum(sizes)[:-1]
    data = torch.empty(int(sum(sizes)), dtype=torch.uint8)
    flat = data.numpy()
    for im, off, n in zip(images, offsets, sizes):
        flat[off:off + n] = im.reshape(-1)
    hw = torch.tensor([[im.shape[0], im.shape[1]] for im in images], dtype=torch.int64).reshape(-1, 2)
    return DecodedBatch(step, data, torch.from_numpy(offsets), hw, torch.as_tensor(np.asarray(labels, np.int64)),
                        channels, bad or [])


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset over step numbers: item ``s`` = this rank's decoded rows of step ``s``."""

    def __init__(self, source: Source, order: BatchOrder, rank: int = 0, world_size: int = 1,
                 min_side: int | None = None):
        self.source, self.order, self.rank, self.world_size, self.min_side = source, order, rank, world_size, min_side

    def __len__(self) -> int:  # steps are addressed directly; the sampler says which
        return 1 << 62

    def load_row(self, step: int, row: int, index: int, bad: list) -> tuple[np.ndarray, int]:
        """Image of global row ``row`` (sample ``index``), or its replacement if unreadable."""
        for tries in range(MAX_BAD_IN_A_ROW + 1):
            if tries:
                index = self.order.replacement(step, row, tries)
            try:
                return self.source.load(index, self.min_side), int(self.source.labels[index])
            except DecodeError as e:
                bad.append(str(e))
        raise DataError(f"{MAX_BAD_IN_A_ROW + 1} unreadable images in a row at step {step}, row {row}: "
                        + "; ".join(bad[-3:]))

    def __getitem__(self, step: int):
        try:
            rows = self.order.rank_batch(step, self.rank, self.world_size).tolist()
            bad: list[str] = []
            images, labels = [], []
            for k, index in enumerate(rows):
                im, label = self.load_row(step, self.rank + k * self.world_size, index, bad)
                images.append(im)
                labels.append(label)
            return pack(images, labels, self.source.channels, step, bad)
        except DataError as e:
            return _Failure(str(e))
        except Exception as e:  # anything else: named, not a worker's bare traceback
            return _Failure(f"loading step {step} failed: {type(e).__name__}: {e}")


def _identity(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)


class TrainLoader:
    """Iterates this rank's decoded batches for steps ``start .. stop - 1``.

    ``workers`` decode processes (0: decode in the training process), each holding up to
    ``prefetch`` batches ahead; on CUDA the batches are pinned and copied one step ahead on a
    side stream. Yields :class:`DecodedBatch` on ``device``; raises :class:`DataError` for
    data that cannot be used.
    """

    def __init__(self, source: Source, order: BatchOrder, *, start: int, stop: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, prefetch: int = 2, min_side: int | None = None,
                 device: torch.device | str = "cpu"):
        self.dataset = StepBatches(source, order, rank, world_size, min_side)
        self.device = torch.device(device)
        self.start, self.stop, self.workers, self.prefetch = start, stop, workers, prefetch

    def _batches(self):
        if self.workers == 0:
            for s in range(self.start, self.stop):
                yield self.dataset[s]
            return
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=None, sampler=range(self.start, self.stop),
                                         num_workers=self.workers, prefetch_factor=self.prefetch,
                                         collate_fn=_identity, worker_init_fn=_worker_init,
                                         pin_memory=self.device.type == "cuda",
                                         multiprocessing_context="fork" if os.name == "posix" else None)
        yield from dl

    def __iter__(self):
        batches = (self._checked(b) for b in self._batches())
        if self.device.type != "cuda":
            yield from batches
            return
        stream = torch.cuda.Stream(self.device)
        ahead = None
        for b in batches:
            with torch.cuda.stream(stream):
                nxt = b.to(self.device, non_blocking=True)
            if ahead is not None:
                yield ahead
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in (nxt.data, nxt.offsets, nxt.labels, nxt.hw_device):
                t.record_stream(torch.cuda.current_stream(self.device))
            ahead = nxt
        if ahead is not None:
            yield ahead

    @staticmethod
    def _checked(b):
        if isinstance(b, _Failure):
            raise DataError(b.message)
        return b
