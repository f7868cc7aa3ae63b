"""The before/after training scripts of docs/integration.md run, give the same losses, and the
diffs printed in the doc are the diffs of the files.

Same losses: lightly DINO loop (lightly's DINOLoss + update_momentum vs sslkern's) and the
dinov2-style step (the test-only dinov2 transcription vs the drop-ins vs the fused calls):
rtol 1e-5 over 3 steps; timm step (timm attention + ModelEmaV3 vs patched ViT + sslkern
EMA): rtol 1e-4 (attention sums in another order and AdamW carries it over steps).
"""
import difflib
import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("lightly")

import _dinov2_ref  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
EX = DOCS / "integration"
PAIRS = [("timm_before.py", "timm_after.py"), ("lightly_before.py", "lightly_after.py"),
         ("dinov2_before.py", "dinov2_after.py"), ("dinov2_after.py", "dinov2_fused.py")]


@pytest.fixture
def dinov2_stub(monkeypatch):
    """``dinov2.loss`` = the test-only transcription, for the scripts' ``from dinov2.loss import``."""
    for name, mod in _dinov2_ref.as_dinov2_modules().items():
        monkeypatch.setitem(sys.modules, name, mod)


def load(name):
    spec = importlib.util.spec_from_file_location(f"integration_{name[:-3]}", EX / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def unified(a, b, n=2):
    la = (EX / a).read_text().splitlines(keepends=True)
    lb = (EX / b).read_text().splitlines(keepends=True)
    return "".join(difflib.unified_diff(la, lb, fromfile=a, tofile=b, n=n))


@pytest.mark.parametrize("a,b", PAIRS)
def test_doc_shows_the_real_diff(a, b):
    doc = (DOCS / "integration.md").read_text()
    diff = unified(a, b)
    assert diff and diff in doc, f"docs/integration.md must contain the diff {a} -> {b} (python -c 'see " \
                                 f"tests/test_integration_examples.py: unified')"


def test_lightly_loop_same_losses():
    before, after = load("lightly_before.py").main(steps=3), load("lightly_after.py").main(steps=3)
    assert all(torch.isfinite(torch.tensor(before)))
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), rtol=1e-5, atol=1e-6)


def test_timm_step_same_losses():
    before, after = load("timm_before.py").main(steps=3), load("timm_after.py").main(steps=3)
    assert all(torch.isfinite(torch.tensor(before)))
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), rtol=1e-4, atol=1e-6)


def test_dinov2_step_same_losses(dinov2_stub):
    before = load("dinov2_before.py").main(steps=3)
    after = load("dinov2_after.py").main(steps=3)
    fused = load("dinov2_fused.py").main(steps=3)
    assert all(torch.isfinite(torch.tensor(before)))
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(before), rtol=1e-5, atol=1e-6)
