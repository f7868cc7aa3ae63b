"""The op skeleton: the rules every op shares, each written once.

An op ``NAME`` is three layers (``docs/design.md``, *How to write an op*):

1. the public function ``sslkern.NAME``: checks every argument (``sslkern._checks``), checks
   index values once (:func:`check_index_values`), then calls
2. the custom op ``torch.ops.sslkern.NAME``, whose body is one line,
   ``dispatch(device, backend)(*args)``: the op's ``Dispatch`` table (``sslkern._backend``)
   picks the backend, which takes the custom op's arguments minus ``backend``;
3. the backends: ``NAME_eager`` (the contract in plain PyTorch, in the op file or in
   ``sslkern.reference``), ``NAME_cpu`` (C++), ``NAME_triton``, ``NAME_cuda``.

What they share lives here:

``acc_dtype``           the accumulation dtype: fp64 if any input is fp64, else fp32.
``needs_grad``          whether a call must produce gradients (grad mode on, an input requires grad).
``register_saved_gradients``  autograd for ops that write their gradients in the forward
                        (dino_loss, prototype_loss, info_nce_loss, relation_loss): backward
                        multiplies each saved gradient by the incoming one with
                        :func:`scale_saved_gradient`.
``check_index_values``  the one value check: indices in range, one device reduction and one
                        host sync, skipped while ``torch.compile`` traces.
``world_size``, ``local_shards``  torch.distributed: the process count, DTensor local shards.
The dtype sets (``FLOAT_DTYPES``, ``HALF_OR_FLOAT32``, ``INDEX_DTYPES``) live with the argument
checks in ``sslkern._checks``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .._checks import fail


# ---------------------------------------------------------------------------------------
# dtypes and gradients
# ---------------------------------------------------------------------------------------
def acc_dtype(*xs) -> torch.dtype:
    """fp64 if any of ``xs`` (tensors, dtypes or None) is fp64, else fp32: every op
    accumulates in this dtype and returns its losses in it."""
    for x in xs:
        if x is not None and (x if isinstance(x, torch.dtype) else x.dtype) == torch.float64:
            return torch.float64
    return torch.float32


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """True when grad mode is on and one of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _is_one_read_without_sync(g: torch.Tensor) -> bool:
    """``g`` is a real CPU scalar equal to 1, outside ``torch.compile`` tracing (a fake or
    traced value cannot be read; a GPU value would cost a device sync)."""
    return (type(g) is torch.Tensor and g.device.type == "cpu" and g.numel() == 1
            and not torch.compiler.is_compiling() and torch._guards.detect_fake_mode((g,)) is None
            and float(g) == 1.0)


def scale_saved_gradient(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad · grad_output`` for a gradient written in the forward pass (backward of a loss).

    The product is formed in fp32 (fp64 for fp64) and rounded once to ``grad``'s dtype:
    GradScaler's initial scale 65,536 is inf in fp16, so a product in the input dtype would
    turn every fp16 step into inf. ``grad`` itself is returned (no copy) only for an eager,
    non-``create_graph`` incoming gradient of exactly 1 (``loss.backward()``); under
    ``create_graph`` the result must stay a function of ``grad_output``.
    """
    if not torch.is_grad_enabled() and _is_one_read_without_sync(grad_output):
        return grad
    acc = acc_dtype(grad, grad_output)
    return torch.mul(grad.to(acc), grad_output.to(device=grad.device, dtype=acc)).to(grad.dtype)


def register_saved_gradients(op, op_name: str, gradients: Callable[[tuple], dict[int, int]], *,
                             loss_output: int = 0) -> None:
    """Autograd for a custom op whose forward returns its loss and the loss's gradients.

    ``gradients(inputs)`` maps input positions to the output positions holding their
    gradient for this call (empty when no gradient was computed). Backward returns
    ``scale_saved_gradient(output, grad_loss)`` for those inputs and None for the others;
    every output but the loss is non-differentiable. Backward through a call that computed
    no gradient raises.
    """
    def setup_context(ctx, inputs, output):
        ctx.n_inputs = len(inputs)
        ctx.slots = tuple(gradients(inputs).items())
        ctx.save_for_backward(*(output[o] for _, o in ctx.slots))
        ctx.mark_non_differentiable(*(o for i, o in enumerate(output) if i != loss_output))
        ctx.set_materialize_grads(False)  # no zeros for the unused outputs' gradients

    def backward(ctx, *grad_outputs):
        g = grad_outputs[loss_output]
        out = [None] * ctx.n_inputs
        if g is None:
            return tuple(out)
        if not ctx.slots:
            raise RuntimeError(f"sslkern.{op_name}: backward through a call that computed no gradient (no input "
                               "required grad, or grad mode was off, when the loss was computed)")
        for (i, _), saved in zip(ctx.slots, ctx.saved_tensors):
            out[i] = scale_saved_gradient(saved, g)
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------
# index values
# ---------------------------------------------------------------------------------------
def check_index_values(op: str, name: str, idx: torch.Tensor, hi: int, *, lo: int = 0, meaning: str = "",
                       also: Optional[torch.Tensor] = None) -> bool:
    """Raise an ``IndexError`` naming ``name`` unless every value of ``idx`` lies in [lo, hi).

    One device reduction and one host sync (``bool`` of a 0-dim tensor); none while
    ``torch.compile`` traces (the sync would break the graph). ``also`` (a bool tensor) is
    read in the same sync: the return value is ``also.any()`` (False without ``also``).
    ``meaning`` follows the range in the message (e.g. ``" (grid cells)"``).
    """
    if torch.compiler.is_compiling():
        return False
    bad = (idx < lo) | (idx >= hi)
    if also is None:
        flags = int(bad.any())
    else:
        flags = int(bad.any().to(torch.int32) + 2 * also.any().to(torch.int32))  # the one sync
    if flags & 1:  # the error path may sync again
        where = tuple(int(v) for v in bad.nonzero()[0])
        at = ", ".join(map(str, where))
        fail(op, f"{name} expected values in [{lo}, {hi}){meaning}, got {name}[{at}] = {int(idx[where])}",
             IndexError)
    return bool(flags & 2)


# ---------------------------------------------------------------------------------------
# torch.distributed
# ---------------------------------------------------------------------------------------
def world_size() -> int:
    """The number of processes of the default group (1 without torch.distributed)."""
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def dtensor_class():
    """``torch.distributed.tensor.DTensor``, or None where torch.distributed is unavailable."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def local_shards(op: str, teachers: list, students: list, names: Sequence[str] | None = None) -> tuple[list, list]:
    """Replace every (DTensor teacher, DTensor student) pair by this rank's local shards.

    Both of a pair must be DTensors with the same mesh, placements and global shape, or
    both plain tensors; ``names`` (default ``teachers[i]``/``students[i]``) name the pair
    in the error.
    """
    dtensor = dtensor_class()
    if dtensor is None or not any(isinstance(x, dtensor) for x in teachers + students):
        return teachers, students
    out_t, out_s = [], []
    for i, (t, s) in enumerate(zip(teachers, students)):
        tn, sn = (f"teachers[{i}]", f"students[{i}]") if names is None else (f"teacher {names[i]!r}",
                                                                             f"student {names[i]!r}")
        td, sd = isinstance(t, dtensor), isinstance(s, dtensor)
        if td != sd:
            fail(op, f"{tn} is {'a DTensor' if td else 'a plain tensor'} but {sn} is "
                     f"{'a DTensor' if sd else 'a plain tensor'}: shard the teacher exactly like the student "
                     f"(same fully_shard units)")
        if td:
            if t.device_mesh != s.device_mesh or tuple(t.placements) != tuple(s.placements):
                fail(op, f"{tn} and {sn} are sharded differently: placements {tuple(t.placements)} on "
                         f"{t.device_mesh} vs {tuple(s.placements)} on {s.device_mesh}; shard the teacher exactly "
                         f"like the student")
            if tuple(t.shape) != tuple(s.shape):
                fail(op, f"{sn} expected global shape {tuple(t.shape)} (as {tn}), got {tuple(s.shape)}")
            with torch.no_grad():
                t, s = t.to_local(), s.to_local()
        out_t.append(t)
        out_s.append(s)
    return out_t, out_s
