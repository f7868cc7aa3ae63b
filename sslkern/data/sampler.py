"""The order of training samples: a pure function of (seed, epoch, step), no loader state.

Every epoch is one permutation of the ``N`` samples, seeded by (seed, epoch); global batch
``pos`` of an epoch is ``perm[pos·B : (pos + 1)·B]`` (the last partial batch is dropped),
and rank ``r`` of ``W`` takes rows ``r::W`` of it. Step ``s`` of a run is batch ``pos`` of
epoch ``e`` with ``(e, pos) = divmod(s, steps_per_epoch)``, so resuming at any step needs no
saved sampler, and every world size sees the same global batches.

``window > 0`` (network storage): shards are visited in permuted windows of ``window``
shards — the shard order is permuted, cut into windows, and the samples of each window are
permuted among themselves — so a stretch of steps reads from ``window`` shards only. Still a
pure function of (seed, epoch), still every sample exactly once per epoch.
"""
from __future__ import annotations

import numpy as np
import torch


class BatchOrder:
    """Global batches of sample indices for every step of a run."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, shard_sizes: list[int] | None = None,
                 window: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size expected a positive int, got {batch_size}")
        if num_samples < batch_size:
            raise ValueError(f"the training set has {num_samples} images, fewer than one batch of {batch_size}")
        if window < 0:
            raise ValueError(f"window expected >= 0, got {window}")
        if window and not shard_sizes:
            raise ValueError("window > 0 needs a sharded dataset (tar shards)")
        if shard_sizes is not None and sum(shard_sizes) != num_samples:
            raise ValueError(f"shard_sizes sum to {sum(shard_sizes)}, expected {num_samples}")
        self.num_samples, self.batch_size, self.seed, self.window = num_samples, batch_size, seed, window
        self.shard_starts = np.concatenate([[0], np.cumsum(shard_sizes)]) if shard_sizes else None
        self.steps_per_epoch = num_samples // batch_size
        self._cached: tuple[int, torch.Tensor] | None = None

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of all samples, (N,) int64."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        g = self._generator(epoch)
        if not self.window:
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            starts = self.shard_starts
            shards = torch.randperm(len(starts) - 1, generator=g).tolist()
            parts = []
            for w in range(0, len(shards), self.window):
                idx = torch.cat([torch.arange(int(starts[s]), int(starts[s + 1])) for s in shards[w:w + self.window]])
                parts.append(idx[torch.randperm(len(idx), generator=g)])
            perm = torch.cat(parts)
        self._cached = (epoch, perm)
        return perm

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch position in the epoch) of a run's step."""
        return divmod(step, self.steps_per_epoch)

    def global_batch(self, step: int) -> torch.Tensor:
        """The sample indices of step ``step``'s global batch, (B,) int64."""
        epoch, pos = self.position(step)
        return self.permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]

    def rank_batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This rank's rows ``rank::world_size`` of the global batch."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size {self.batch_size} expected a multiple of the world size {world_size}")
        return self.global_batch(step)[rank::world_size]

    def replacement(self, step: int, row: int, tries: int) -> int:
        """The sample that stands in for global row ``row`` of ``step`` after ``tries`` unreadable
        ones: the next sample of the epoch's order (wrapping), a pure function like the rest."""
        epoch, pos = self.position(step)
        perm = self.permutation(epoch)
        return int(perm[(pos * self.batch_size + row + tries) % self.num_samples])
