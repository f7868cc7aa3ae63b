"""Package-level behaviour: backend rule, forcing, availability report, argument checks."""
import subprocess
import sys

import pytest
import torch

import sslkern
from sslkern import _checks
from sslkern._backend import Dispatch, requested_backend


def test_info_runs_and_lists_ops():
    out = subprocess.run([sys.executable, "-m", "sslkern.info"], capture_output=True, text=True, check=True).stdout
    assert "backends:" in out and "ema_update_" in out and "torch" in out and "CPU output cache" in out


def test_extension_is_built():
    # CI builds the extension; a silent fallback to the reference would hide a broken build.
    ok, why = sslkern.backend_status()["cpu"]
    assert ok, why


def test_forcing_precedence(monkeypatch):
    monkeypatch.setenv("SSLKERN_BACKEND", "reference")
    assert requested_backend() == "reference"
    with sslkern.use_backend("cpu"):
        assert requested_backend() == "cpu"
        assert requested_backend("reference") == "reference"
    monkeypatch.setenv("SSLKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        requested_backend()


def test_dispatch_rule_and_unknown_backend():
    d = Dispatch("toy", {"reference": lambda: "ref", "cpu": lambda: "cpu"})
    assert d.resolve(torch.device("cpu")) == "cpu"
    with pytest.raises(RuntimeError, match="toy has no triton implementation"):
        d.resolve(torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="unknown backends"):
        Dispatch("toy", {"fpga": lambda: None})


@pytest.mark.parametrize("shape,perm,dense", [
    ((3, 4), (0, 1), True), ((3, 4), (1, 0), True), ((2, 3, 4, 5), (0, 2, 3, 1), True), ((0, 3), (0, 1), True),
])
def test_is_dense_permutations(shape, perm, dense):
    x = torch.empty(shape).permute(perm)
    assert _checks.is_dense(x) == dense


def test_is_dense_rejects_slices():
    assert not _checks.is_dense(torch.empty(4, 6)[:, :3])
    assert not _checks.is_dense(torch.empty(10)[::2])
    assert _checks.is_dense(torch.empty(4, 6)[1:3])


def test_check_tensor_messages():
    with pytest.raises(TypeError, match=r"sslkern.op: x expected a torch.Tensor, got list"):
        _checks.check_tensor("op", "x", [1])
    with pytest.raises(ValueError, match=r"sslkern.op: x expected shape \(\*, 4\), got \(3, 5\)"):
        _checks.check_tensor("op", "x", torch.empty(3, 5), shape=(None, 4))
    with pytest.raises(ValueError, match=r"x expected 2 or 3 dims"):
        _checks.check_tensor("op", "x", torch.empty(3), ndim=(2, 3))
