"""``ema_update_`` — fused multi-tensor EMA of teacher parameters (timm ``ModelEmaV3``,
fairseq ``EMAModule``). The op layout is the one every op follows (docs/design.md, *How to
write an op*); this op mutates its inputs and has no gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._backend import Dispatch, standard_impls
from .._checks import FLOAT_DTYPES, check_float, check_tensor, fail, is_dense
from ._common import local_shards

OP = "ema_update_"
_FLOATS = frozenset(FLOAT_DTYPES)


def ema_update_eager(teachers, students, momentum, momentum_value):
    """The custom op's contract on the oracle ``sslkern.reference.ema_update_``."""
    from ..reference.ema_update import ema_update_

    ema_update_(teachers, students, momentum if momentum is not None else momentum_value)


dispatch = Dispatch(OP, standard_impls("ema_update", ema_update_eager, cuda=True))


@torch.library.custom_op("sslkern::ema_update_", mutates_args=("teachers",))
def _ema_update_op(
    teachers: list[torch.Tensor],
    students: list[torch.Tensor],
    momentum: Optional[torch.Tensor],
    momentum_value: float,
    backend: str,
) -> None:
    if teachers:
        dispatch(teachers[0].device, backend)(teachers, students, momentum, momentum_value)


@_ema_update_op.register_fake
def _(teachers, students, momentum, momentum_value, backend):
    return None


def ema_update_(
    teachers: Sequence[torch.Tensor],
    students: Sequence[torch.Tensor],
    momentum: float | torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    r"""In place, for every pair: ``teacher ← m·teacher + (1 − m)·student``.

    One pass over all tensors (one kernel launch per dtype combination on GPU; on CPU the
    chunks of all tensors are shared out across threads).

    Args:
        teachers: tensors updated in place (fp32, fp64, bf16, fp16); any shapes.
        students: tensors of the same shapes, on the same device; their dtype may differ
            from the teacher's (e.g. fp32 teacher, bf16 student). Arithmetic is fp32
            (fp64 for fp64 teachers), rounded once to the teacher's dtype.
        momentum: ``m`` in [0, 1], a Python float or a one-element tensor (read on the
            device: no host sync, CUDA-graph friendly; its range is not checked).
        backend: force ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"`` (default: auto).

    Matches ``torch._foreach_lerp_(teachers, students, 1 - m)`` (timm ``ModelEmaV3``) and
    fairseq ``EMAModule`` (``mul_(m).add_(student, alpha=1 - m)``) up to fp32 rounding.
    Teachers and students must not share memory; both must be dense with equal strides.

    Sharded parameters (FSDP2 ``fully_shard``, ``torch.distributed.tensor.DTensor``): each
    rank updates its own local shards in the same single pass (no all-gather, no host
    sync). A DTensor teacher needs a DTensor student on the same device mesh with the same
    placements and global shape (then both local shards cover the same elements); anything
    else is an error naming the pair.
    """
    teachers, students = list(teachers), list(students)
    if len(teachers) != len(students):
        fail(OP, f"teachers and students must have the same length, got {len(teachers)} and {len(students)}")
    teachers, students = local_shards(OP, teachers, students)
    device = teachers[0].device if teachers else torch.device("cpu")
    compiling = torch.compiler.is_compiling()
    if compiling or not _pairs_ok(teachers, students, device):  # the named checks (they raise on the bad pair)
        _check_pairs(teachers, students, device, compiling)
    if isinstance(momentum, torch.Tensor):
        check_tensor(OP, "momentum", momentum, dtypes=FLOAT_DTYPES)
        if momentum.numel() != 1:
            fail(OP, f"momentum expected one element, got shape {tuple(momentum.shape)}")
        if momentum.device != device and momentum.device.type != "cpu":
            fail(OP, f"momentum expected to be on {device} or a CPU scalar, got {momentum.device}")
        m_tensor, m_value = momentum.reshape(()), 0.0
    else:
        m_value = check_float(OP, "momentum", momentum, 0.0, 1.0)
        m_tensor = None
    if not compiling and teachers and dispatch.resolve(device, backend or "") == "cpu":
        # eager CPU: straight to the kernel, past the custom op's Python layers (their cost is a
        # visible share of a ViT's update: docs/design.md, *Fast paths*); versions bumped as
        # the op would
        with torch.no_grad():
            dispatch(device, "cpu")(teachers, students, m_tensor, m_value)
        torch.autograd.graph.increment_version(teachers)
        return
    with torch.no_grad():
        torch.ops.sslkern.ema_update_(teachers, students, m_tensor, m_value, backend or "")


def _pairs_ok(teachers, students, device) -> bool:
    """One cheap pass: True when every pair passes the checks of ``_check_pairs`` (dense
    tensors of float dtypes on ``device``, equal shapes and strides, separate memory)."""
    floats = _FLOATS
    for t, s in zip(teachers, students):
        if not (isinstance(t, torch.Tensor) and isinstance(s, torch.Tensor) and t.dtype in floats and s.dtype in floats
                and t.device == device and s.device == device and t.shape == s.shape and t.stride() == s.stride()
                and t.is_contiguous()):
            return False
        if t.numel() and t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr():
            return False
    return True


def _check_pairs(teachers, students, device, compiling) -> None:
    for i, (t, s) in enumerate(zip(teachers, students)):
        check_tensor(OP, f"teachers[{i}]", t, dtypes=FLOAT_DTYPES, device=device)
        check_tensor(OP, f"students[{i}]", s, dtypes=FLOAT_DTYPES, shape=tuple(t.shape), device=device)
        if not is_dense(t) or tuple(t.stride()) != tuple(s.stride()):
            fail(OP, f"teachers[{i}] and students[{i}] must be dense with equal strides, got strides "
                     f"{tuple(t.stride())} and {tuple(s.stride())}")
        if not compiling and t.numel() and t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr():
            fail(OP, f"teachers[{i}] and students[{i}] share memory; the teacher must be a separate copy")
