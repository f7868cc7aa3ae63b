"""EMA teacher over a student module, updated by one fused ``ema_update_`` call."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops._common import dtensor_class, local_shards
from ..ops.ema_update import ema_update_


def _unwrap(module: nn.Module) -> nn.Module:
    # DistributedDataParallel / torch.compile wrappers keep the real network in .module / ._orig_mod
    while hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return getattr(module, "_orig_mod", module)


def _data_ptr(p: torch.Tensor) -> int:
    dtensor = dtensor_class()
    return p.to_local().data_ptr() if dtensor is not None and isinstance(p, dtensor) else p.data_ptr()


class EMATeacher(nn.Module):
    """A frozen copy of a student whose parameters follow ``θt ← m·θt + (1 − m)·θs``.

    Semantics (fairseq ``EMAModule`` / timm ``ModelEmaV3``):
      - student parameters that require grad are averaged, in one fused pass;
      - parameters with ``requires_grad=False`` and all buffers (integer ones too) are copied;
      - student parameters the teacher does not have (a decoder, a predictor) are skipped;
        a teacher parameter with no student counterpart is an error.

    Args:
        student: the network to follow; the teacher starts as a deep copy of it (or of
            ``teacher`` when given, e.g. the student's encoder only).
        teacher: optional module to use as the teacher instead of a copy of ``student``.
        dtype: keep the teacher's floating parameters and buffers in this dtype (e.g.
            ``torch.float32`` while the student trains in bf16); arithmetic is fp32.

    ``update(student, momentum)`` takes ``momentum`` as a float or a 0-dim tensor.
    ``forward`` runs the teacher network (under the caller's grad mode; wrap it in
    ``torch.no_grad()``).

    Sharded (FSDP2 ``fully_shard``): teacher and student must be sharded alike (the same
    units, so every teacher parameter has its student's mesh and placements); each rank
    then averages its local shards in one fused pass. A mismatch is an error naming the
    parameter.
    """

    def __init__(self, student: nn.Module, *, teacher: nn.Module | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.module = teacher if teacher is not None else copy.deepcopy(_unwrap(student))
        if dtype is not None:
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                if t.is_floating_point():
                    t.data = t.data.to(dtype)
        self.module.requires_grad_(False)
        self._plan_key = None
        self._plan = None

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _build_plan(self, student: nn.Module):
        s_params = dict(student.named_parameters())
        s_buffers = dict(student.named_buffers())
        avg_t, avg_s, copy_t, copy_s = [], [], [], []
        avg_n, copy_n = [], []
        for name, tp in self.module.named_parameters():
            sp = s_params.get(name)
            if sp is None:
                raise ValueError(f"EMATeacher: teacher parameter {name!r} has no counterpart in the student")
            if sp.shape != tp.shape:
                raise ValueError(f"EMATeacher: parameter {name!r} has shape {tuple(tp.shape)} in the teacher "
                                 f"and {tuple(sp.shape)} in the student")
            if sp.requires_grad and sp.is_floating_point() and tp.is_floating_point():
                avg_t.append(tp.data)
                avg_s.append(sp.detach())
                avg_n.append(name)
            else:
                copy_t.append(tp.data)
                copy_s.append(sp.detach())
                copy_n.append(name)
        for name, tb in self.module.named_buffers():
            sb = s_buffers.get(name)
            if sb is not None:
                copy_t.append(tb)
                copy_s.append(sb.detach())
                copy_n.append(name)
        # sharded parameters: this rank's local shards (the same elements of teacher and student)
        avg_t, avg_s = local_shards("EMATeacher", avg_t, avg_s, avg_n)
        copy_t, copy_s = local_shards("EMATeacher", copy_t, copy_s, copy_n)
        return avg_t, avg_s, copy_t, copy_s

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | torch.Tensor) -> None:
        student = _unwrap(student)
        # The plan (which tensors pair up) depends only on the two modules' tensors:
        # rebuild it if any of them was replaced (e.g. .to(), load_state_dict(assign=True)).
        key = (id(student), tuple(map(_data_ptr, student.parameters())), tuple(map(_data_ptr, self.module.parameters())))
        if key != self._plan_key:
            self._plan, self._plan_key = self._build_plan(student), key
        avg_t, avg_s, copy_t, copy_s = self._plan
        ema_update_(avg_t, avg_s, momentum)
        for t, s in zip(copy_t, copy_s):
            t.copy_(s)
