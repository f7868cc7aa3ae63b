"""The CPU output cache of sslkern's C++ kernels.

PyTorch's CPU allocator passes large allocations to ``malloc``, which maps fresh pages for
them and returns them to the OS on free; every training step then page-faults and
zero-fills each large output again, at several times the cost of writing it (docs/design.md,
*CPU outputs*). sslkern's C++ kernels therefore take their large outputs
(gradients, gathered tokens, targets; 1 MiB and up) from a small cache, the CPU analogue of
the CUDA caching allocator:

* an output's storage owns a block of the cache; when the storage is destroyed (no tensor,
  view, storage object or autograd record refers to it any more) its deleter puts the
  block on a free list instead of freeing it, so reuse can never be observed;
* a request takes a free block of exactly its size (training repeats shapes);
* at most ``SSLKERN_CPU_CACHE_MB`` MiB of free blocks are kept (default 2048; ``0`` turns
  the cache off), the least recently freed dropped first.

Free blocks stay allocated between steps (that is the point); ``empty_cpu_cache()`` releases
them, ``cpu_cache_info()`` reports. Tensors on other devices are not affected.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from ._backend import extension

__all__ = ["cpu_cache_info", "empty_cpu_cache", "set_cpu_cache_limit", "cpu_cache_disabled"]


def _ext():
    ext = extension()
    if ext is None:
        raise RuntimeError("sslkern._C is not built: the CPU output cache belongs to the C++ kernels")
    return ext


def cpu_cache_info() -> dict[str, int]:
    """The cache's state: ``limit_bytes``, ``free_blocks`` / ``free_bytes`` (kept for reuse),
    ``hits`` and ``misses`` (requests served from a free block or not, since the start)."""
    keys = ("limit_bytes", "free_blocks", "free_bytes", "hits", "misses")
    return dict(zip(keys, _ext().output_cache_info()))


def empty_cpu_cache() -> None:
    """Release the free blocks (memory of live tensors is not the cache's to free)."""
    _ext().output_cache_clear()


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Keep at most ``limit_bytes`` bytes of free blocks (0: off; blocks over it are released)."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: limit_bytes must be a non-negative int, got {limit_bytes!r}")
    _ext().output_cache_set_limit(limit_bytes)


@contextlib.contextmanager
def cpu_cache_disabled() -> Iterator[None]:
    """Within the block, kernels allocate fresh outputs (free blocks are released)."""
    limit = cpu_cache_info()["limit_bytes"]
    set_cpu_cache_limit(0)
    try:
        yield
    finally:
        set_cpu_cache_limit(limit)
