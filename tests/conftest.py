"""Shared test setup.

Without a GPU the Triton backend runs in the interpreter on CPU tensors: the variable must
be set before any Triton kernel is defined, hence here, before sslkern is imported.
"""
import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the repository tools (tools/gpu_report.py, tools/gpu_model.py) are tested too
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import sslkern  # noqa: E402
from sslkern._backend import backend_status  # noqa: E402

STATUS = backend_status()


def available_backends(dispatch, device: str = "cpu") -> list[str]:
    """The backends of an op that can run tensors on ``device`` in this process."""
    out = []
    for b in dispatch.backends:
        ok, _ = dispatch.usable(b, torch.device(device))
        if ok:
            out.append(b)
    return out


def backend_params(dispatch, include_reference: bool = False):
    """pytest params over an op's backends; unavailable ones are skipped with the reason.

    The cpu and triton backends are exercised on CPU tensors (Triton through the
    interpreter); cuda only with a GPU (marked ``cuda``).
    """
    params = []
    for b in dispatch.backends:
        if b == "reference" and not include_reference:
            continue
        device = "cuda" if b == "cuda" or (b == "triton" and torch.cuda.is_available()) else "cpu"
        marks = [pytest.mark.cuda] if device == "cuda" else []
        ok, why = (True, "") if b == "reference" else dispatch.usable(b, torch.device(device)) if (
            device == "cpu" or torch.cuda.is_available()) else (False, "no CUDA device")
        if not ok:
            marks.append(pytest.mark.skip(reason=f"{b}: {why}"))
        params.append(pytest.param((b, device), id=b, marks=marks))
    return params


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, but reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts host syncs: every tensor -> Python scalar read (``.item()``, ``bool()``, ``int()``)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))
