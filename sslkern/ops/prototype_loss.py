r"""``prototype_loss`` — the DINO / iBOT prototype layer fused with the DINO / iBOT loss (issue #19).

The heads of DINO and iBOT end in a weight-normalised linear layer onto K prototypes,
``W = g·v/‖v‖`` (rows), whose logits ``s = z_s Wᵀ``, ``t = z_t W_tᵀ`` feed ``dino_loss`` /
``ibot_patch_loss``. This op takes the bottleneck features and the layer's parameters
instead of the logits and computes the same loss, center update and gradients (to the
student features, ``v`` and ``g``) without ever storing a (rows, K) tensor — the
prototype-head analogue of Liger-Kernel's fused linear + cross-entropy.

One custom op, ``torch.ops.sslkern.prototype_loss(student, teacher, weight, gain,
teacher_weight, teacher_gain, center, weights, scale, student_temp, teacher_temp,
n_student_views, n_teacher_views, skip_same_view, compute_grad, gain_grad, center_sum,
backend) -> (loss, grad_student, grad_weight, grad_gain, teacher_column_sum)``, with the
group layout of ``torch.ops.sslkern.dino_loss`` (B groups of V student and T teacher rows;
DINO: V crops, T global crops, same-view pairs skipped, ``scale = 1/(P·B)``; iBOT: V = T = 1,
one group per masked token, ``weights = 1/n_masked(image)``, ``scale = 1/B_g``). The
gradients are computed in the forward pass when the student requires grad; backward
rescales them (as ``dino_loss``). Kernels: eager reference (the unfused head + loss math),
C++ CPU (two passes over prototype tiles, see ``csrc/cpu/prototype_loss.cpp``), Triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import Dispatch, ext_op, module_attr
from .._checks import check_range, check_tensor, fail
from .dino_loss import _is_eager_cpu_scalar, _new_center, crop_layout
from .dino_loss import _reference_impl as _dino_reference_impl

OP = "prototype_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_N_INPUTS = 18


def _acc(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _layer_weight(v: torch.Tensor, g: Optional[torch.Tensor], acc: torch.dtype):
    """W = g·v/‖v‖ (rows) in ``acc``, and 1/‖v‖ (None without gains)."""
    v = v.to(acc)
    if g is None:
        return v, None
    inv_norm = v.norm(dim=1).reciprocal()
    return (g.reshape(-1).to(acc) * inv_norm).unsqueeze(1) * v, inv_norm


def _reference_impl(student, teacher, weight, gain, teacher_weight, teacher_gain, center, weights, scale,
                    student_temp, teacher_temp, n_student_views, n_teacher_views, skip_same_view, compute_grad,
                    gain_grad, center_sum):
    """The custom op's contract in eager PyTorch: the unfused head (logits materialised) + the
    dino_loss reference, gradients written out (custom-op bodies run below autograd):
    dzs = G W, dW = Gᵀ zs, dv = r (dW − (dW·v̂) v̂), dg = dW·v̂ with r = g/‖v‖."""
    acc = _acc(student, teacher, weight, teacher_weight)
    zs = student.to(acc)
    W, inv_norm = _layer_weight(weight, gain, acc)
    Wt, _ = _layer_weight(teacher_weight, teacher_gain, acc)
    s = zs @ W.t()
    t = teacher.to(acc) @ Wt.t()
    loss, G, csum = _dino_reference_impl(s, t, center, weights, scale, student_temp, teacher_temp, n_student_views,
                                         n_teacher_views, skip_same_view, False, compute_grad, center_sum)
    empty = student.new_empty(0, dtype=acc)
    if not compute_grad:
        return loss, student.new_empty(0), weight.new_empty(0), empty, csum
    dzs = (G @ W).to(student.dtype)
    dW = G.t() @ zs
    dg = empty
    if gain is None:
        dv = dW
    else:
        v = weight.to(acc)
        d = (dW * v).sum(1)
        r = gain.reshape(-1).to(acc) * inv_norm
        dv = r.unsqueeze(1) * dW - (r * d * inv_norm * inv_norm).unsqueeze(1) * v
        if gain_grad:
            dg = (d * inv_norm).to(gain.dtype).reshape(gain.shape)
    return loss, dzs, dv.to(weight.dtype), dg, csum


dispatch = Dispatch(
    OP,
    {
        "reference": lambda: _reference_impl,
        "cpu": ext_op("prototype_loss_cpu"),
        "triton": module_attr("sslkern.triton_ops.prototype_loss", "prototype_loss_triton"),
    },
)


@torch.library.custom_op("sslkern::prototype_loss", mutates_args=())
def _prototype_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    gain: Optional[torch.Tensor],
    teacher_weight: torch.Tensor,
    teacher_gain: Optional[torch.Tensor],
    center: torch.Tensor,
    weights: Optional[torch.Tensor],
    scale: float,
    student_temp: float,
    teacher_temp: float,
    n_student_views: int,
    n_teacher_views: int,
    skip_same_view: bool,
    compute_grad: bool,
    gain_grad: bool,
    center_sum: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = dispatch(student.device, backend)
    out = fn(student, teacher, weight, gain, teacher_weight, teacher_gain, center, weights, scale, student_temp,
             teacher_temp, n_student_views, n_teacher_views, skip_same_view, compute_grad, gain_grad, center_sum)
    return tuple(out)


@_prototype_loss_op.register_fake
def _(student, teacher, weight, gain, teacher_weight, teacher_gain, center, weights, scale, student_temp,
      teacher_temp, n_student_views, n_teacher_views, skip_same_view, compute_grad, gain_grad, center_sum, backend):
    acc = _acc(student, teacher, weight, teacher_weight)
    loss = student.new_empty((), dtype=acc)
    dzs = torch.empty_like(student) if compute_grad else student.new_empty(0)
    dv = torch.empty_like(weight) if compute_grad else weight.new_empty(0)
    dg = torch.empty_like(gain) if (compute_grad and gain_grad) else student.new_empty(0, dtype=acc)
    csum = student.new_empty((weight.shape[0],) if center_sum else (0,), dtype=acc)
    return loss, dzs, dv, dg, csum


def _setup_context(ctx, inputs, output):
    ctx.compute_grad, ctx.gain_grad = inputs[14], inputs[15]
    ctx.save_for_backward(output[1], output[2], output[3])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _scaled(grad, g_loss):
    acc = torch.float64 if torch.float64 in (grad.dtype, g_loss.dtype) else torch.float32
    return torch.mul(grad.to(acc), g_loss.to(device=grad.device, dtype=acc)).to(grad.dtype)


def _backward(ctx, g_loss, *unused):
    if not ctx.compute_grad:
        raise RuntimeError("sslkern.prototype_loss: backward through a call made without compute_grad "
                           "(neither the student features nor the weight required grad when the loss was computed)")
    dzs, dv, dg = ctx.saved_tensors
    none = (None,) * _N_INPUTS
    if g_loss is None:
        return none
    if not (_is_eager_cpu_scalar(g_loss) and float(g_loss) == 1.0):  # else: the stored gradients as they are
        dzs, dv = _scaled(dzs, g_loss), _scaled(dv, g_loss)
        dg = _scaled(dg, g_loss) if ctx.gain_grad else dg
    return (dzs, None, dv, dg if ctx.gain_grad else None) + none[4:]


_prototype_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def _check_layer(op, name, v, g, D, K, device):
    check_tensor(op, name, v, dtypes=_FLOATS, ndim=2, device=device)
    if v.shape[1] != D:
        fail(op, f"{name} expected shape ({K if K else 'K'}, {D}) (Db = the features' width), got {tuple(v.shape)}")
    if K is not None and v.shape[0] != K:
        fail(op, f"{name} expected {K} rows (the student weight's K prototypes), got shape {tuple(v.shape)}")
    gname = "gain" if name == "weight" else "teacher_gain"
    if g is not None:
        check_tensor(op, gname, g, dtypes=_FLOATS, device=device)
        if g.numel() != v.shape[0] or g.dim() not in (1, 2) or (g.dim() == 2 and g.shape[1] != 1):
            fail(op, f"{gname} expected shape ({v.shape[0]},) or ({v.shape[0]}, 1), got {tuple(g.shape)}")
        if g.requires_grad and name == "teacher_weight":
            pass  # the teacher gets no gradient; its gain is read as a constant


def prototype_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    center: torch.Tensor,
    *,
    gain: Optional[torch.Tensor] = None,
    teacher_gain: Optional[torch.Tensor] = None,
    masks: Optional[torch.Tensor] = None,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    n_global_crops: int = 2,
    teacher_mode: str = "center",
    center_momentum: Optional[float] = None,
    check_masks: bool = True,
    backend: Optional[str] = None,
):
    r"""The DINO loss (``masks=None``) or the iBOT masked patch loss (``masks`` given) from the
    bottleneck features and the prototype layer, fused: no (rows, K) logits.

    Equal to ``dino_loss(student @ Wᵀ, teacher @ W_tᵀ, center, ...)`` (resp.
    ``ibot_patch_loss(..., masks, ...)``) with ``W = gain·weight/‖weight‖`` (rows, dino's
    ``weight_norm`` last layer; ``W = weight`` when ``gain`` is None), the same for the teacher.

    Args:
        student: (V·B, Db) student bottleneck features, crop-major (the head's L2-normalised
            ``z``); iBOT: (M, Db) of the masked tokens in ``masks.nonzero()`` order.
        teacher: (T·B, Db) teacher features of the T = ``n_global_crops`` global crops
            (iBOT: (M, Db)); no gradient.
        weight: (K, Db) student last layer — the direction ``v`` (``last_layer.weight_v``)
            when ``gain`` is given, else the weight itself.
        teacher_weight: (K, Db) the teacher's (EMA) one; no gradient.
        center: (K,) (or (1, K), (1, 1, K)) teacher center; no gradient.
        gain, teacher_gain: (K,) or (K, 1) weight-norm gains ``g`` (``last_layer.weight_g``;
            with dino's ``norm_last_layer`` they are ones and frozen).
        masks: iBOT form: (B_g, ...) bool masks with M entries set (see ``ibot_patch_loss``).
        teacher_mode: only ``"center"`` (the Sinkhorn-Knopp teacher needs every teacher
            logit at once: use the head + ``dino_loss(teacher_mode="sinkhorn")``).
        center_momentum: if given, also return the updated center (as ``dino_loss``); the
            teacher column sums come from the same pass.
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` (default: auto).

    Returns:
        the loss (0-dim fp32; fp64 for fp64 inputs), or ``(loss, new_center)``. Differentiable
        w.r.t. ``student``, ``weight`` and ``gain``: the gradients are computed in the
        forward pass when any of them requires grad, backward rescales them. Arithmetic is
        fp32 (fp64 when an input is fp64); fp16 / bf16 inputs are read as they are (the
        logits are formed in fp32, not rounded to the input dtype as an unfused bf16 head does).
    """
    op = OP
    check_tensor(op, "student", student, dtypes=_FLOATS, ndim=2)
    device = student.device
    check_tensor(op, "teacher", teacher, dtypes=_FLOATS, ndim=2, device=device)
    D = student.shape[1]
    if teacher.shape[1] != D:
        fail(op, f"teacher expected {D} columns (the student's Db), got shape {tuple(teacher.shape)}")
    _check_layer(op, "weight", weight, gain, D, None, device)
    K = weight.shape[0]
    _check_layer(op, "teacher_weight", teacher_weight, teacher_gain, D, K, device)
    if teacher_mode != "center":
        fail(op, f"teacher_mode expected 'center' (the fused path has no Sinkhorn-Knopp teacher: it needs every "
                 f"teacher logit at once; use the head + dino_loss(teacher_mode='sinkhorn')), got {teacher_mode!r}")
    check_tensor(op, "center", center, dtypes=_FLOATS, device=device)
    if center.numel() != K or center.dim() == 0 or any(d != 1 for d in center.shape[:-1]):
        fail(op, f"center expected shape ({K},) (or (1, {K})), got {tuple(center.shape)}")
    check_range(op, "student_temp", float(student_temp), 0.0, None, lo_open=True)
    check_range(op, "teacher_temp", float(teacher_temp), 0.0, None, lo_open=True)
    if center_momentum is not None:
        check_range(op, "center_momentum", float(center_momentum), 0.0, 1.0)
    acc = _acc(student, teacher, weight, teacher_weight)
    if masks is None:
        T, B, V, n_pairs = crop_layout(op, teacher.shape[0], student.shape[0], n_global_crops)
        weights, scale, skip, n_rows = None, 1.0 / (n_pairs * B), True, teacher.shape[0]
    else:
        check_tensor(op, "masks", masks, dtypes=(torch.bool,), device=device)
        if masks.dim() < 2:
            fail(op, f"masks expected (B_g, L) or (B_g, H, W), got shape {tuple(masks.shape)}")
        M = student.shape[0]
        if teacher.shape[0] != M:
            fail(op, f"teacher expected {M} rows (the student's masked tokens), got {teacher.shape[0]}")
        n_masked = masks.flatten(1).sum(-1)
        if check_masks and not torch.compiler.is_compiling() and int(n_masked.sum()) != M:
            fail(op, f"masks expected {M} set entries (one per masked token row), got {int(n_masked.sum())}")
        weights = torch.repeat_interleave(1.0 / n_masked.clamp(min=1).to(acc), n_masked, output_size=M)
        V = T = 1
        scale, skip, n_rows = 1.0 / masks.shape[0], False, max(M, 1)
    grad_on = torch.is_grad_enabled()
    compute_grad = grad_on and (student.requires_grad or weight.requires_grad
                                or (gain is not None and gain.requires_grad))
    gain_grad = compute_grad and gain is not None and gain.requires_grad
    want_sum = center_momentum is not None
    loss, _, _, _, csum = torch.ops.sslkern.prototype_loss(
        student.contiguous(), teacher.detach().contiguous(), weight.contiguous(), gain,
        teacher_weight.detach().contiguous(), None if teacher_gain is None else teacher_gain.detach(),
        center.detach().reshape(-1).contiguous(), weights, scale, float(student_temp), float(teacher_temp),
        V, T, skip, compute_grad, gain_grad, want_sum, backend or "")
    if not want_sum:
        return loss
    return loss, _new_center(center, csum.detach(), n_rows, float(center_momentum))
