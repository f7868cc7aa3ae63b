"""DINO multi-crop loss and iBOT patch loss, forward + backward + center update (issue #3).

Cases:
  DINO   B = 32 images, K = 65,536 prototypes, 2 global + 6 local crops, fp32: student
         logits (256, 65536), teacher logits (64, 65536), center (65536,).
  iBOT   64 global-crop images × 196 patches, half the images masked at 10-50 % (seeded),
         K = 8,192, fp32: (M, K) masked student / teacher token logits.
Timed work: the loss, its gradient w.r.t. the student logits and the center update.

Providers:
  sslkern    sslkern.dino_loss / ibot_patch_loss with center_momentum (C++ on CPU, Triton on GPU)
  reference  dino DINOLoss math in eager PyTorch (sslkern.reference) + center update
  compiled   torch.compile of the reference
  lightly    lightly.loss.DINOLoss / IBOTPatchLoss (updates its own center)
"""
import pytest
import torch

import sslkern
from sslkern import reference as R
from harness import measure

B, K, V, T = 32, 65536, 8, 2
IB, IL, IK = 64, 196, 8192
_data: dict = {}
_compiled: dict = {}


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def dino_data():
    if "dino" not in _data:
        g = torch.Generator().manual_seed(0)
        s = (torch.randn(V * B, K, generator=g) * 3).to(_dev()).requires_grad_(True)
        t = (torch.randn(T * B, K, generator=g) * 3).to(_dev())
        c = (torch.randn(K, generator=g) * 0.3).to(_dev())
        _data["dino"] = (s, t, c)
    return _data["dino"]


def ibot_data():
    if "ibot" not in _data:
        g = torch.Generator().manual_seed(0)
        masks = torch.zeros(IB, IL, dtype=torch.bool)
        for i in range(0, IB, 2):  # half the images, 10-50 % of their patches
            n = int(IL * (0.1 + 0.4 * torch.rand((), generator=g).item()))
            masks[i, torch.randperm(IL, generator=g)[:n]] = True
        M = int(masks.sum())
        s = (torch.randn(M, IK, generator=g) * 3).to(_dev()).requires_grad_(True)
        t = (torch.randn(M, IK, generator=g) * 3).to(_dev())
        c = (torch.randn(IK, generator=g) * 0.3).to(_dev())
        _data["ibot"] = (s, t, c, masks.to(_dev()))
    return _data["ibot"]


def dino_reference_step(s, t, c):
    loss = R.dino_loss(s, t, c, 0.1, 0.04, T)
    new_c = R.center_update(c, t, 0.9)
    return loss, new_c


def ibot_reference_step(s, t, c, masks):
    loss = R.ibot_patch_loss(s, t, masks, c, 0.1, 0.04)
    new_c = 0.9 * c + 0.1 * t.mean(0)
    return loss, new_c


def _fn(provider, kind):
    if kind == "dino":
        s, t, c = dino_data()
        args = (s, t, c)
        ours = lambda: sslkern.dino_loss(s, t, c, n_global_crops=T, center_momentum=0.9)  # noqa: E731
        ref = dino_reference_step
    else:
        s, t, c, masks = ibot_data()
        args = (s, t, c, masks)
        ours = lambda: sslkern.ibot_patch_loss(s, t, masks, c, center_momentum=0.9)  # noqa: E731
        ref = ibot_reference_step
    if provider == "sslkern":
        step = ours
    elif provider == "reference":
        step = lambda: ref(*args)  # noqa: E731
    elif provider == "compiled":
        if kind not in _compiled:
            _compiled[kind] = torch.compile(ref)
        step = lambda: _compiled[kind](*args)  # noqa: E731
    elif provider == "lightly":
        lightly_loss = pytest.importorskip("lightly.loss")
        if kind == "dino":
            crit = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                         warmup_teacher_temp_epochs=0).to(_dev())
            step = lambda: (crit(list(t.chunk(T)), list(s.chunk(V)), epoch=0), None)  # noqa: E731
        else:
            crit = lightly_loss.IBOTPatchLoss(output_dim=IK).to(_dev())
            grid = int(round(masks.shape[1] ** 0.5))  # lightly takes the mask as (B, H, W)
            masks_hw = masks.reshape(masks.shape[0], grid, grid)
            step = lambda: (crit(t, s, masks_hw), None)  # noqa: E731
    else:
        raise ValueError(provider)

    def run():
        loss, _ = step()
        torch.autograd.grad(loss, s)

    return run


@pytest.mark.parametrize("provider", ["sslkern", "sslkern_nocache", "reference", "compiled", "lightly"])
def test_dino_loss_b32_k65536(benchmark, provider):
    # fewest bytes: read student and teacher once, write the student gradient
    bytes_moved = 4 * K * (V * B + T * B + V * B)
    measure(benchmark, op="dino_loss", case=f"B={B} K={K} {T}+{V - T} crops fp32 fwd+bwd+center",
            provider=provider, fn=_fn(provider.removesuffix("_nocache"), "dino"), bytes_moved=bytes_moved,
            target={"reference": 10.0, "lightly": 10.0, "compiled": 5.0}.get(provider), rounds=3, warmup=1)


@pytest.mark.parametrize("provider", ["sslkern", "reference", "compiled", "lightly"])
def test_ibot_patch_loss_64x196_k8192(benchmark, provider):
    s, t, _, _ = ibot_data()
    bytes_moved = 4 * IK * 3 * s.shape[0]
    measure(benchmark, op="ibot_patch_loss", case=f"{IB}x{IL} patches, half masked 10-50% (M={s.shape[0]}) "
                                                  f"K={IK} fp32 fwd+bwd+center",
            provider=provider, fn=_fn(provider, "ibot"), bytes_moved=bytes_moved,
            target={"reference": 5.0, "lightly": 5.0, "compiled": 2.0}.get(provider), rounds=3, warmup=1)
