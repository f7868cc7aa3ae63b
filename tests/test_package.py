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
    assert "--precision auto" in out and "cpu, the digits default, dim 96: fp32" in out


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


def test_public_api_is_declared():
    assert len(set(sslkern.__all__)) == len(sslkern.__all__)
    for name in sslkern.__all__:
        assert hasattr(sslkern, name), name
    # one way to do one thing: the removed second forms stay removed
    assert not hasattr(sslkern.nn, "encode_visible")  # sslkern.patch.forward_masked
    assert not hasattr(sslkern.nn.DINOHead, "fused_loss")  # sslkern.nn.DINOLoss(..., layers) / prototype_loss
    assert not hasattr(sslkern.nn.DINOLoss, "forward_fused")


def test_the_package_holds_no_repository_tool():
    """Tools that read csrc/ or write docs/ live in tools/, not in the package."""
    import pathlib
    import re

    pkg = pathlib.Path(sslkern.__file__).parent
    assert not (pkg / "gpu_report.py").exists() and not (pkg / "gpu_model.py").exists()
    for path in pkg.rglob("*.py"):
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"""["'](csrc|docs)["']""", code), path


def test_checks_refuse_nan_inf_and_non_numbers():
    with pytest.raises(ValueError, match=r"sslkern.op: t expected a finite number, got nan"):
        _checks.check_float("op", "t", float("nan"), 0.0, None, lo_open=True)
    with pytest.raises(ValueError, match="expected a finite number, got inf"):
        _checks.check_float("op", "t", float("inf"))
    assert _checks.check_float("op", "t", float("inf"), finite=False) == float("inf")
    with pytest.raises(TypeError, match="t expected a real number, got Tensor"):
        _checks.check_float("op", "t", torch.tensor(0.1))
    with pytest.raises(TypeError, match="t expected a real number, got bool"):
        _checks.check_float("op", "t", True)
    with pytest.raises(ValueError, match=r"t must be in \(0.0, inf\], got 0.0"):
        _checks.check_float("op", "t", 0, 0.0, None, lo_open=True)
    with pytest.raises(TypeError, match="n expected an int, got float"):
        _checks.check_int("op", "n", 2.0)
    with pytest.raises(TypeError, match="n expected an int, got bool"):
        _checks.check_int("op", "n", True)
    with pytest.raises(ValueError, match=r"n must be in \[1, 3\], got 4"):
        _checks.check_int("op", "n", 4, 1, 3)
    with pytest.raises(ValueError, match="x must be in"):
        _checks.check_range("op", "x", float("nan"), 0.0, 1.0)
    assert _checks.check_int("op", "n", torch.tensor(3).item()) == 3


def test_dispatch_forced_missing_and_index_checking_backends():
    d = Dispatch("toy", {"reference": lambda: "ref", "cpu": lambda: "cpu"}, forced_missing="default",
                 checks_indices=("cpu",))
    assert d.resolve(torch.device("cpu"), "triton") == "cpu"  # the op has no triton: the default rule
    assert not d.needs_index_check(torch.device("cpu")) and d.needs_index_check(torch.device("cpu"), "reference")
    with pytest.raises(ValueError, match="forced_missing"):
        Dispatch("toy", {}, forced_missing="maybe")


def test_scale_saved_gradient_rule():
    from sslkern.ops._common import scale_saved_gradient

    grad = torch.randn(5, 3).half()
    one = torch.ones(())
    with torch.no_grad():  # how backward runs without create_graph
        assert scale_saved_gradient(grad, one) is grad  # eager, exactly 1: no copy
    # with create_graph (grad mode on in backward) the result must stay a function of the incoming gradient
    assert scale_saved_gradient(grad, one) is not grad
    assert scale_saved_gradient(grad, torch.ones(()).double()).dtype == torch.float16
    scaled = scale_saved_gradient(grad * 0.25, torch.tensor(65536.0))  # fp32 product, one rounding
    assert torch.isfinite(scaled).all() and torch.equal(scaled, (grad * 0.25).float().mul(65536).half())


def test_saved_gradient_ops_under_create_graph():
    """With create_graph the gradient is a function of the incoming one (no g == 1 shortcut)."""
    s = torch.randn(6, 11, requires_grad=True)
    t, c = torch.randn(4, 11), torch.zeros(11)
    loss = sslkern.dino_loss(s, t, c)
    g = torch.ones((), requires_grad=True)
    (gs,) = torch.autograd.grad(loss, s, grad_outputs=g, create_graph=True)
    assert gs.requires_grad
    (gg,) = torch.autograd.grad(gs.sum(), g)
    torch.testing.assert_close(gg, gs.detach().sum())
    with pytest.raises(RuntimeError, match="sslkern.dino_loss: backward through a call that computed no gradient"):
        out = torch.ops.sslkern.dino_loss(s, t, c, None, 0.1, 0.1, 0.04, 3, 2, True, False, False, False, "")
        torch.autograd.grad(out[0], s)  # compute_grad=False: nothing was saved
