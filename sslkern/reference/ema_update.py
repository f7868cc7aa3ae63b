"""Eager reference for ``ema_update_`` (timm ``ModelEmaV3``, fairseq ``EMAModule``).

Follows fairseq ``EMAModule._step_internal`` (``ema.mul_(m).add_(param.to(dtype), alpha=1-m)``)
and timm ``ModelEmaV3`` (``lerp_`` with weight ``1 - m``); half-precision teachers are
updated in fp32 and rounded once.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(teachers: list[torch.Tensor], students: list[torch.Tensor], momentum) -> None:
    for t, s in zip(teachers, students):
        weight = 1.0 - momentum
        if isinstance(weight, torch.Tensor):
            weight = weight.to(device=t.device, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        if t.dtype in (torch.float32, torch.float64):
            t.lerp_(s.to(t.dtype), weight)
        else:
            t.copy_(t.float().lerp_(s.float(), weight))
