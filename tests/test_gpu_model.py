"""The bytes-and-flops model (tools/gpu_model.py): hand formulas agree with a count of the eager
op sequence, and the counter itself counts what it claims to."""
import pytest
import torch
import torch.nn.functional as F

import gpu_model as gm  # tools/gpu_model.py (tests/conftest.py puts tools/ on sys.path)

ACCOUNTS = gm.accounts()


def _id(a):
    return f"{a.op}:{a.case[:40]}"


@pytest.mark.parametrize("acc", ACCOUNTS, ids=_id)
def test_eager_formula_matches_counted_op_sequence(acc):
    build = gm.program_for(acc)
    assert build is not None, f"no eager program for {_id(acc)}"
    counted, kernels = gm.count_eager(build())
    # The formulas leave out O(K)/O(B)-sized tensors and tiny ops: agree within 2 % in bytes.
    assert counted == pytest.approx(acc.eager_bytes, rel=0.02), (counted, acc.eager_bytes)
    assert abs(kernels - acc.eager_kernels) <= max(4, acc.eager_kernels // 20), (kernels, acc.eager_kernels)


@pytest.mark.parametrize("acc", ACCOUNTS, ids=_id)
def test_fused_moves_no_more_than_eager(acc):
    assert 0 < acc.fused_bytes <= acc.eager_bytes
    for gpu in gm.GPUS:
        assert acc.time(gpu, fused=True) <= acc.time(gpu, fused=False)


def test_every_op_has_an_account():
    ops = {a.op.split(" ")[0] for a in ACCOUNTS}
    assert ops >= {"ema_update_", "dino_loss", "ibot_patch_loss", "gather_tokens", "restore_tokens",
                   "alibi_attention", "layer_average_targets", "masked_regression_loss"}


def test_count_eager_rules():
    n = 1000
    a, b = torch.empty(n, device="meta"), torch.empty(n, device="meta")
    # one pointwise op: two reads, one write; views are free
    assert gm.count_eager(lambda: (a.view(10, 100) + b.view(10, 100)).t()) == (3 * n * 4, 1)
    # broadcast operand read once: (n,) + (1,) -> n + 1 reads, n writes
    assert gm.count_eager(lambda: a + torch.empty(1, device="meta").expand(n)) == ((2 * n + 1) * 4, 1)
    # in place: reads both, writes the target
    assert gm.count_eager(lambda: a.add_(b)) == (3 * n * 4, 1)
    # gather reads the index and the selected elements only
    src = torch.empty(64, 50, device="meta")
    idx = torch.empty(64, 5, dtype=torch.int64, device="meta")
    assert gm.count_eager(lambda: torch.gather(src, 1, idx)) == (64 * 5 * (8 + 4 + 4), 1)
    # autograd ops are seen too: log_softmax fwd (r+w) and bwd of sum (expand: free) + log_softmax bwd (2r+w)
    x = torch.empty(8, 16, device="meta", requires_grad=True)
    nbytes, kernels = gm.count_eager(lambda: F.log_softmax(x, -1).sum().backward())
    assert nbytes >= (2 + 3) * 8 * 16 * 4 and kernels >= 3


def test_render_markdown_labels_the_model():
    md = gm.render_markdown()
    assert "MODEL, not a measurement" in md and "(model)" in md
    for a in ACCOUNTS:
        assert f"| {a.op} | {a.case} |" in md
