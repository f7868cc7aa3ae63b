"""Device placement without a GPU: the dispatch layer runs CUDA implementations under the
inputs' device, and ``init_distributed`` picks the device a recipe asked for.

``torch.cuda`` calls are replaced by recorders, so these run on CPU; on a GPU the same
behaviour is exercised for real by ``python -m sslkern.gpu_check`` (tensors on the last
GPU while GPU 0 is current).
"""
import contextlib

import pytest
import torch

from sslkern import _backend
from sslkern.train import distributed


@pytest.fixture
def device_log(monkeypatch):
    """Replace torch.cuda.device with a recorder: [('enter', device), ('call', ...), ('exit', device)]."""
    log = []

    @contextlib.contextmanager
    def fake_device(dev):
        log.append(("enter", torch.device(dev)))
        try:
            yield
        finally:
            log.append(("exit", torch.device(dev)))

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    return log


def test_dispatch_runs_cuda_implementations_under_the_input_device(device_log):
    def impl(x):
        device_log.append(("call", x))
        return x + 1

    d = _backend.Dispatch("probe_op", {"reference": lambda: impl})
    out = d(torch.device("cuda", 1), "reference")(41)
    assert out == 42
    assert device_log == [("enter", torch.device("cuda", 1)), ("call", 41), ("exit", torch.device("cuda", 1))]


def test_dispatch_leaves_cpu_calls_alone(device_log):
    impl = lambda x: x  # noqa: E731
    d = _backend.Dispatch("probe_op", {"reference": lambda: impl})
    assert d(torch.device("cpu"), "reference") is impl  # no wrapper, no device switch
    assert device_log == []


def test_device_guard_is_left_on_error(device_log):
    def impl():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _backend.on_device(impl, torch.device("cuda", 3))()
    assert device_log == [("enter", torch.device("cuda", 3)), ("exit", torch.device("cuda", 3))]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.set_device / current_device recorders; no process group."""
    calls = {"set": [], "current": 5}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set"].append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls["current"])
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.setdefault("pg", kw))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    return calls


@pytest.mark.parametrize("asked,index", [("cuda:3", 3), ("cuda:0", 0), ("cuda", 5)])
def test_single_process_runs_on_the_device_asked_for(fake_cuda, monkeypatch, asked, index):
    monkeypatch.setenv("LOCAL_RANK", "2")  # a stray LOCAL_RANK must not decide a single process's device
    info = distributed.init_distributed(asked)
    assert info.device == torch.device("cuda", index)
    assert fake_cuda["set"] == [torch.device("cuda", index)]
    assert info.world_size == 1 and "pg" not in fake_cuda


def test_torchrun_rank_uses_its_local_rank(fake_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = distributed.init_distributed("cuda:3")
    assert info.device == torch.device("cuda", 1)
    assert fake_cuda["set"] == [torch.device("cuda", 1)]
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert fake_cuda["pg"] == {"backend": "nccl"}


def test_cpu_device_touches_no_cuda(fake_cuda):
    info = distributed.init_distributed("cpu")
    assert info.device == torch.device("cpu") and fake_cuda["set"] == []
