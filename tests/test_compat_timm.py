"""sslkern.compat.timm.ModelEmaV3 against timm's ModelEmaV3 on the same model and steps.

EMA states: fp32 rtol/atol 1e-6 (``lerp`` vs ``m·t + (1−m)·s`` rounding); bf16 EMA with
stochastic rounding: equal bit for bit (timm's own routine, same generator); integer
buffers exact.
"""
import pytest
import torch
from torch import nn

timm_ema = pytest.importorskip("timm.utils.model_ema")

from sslkern.compat.timm import ModelEmaV3  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.bn = nn.BatchNorm1d(10)
        self.b = nn.Linear(10, 3)
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)


def _train_a_bit(net, gen):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    net.train()
    net.bn(torch.randn(8, 10, generator=gen).to(net.bn.weight.dtype))  # moves running stats, num_batches_tracked


def _assert_same(ours, ref, tol=1e-6):
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=k)
        else:
            assert torch.equal(a, b), k


@pytest.mark.parametrize("kw", [
    dict(decay=0.9),
    dict(decay=0.99, use_warmup=True, warmup_power=0.75, update_after_step=2, min_decay=0.1),
    dict(decay=0.95, exclude_buffers=True),
])
def test_matches_timm(kw):
    gen = torch.Generator().manual_seed(0)
    net = Net()
    ref, ours = timm_ema.ModelEmaV3(net, **kw), ModelEmaV3(net, **kw)
    for step in range(6):
        assert ours.get_decay(step) == ref.get_decay(step)
        _train_a_bit(net, gen)
        ref.update(net, step=step)
        ours.update(net, step=step)
        _assert_same(ours, ref)
    ref.update(net)  # no step: plain decay
    ours.update(net)
    _assert_same(ours, ref)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_mixed_dtype_and_bf16_stochastic_rounding():
    gen = torch.Generator().manual_seed(1)
    net = Net().to(torch.bfloat16)
    ref, ours = timm_ema.ModelEmaV3(net, decay=0.9, dtype=torch.float32), ModelEmaV3(net, decay=0.9,
                                                                                     dtype=torch.float32)
    for step in range(3):
        _train_a_bit(net, gen)
        ref.update(net, step=step + 5)
        ours.update(net, step=step + 5)
    _assert_same(ours, ref, tol=1e-5)

    net = Net().to(torch.bfloat16)
    ref, ours = timm_ema.ModelEmaV3(net, decay=0.999), ModelEmaV3(net, decay=0.999)  # bf16 EMA, SR
    for step in range(3):
        _train_a_bit(net, gen)
        ref.update(net)
        ours.update(net)
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_plan_follows_replaced_tensors_and_set():
    net = Net()
    ours = ModelEmaV3(net, decay=0.5)
    ours.update(net)
    net.a.weight = nn.Parameter(torch.ones(10, 6))  # replaced tensor: the pairing is rebuilt
    ours.update(net)
    w0 = ours.module.a.weight.clone()
    ours.update(net)
    torch.testing.assert_close(ours.module.a.weight, 0.5 * w0 + 0.5)
    ours.set(net)
    assert torch.equal(ours.module.a.weight, net.a.weight)
    with pytest.raises(ValueError, match=r"ModelEmaV3.update: model a.weight expected shape \(10, 6\)"):
        bad = Net()
        bad.a = nn.Linear(7, 10)
        ours.update(bad)
