"""Backend selection: one rule for every op.

Backends
  ``reference``  eager PyTorch (``sslkern.reference``): the oracle, runs anywhere.
  ``cpu``        C++ kernels in ``sslkern._C`` (OpenMP, vectorized), CPU tensors.
  ``triton``     Triton kernels (``sslkern.triton_ops``): CUDA tensors, or CPU tensors when
                 ``TRITON_INTERPRET=1`` (the interpreter, for tests).
  ``cuda``       CUDA C++ kernels in ``sslkern._C``, CUDA tensors, where an op has them.

Default (``auto``): CPU tensors -> ``cpu``; CUDA tensors -> the op's preferred GPU backend
(Triton unless the op says CUDA C++ is faster), then the other one. A backend can be
forced per call (``backend=`` argument), per block (``with sslkern.use_backend(...)``) or per
process (``SSLKERN_BACKEND``), in that order of precedence.
"""
from __future__ import annotations

import contextlib
import functools
import contextvars
import importlib
import importlib.util
import os
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("sslkern_backend", default=None)

# ---------------------------------------------------------------------------------------
# What is available, and why not
# ---------------------------------------------------------------------------------------
_ext = None
_ext_error: str | None = None


def extension():
    """The compiled module ``sslkern._C`` (None if it is not built)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module("sslkern._C")
        except ImportError as e:  # not built, or built against another torch
            _ext_error = f"sslkern._C could not be imported ({e}); run `pip install -e . --no-build-isolation`"
    return _ext


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def cpu_native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU has native GEMMs for fp16 / bf16 (oneDNN's check: AVX512-BF16 / AMX);
    without them torch emulates half matmuls, far slower than fp32. False for other dtypes."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(probe and getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


_DNN_LINEAR: list = []


def cpu_dnn_linear():
    """torch's oneDNN fp32 linear for dense CPU tensors (``torch.ops.mkldnn._linear_pointwise``,
    ``y = x·wᵀ``), or None where this torch build lacks it; ``relation_loss`` runs its
    projections on it (faster than ``F.linear``'s MKL path on the CPUs measured, see
    docs/design.md). Probed once, on a tiny product checked against ``F.linear``."""
    if not _DNN_LINEAR:
        op = None
        try:
            cand = torch.ops.mkldnn._linear_pointwise
            if torch.backends.mkldnn.is_available():
                # fixed values: the probe must not draw from the caller's random stream
                x = torch.linspace(-1.0, 1.0, 35).reshape(5, 7)
                w = torch.linspace(1.0, -0.5, 21).reshape(3, 7)
                if torch.allclose(cand(x, w, None, "none", [], ""), torch.nn.functional.linear(x, w), atol=1e-5):
                    op = cand
        except (AttributeError, RuntimeError):
            op = None
        _DNN_LINEAR.append(op)
    return _DNN_LINEAR[0]


def backend_status() -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason)} for this process."""
    ext = extension()
    status = {"reference": (True, "eager PyTorch")}
    status["cpu"] = (True, "C++ kernels in sslkern._C") if ext is not None else (False, _ext_error or "")
    if ext is None:
        status["cuda"] = (False, "sslkern._C is not built")
    elif not ext.cuda_built():
        status["cuda"] = (False, "sslkern._C was built without CUDA (CPU-only torch, no nvcc, or SSLKERN_CUDA=0)")
    elif not torch.cuda.is_available():
        status["cuda"] = (False, "built with CUDA kernels, but no CUDA device is visible")
    else:
        status["cuda"] = (True, "CUDA C++ kernels in sslkern._C")
    if importlib.util.find_spec("triton") is None:
        status["triton"] = (False, "triton is not installed")
    elif torch.cuda.is_available():
        status["triton"] = (True, "CUDA device present")
    elif triton_interpret():
        status["triton"] = (True, "TRITON_INTERPRET=1: interpreter on CPU tensors (slow; for tests)")
    else:
        status["triton"] = (False, "no CUDA device (set TRITON_INTERPRET=1 to run the interpreter on CPU)")
    return status


# ---------------------------------------------------------------------------------------
# Forcing a backend
# ---------------------------------------------------------------------------------------
def _validate(name: str | None) -> str | None:
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every sslkern op in this block onto one backend (``None``/"auto" = default rule)."""
    token = _forced.set(_validate(name))
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend(explicit: str | None = None) -> str | None:
    """The backend asked for by argument, context or environment (None = auto)."""
    return _validate(explicit) or _forced.get() or _validate(os.environ.get("SSLKERN_BACKEND"))


# ---------------------------------------------------------------------------------------
# Per-op dispatch table
# ---------------------------------------------------------------------------------------
_warned: set[str] = set()


class Dispatch:
    """The implementations of one op, by backend, and the rule that picks one.

    ``impls`` maps a backend to a zero-argument loader that returns the callable; loaders
    keep Triton (and the extension) from being imported until an op actually needs them.
    Every implementation takes the custom op's arguments minus ``backend``.

    ``gpu_order``: the backends tried, in order, for CUDA tensors.
    ``checks_indices``: the backends whose kernels check every index value themselves (the
    public function then skips its front-door check, see :meth:`needs_index_check`).
    ``forced_missing``: what a forced backend the op does not implement does: ``"error"``,
    or ``"default"`` (use the default rule; for helpers such as the Sinkhorn teacher that
    only some backends have).
    """

    def __init__(self, op: str, impls: dict[str, Callable[[], Callable]],
                 gpu_order: tuple[str, ...] = ("triton", "cuda"), checks_indices: tuple[str, ...] = (),
                 forced_missing: str = "error"):
        unknown = set(impls) - set(BACKENDS)
        if unknown:
            raise ValueError(f"{op}: unknown backends {unknown}")
        if forced_missing not in ("error", "default"):
            raise ValueError(f"{op}: forced_missing expected 'error' or 'default', got {forced_missing!r}")
        self.op = op
        self._loaders = impls
        self._cache: dict[str, Callable] = {}
        self.gpu_order = gpu_order
        self._checks_indices = frozenset(checks_indices)
        self._forced_missing = forced_missing

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if b in self._loaders)

    def _load(self, backend: str) -> Callable:
        fn = self._cache.get(backend)
        if fn is None:
            fn = self._cache[backend] = self._loaders[backend]()
        return fn

    def usable(self, backend: str, device: torch.device) -> tuple[bool, str]:
        """(whether ``backend`` can run tensors on ``device`` here, why not)."""
        if backend not in self._loaders:
            return False, f"{self.op} has no {backend} implementation (it has: {', '.join(self.backends)})"
        if backend == "reference":
            return True, ""
        ok, why = backend_status()[backend]
        if not ok:
            return False, why
        if backend == "cpu" and device.type != "cpu":
            return False, f"the cpu backend takes CPU tensors, got {device}"
        if backend == "cuda" and device.type != "cuda":
            return False, f"the cuda backend takes CUDA tensors, got {device}"
        if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
            return False, f"the triton backend takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        return True, ""

    def resolve(self, device: torch.device, backend: str | None = None) -> str:
        """The backend that will run for tensors on ``device``."""
        want = requested_backend(backend)
        if want is not None and want not in self._loaders and self._forced_missing == "default":
            want = None
        if want is not None:
            ok, why = self.usable(want, device)
            if not ok:
                raise RuntimeError(f"sslkern.{self.op}: backend {want!r} cannot run here: {why}")
            return want
        order = ("cpu",) if device.type == "cpu" else self.gpu_order
        for b in order:
            if self.usable(b, device)[0]:
                return b
        if device.type == "cpu" and "cpu" in self._loaders and self.op not in _warned:
            _warned.add(self.op)
            warnings.warn(
                f"sslkern.{self.op}: C++ kernels unavailable ({backend_status()['cpu'][1]}); using the eager reference",
                RuntimeWarning,
                stacklevel=3,
            )
        return "reference"

    def needs_index_check(self, device: torch.device, backend: str | None = None) -> bool:
        """Whether the public function should check index values before the call: not when the
        backend that will run checks every index in its kernel (the check would be a second
        pass), nor while ``torch.compile`` traces (the check's host sync would break the graph)."""
        if torch.compiler.is_compiling():
            return False
        return self.resolve(device, backend) not in self._checks_indices

    def __call__(self, device: torch.device, backend: str | None = None) -> Callable:
        """The implementation for tensors on ``device``; for a CUDA device it runs under
        ``torch.cuda.device(device)``, so kernels launch on the inputs' GPU (Triton launches on
        the current device) even when another GPU is current."""
        fn = self._load(self.resolve(device, backend))
        return on_device(fn, device)


def on_device(fn: Callable, device: torch.device) -> Callable:
    """``fn`` made to run with ``device`` current when it is a CUDA device (else ``fn`` itself)."""
    if device.type != "cuda":
        return fn

    def run(*args, **kwargs):
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return run


def ext_op(name: str) -> Callable[[], Callable]:
    """Loader for a kernel registered by the extension as ``torch.ops.sslkern_C.<name>``."""

    def load():
        if extension() is None:
            raise RuntimeError(_ext_error or "sslkern._C is not built")
        return getattr(torch.ops.sslkern_C, name)

    return load


def module_attr(module: str, attr: str) -> Callable[[], Callable]:
    """Loader for ``module.attr`` imported on first use (Triton kernels, references)."""
    return lambda: getattr(importlib.import_module(module), attr)


def standard_impls(name: str, eager: Callable, *, triton_module: str | None = None,
                   cuda: bool = False) -> dict[str, Callable[[], Callable]]:
    """The backend table of an op that follows the naming rule (docs/design.md): ``eager`` (the
    ``reference`` backend), ``sslkern_C.NAME_cpu``, ``sslkern.triton_ops.<module>.NAME_triton``
    (module = ``triton_module`` or NAME) and, with ``cuda``, ``sslkern_C.NAME_cuda``."""
    impls = {"reference": lambda: eager, "cpu": ext_op(f"{name}_cpu"),
             "triton": module_attr(f"sslkern.triton_ops.{triton_module or name}", f"{name}_triton")}
    if cuda:
        impls["cuda"] = ext_op(f"{name}_cuda")
    return impls
