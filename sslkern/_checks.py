"""Argument checks for the public ops: one place, errors that name the argument.

Every public function validates its arguments here, once, before the op runs. The
messages say which argument, what was expected and what was given, e.g.
``sslkern.ema_update_: students[3] expected shape (384,), got (383,)``.
Checks only look at metadata (shape, dtype, device), so they also run under
``torch.compile`` with fake tensors; checks that need values live in the kernels.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentError(ValueError):
    """Raised for bad arguments to an sslkern op (a ``ValueError``)."""


def fail(op: str, msg: str, exc: type[Exception] = ArgumentError) -> None:
    raise exc(f"sslkern.{op}: {msg}")


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_tensor(
    op: str,
    name: str,
    x,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check one tensor argument; ``None`` in ``shape`` means any size on that dim."""
    if not isinstance(x, torch.Tensor):
        fail(op, f"{name} expected a torch.Tensor, got {type(x).__name__}", TypeError)
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            fail(op, f"{name} expected dtype in ({names}), got {str(x.dtype).replace('torch.', '')}", TypeError)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            fail(op, f"{name} expected {' or '.join(map(str, allowed))} dims, got shape {_fmt_shape(x.shape)}")
    if shape is not None:
        ok = x.dim() == len(shape) and all(s is None or int(d) == s for d, s in zip(x.shape, shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            fail(op, f"{name} expected shape {want}, got {_fmt_shape(x.shape)}")
    if device is not None and x.device != device:
        fail(op, f"{name} expected to be on {device} (like the other inputs), got {x.device}")
    return x


def check_same_device(op: str, named: dict[str, torch.Tensor]) -> torch.device:
    devices = {n: t.device for n, t in named.items() if t is not None}
    first = next(iter(devices.values()))
    for n, d in devices.items():
        if d != first:
            others = ", ".join(f"{k} on {v}" for k, v in devices.items())
            fail(op, f"all tensors must be on one device, got {others}")
    return first


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        fail(op, f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_range(op: str, name: str, value: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        fail(op, f"{name} must be in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}, got {value}")


def is_dense(x: torch.Tensor) -> bool:
    """True if ``x`` covers a contiguous block of memory in some dim order (any permutation
    of a contiguous tensor, e.g. channels-last), so it can be walked linearly."""
    expected = 1
    for size, stride in sorted(((int(sz), int(st)) for sz, st in zip(x.shape, x.stride()) if sz != 1),
                               key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True
