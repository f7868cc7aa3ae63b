"""Drop-in for timm ``utils.ModelEmaV3`` running :func:`sslkern.ema_update_`.

::

    from timm.utils import ModelEmaV3            # before
    from sslkern.compat.timm import ModelEmaV3   # after

Same constructor, ``get_decay`` (``update_after_step``, ``use_warmup`` power warm-up,
``min_decay``), ``update(model, step=None)``, ``set``, ``forward``, ``module`` (so the
state dict keys are ``module.*``, as timm's). Every floating tensor of the state dict is
averaged (``exclude_buffers=True``: parameters averaged, buffers copied), non-floating
ones copied, pairs taken in state-dict order, as timm does — in one fused pass instead of
``_foreach_lerp_`` (or ``mul_`` + ``add_`` for mixed dtypes), and without rebuilding two
state dicts per step (the pairing is cached and rebuilt when a tensor is replaced).

bfloat16 EMA tensors with ``stochastic_rounding=True`` (timm's default) are handed to timm's
own stochastic-rounding update with the same private generator, so they match timm bit for
bit; this needs timm installed (a timm without it rounds to nearest, as older timm did).
"""
from __future__ import annotations

from copy import deepcopy
from typing import Optional

import torch
from torch import nn

from .._checks import fail
from ._common import ema_pairs, fused_ema_

__all__ = ["ModelEmaV3"]


def _timm_stochastic_lerp():
    try:
        from timm.utils.model_ema import _lerp_stochastic_round_bf16_
    except Exception:  # timm absent or older than stochastic rounding
        return None
    return _lerp_stochastic_round_bf16_


class ModelEmaV3(nn.Module):
    """timm ``ModelEmaV3`` with the update in :func:`sslkern.ema_update_` (see the module doc)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 stochastic_rounding: bool = True, stochastic_rounding_seed: int = 0, foreach: bool = True,
                 exclude_buffers: bool = False):
        super().__init__()
        self.module = deepcopy(model)
        self.module.eval()
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.foreach = foreach  # accepted for compatibility; the update is always one fused pass
        self.device = device
        self.dtype = dtype
        self.stochastic_rounding = stochastic_rounding
        self.stochastic_rounding_seed = stochastic_rounding_seed
        self.exclude_buffers = exclude_buffers
        if device is not None and device != next(model.parameters()).device:
            self.module.to(device=device)
        if dtype is not None:
            self.module.to(dtype=dtype)
        self._sr_generator = torch.Generator(device=next(self.module.parameters()).device)
        self._sr_generator.manual_seed(stochastic_rounding_seed)
        self._plan_key = None
        self._plan = None

    def get_decay(self, step: Optional[int] = None) -> float:
        """timm's rule: ``decay`` without a step; 0 for the first ``update_after_step + 1``
        steps; with ``use_warmup`` ``1 − (1 + n/γ)^−power`` clamped to [min_decay, decay]."""
        if step is None:
            return self.decay
        n = max(0, step - self.update_after_step - 1)
        if n <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        d = 1 - (1 + n / self.warmup_gamma) ** -self.warmup_power
        return max(min(d, self.decay), self.min_decay)

    # -- pairing ------------------------------------------------------------------------
    @staticmethod
    def _tensors_key(m: nn.Module):
        return tuple(t.data_ptr() for t in m.parameters()) + tuple(t.data_ptr() for t in m.buffers())

    def _build_plan(self, model: nn.Module, exclude_buffers: bool):
        op = "compat.timm.ModelEmaV3.update"
        if exclude_buffers:
            lerp_t, lerp_s, copy_t, copy_s = ema_pairs(op, [p.data for p in self.module.parameters()],
                                                       [p.detach() for p in model.parameters()])
            ema_b, model_b = list(self.module.buffers()), list(model.buffers())
            if len(ema_b) != len(model_b):
                fail(op, f"model expected {len(ema_b)} buffers (as many as the EMA copy), got {len(model_b)}")
            copy_t, copy_s = copy_t + ema_b, copy_s + model_b
        else:
            ema_sd, model_sd = self.module.state_dict(), model.state_dict()
            lerp_t, lerp_s, copy_t, copy_s = ema_pairs(op, list(ema_sd.values()), list(model_sd.values()),
                                                       names=list(model_sd.keys()))
        sr = []
        if self.stochastic_rounding:
            sr = [(t, s) for t, s in zip(lerp_t, lerp_s) if t.dtype == torch.bfloat16]
            keep = [(t, s) for t, s in zip(lerp_t, lerp_s) if t.dtype != torch.bfloat16]
            lerp_t, lerp_s = [t for t, _ in keep], [s for _, s in keep]
        return lerp_t, lerp_s, copy_t, copy_s, sr

    def _plan_for(self, model: nn.Module, exclude_buffers: bool):
        key = (id(model), self._tensors_key(model), self._tensors_key(self.module), exclude_buffers)
        if key != self._plan_key:
            self._plan, self._plan_key = self._build_plan(model, exclude_buffers), key
        return self._plan

    # -- update -------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        self._apply_decay(model, self.get_decay(step), self.exclude_buffers)

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        """timm's method: one update with an explicit ``decay`` (every floating state-dict tensor)."""
        self._apply_decay(model, decay, False)

    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        """timm's method: parameters averaged with ``decay``, buffers copied."""
        self._apply_decay(model, decay, True)

    @torch.no_grad()
    def _apply_decay(self, model: nn.Module, decay: float, exclude_buffers: bool) -> None:
        lerp_t, lerp_s, copy_t, copy_s, sr = self._plan_for(model, exclude_buffers)
        fused_ema_(lerp_t, lerp_s, decay)
        if sr:
            fn = _timm_stochastic_lerp()
            sr_t, sr_s = [t for t, _ in sr], [s.to(t.device) for t, s in sr]
            if fn is not None:
                fn(sr_t, sr_s, 1.0 - decay, generator=self._sr_generator)
            else:
                fused_ema_(sr_t, sr_s, decay)
        for t, s in zip(copy_t, copy_s):
            t.copy_(s.to(device=t.device))

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            ema_v.copy_(model_v.to(device=self.device))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
