"""Argument checks for the public ops: one place, errors that name the argument.

Every public function validates its arguments here, once, before the op runs. The
messages say which argument, what was expected and what was given, e.g.
``sslkern.ema_update_: students[3] expected shape (384,), got (383,)``.
Checks only look at metadata (shape, dtype, device) and Python scalars, so they also run
under ``torch.compile`` with fake tensors; the one check of tensor values (indices in
range) is ``sslkern.ops._common.check_index_values``.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable, Sequence

import torch

HALF_OR_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = HALF_OR_FLOAT32 + (torch.float64,)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


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
            names = ", ".join(dtype_name(d) for d in dtypes)
            fail(op, f"{name} expected dtype in ({names}), got {dtype_name(x.dtype)}", TypeError)
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
    """``value`` in the interval (NaN is in none)."""
    bad = value != value or (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        fail(op, f"{name} must be in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}, got {value}")


def check_float(op: str, name: str, value, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, finite: bool = True) -> float:
    """A real Python number (not a bool or a tensor) in the interval; finite unless
    ``finite=False``. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(op, f"{name} expected a real number, got {type(value).__name__}", TypeError)
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        fail(op, f"{name} expected a finite number, got {value}")
    check_range(op, name, value, lo, hi, lo_open, hi_open)
    return value


def check_int(op: str, name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """A Python integer (``operator.index``; not a bool) in [lo, hi]. Returns it as an int."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        fail(op, f"{name} expected an int, got {type(value).__name__}", TypeError)
    check_range(op, name, value, lo, hi)
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
