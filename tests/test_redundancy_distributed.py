"""Barlow Twins, VICReg and SwAV on 2 gloo ranks (launched as torchrun would): the sslkern.nn
modules give the one-process loss and gradients; the official Barlow Twins code gives 1/world of
the gradient, the official VICReg and SwAV code and lightly's BarlowTwinsLoss(gather_distributed=True)
the same as sslkern (see tests/redundancy_worker.py)."""
import os

import pytest

from test_fsdp import launch, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_ranks_equal_one_process_and_the_official_code():
    pytest.importorskip("lightly")
    procs = launch(os.path.join(ROOT, "tests", "redundancy_worker.py"), [], 2)
    out = wait(procs, timeout=600)
    assert "all checks passed" in out
