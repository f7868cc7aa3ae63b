r"""``prototype_loss`` — the DINO / iBOT prototype layer fused with the DINO / iBOT loss.

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
rescales them (``register_saved_gradients``, as ``dino_loss``). Backends: ``prototype_loss_eager``
(the unfused head + loss math), C++ CPU (two passes over prototype tiles, see
``csrc/cpu/prototype_loss.cpp``), Triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import Dispatch, standard_impls
from .._checks import FLOAT_DTYPES, check_choice, check_float, check_tensor, fail
from ._common import acc_dtype, register_saved_gradients
from .dino_loss import check_center, crop_layout, dino_loss_eager, ibot_weights

OP = "prototype_loss"


def _layer_weight(v: torch.Tensor, g: Optional[torch.Tensor], acc: torch.dtype):
    """W = g·v/‖v‖ (rows) in ``acc``, and 1/‖v‖ (None without gains)."""
    v = v.to(acc)
    if g is None:
        return v, None
    inv_norm = v.norm(dim=1).reciprocal()
    return (g.reshape(-1).to(acc) * inv_norm).unsqueeze(1) * v, inv_norm


def prototype_loss_eager(student, teacher, weight, gain, teacher_weight, teacher_gain, center, weights, scale,
                         student_temp, teacher_temp, n_student_views, n_teacher_views, skip_same_view, compute_grad,
                         gain_grad, center_sum):
    """The custom op's contract in eager PyTorch (the ``reference`` backend): the unfused head
    (logits materialised) + ``dino_loss_eager``, gradients written out (custom-op bodies run
    below autograd): dzs = G W, dW = Gᵀ zs, dv = r (dW − (dW·v̂) v̂), dg = dW·v̂ with r = g/‖v‖."""
    acc = acc_dtype(student, teacher, weight, teacher_weight)
    zs = student.to(acc)
    W, inv_norm = _layer_weight(weight, gain, acc)
    Wt, _ = _layer_weight(teacher_weight, teacher_gain, acc)
    s = zs @ W.t()
    t = teacher.to(acc) @ Wt.t()
    loss, G, csum = dino_loss_eager(s, t, center, weights, scale, student_temp, teacher_temp, n_student_views,
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


dispatch = Dispatch(OP, standard_impls(OP, prototype_loss_eager))


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
    return tuple(dispatch(student.device, backend)(student, teacher, weight, gain, teacher_weight, teacher_gain, center,
                                                   weights, scale, student_temp, teacher_temp, n_student_views,
                                                   n_teacher_views, skip_same_view, compute_grad, gain_grad, center_sum))


@_prototype_loss_op.register_fake
def _(student, teacher, weight, gain, teacher_weight, teacher_gain, center, weights, scale, student_temp,
      teacher_temp, n_student_views, n_teacher_views, skip_same_view, compute_grad, gain_grad, center_sum, backend):
    acc = acc_dtype(student, teacher, weight, teacher_weight)
    loss = student.new_empty((), dtype=acc)
    dzs = torch.empty_like(student) if compute_grad else student.new_empty(0)
    dv = torch.empty_like(weight) if compute_grad else weight.new_empty(0)
    dg = torch.empty_like(gain) if (compute_grad and gain_grad) else student.new_empty(0, dtype=acc)
    csum = student.new_empty((weight.shape[0],) if center_sum else (0,), dtype=acc)
    return loss, dzs, dv, dg, csum


# student (0), weight (2) and gain (3) get the gradients written in the forward (outputs 1, 2, 3)
register_saved_gradients(_prototype_loss_op, OP, lambda inputs: (
    {0: 1, 2: 2, **({3: 3} if inputs[15] else {})} if inputs[14] else {}))


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
def _check_layer(op, name, v, g, D, K, device):
    check_tensor(op, name, v, dtypes=FLOAT_DTYPES, ndim=2, device=device)
    if v.shape[1] != D:
        fail(op, f"{name} expected shape ({K if K else 'K'}, {D}) (Db = the features' width), got {tuple(v.shape)}")
    if K is not None and v.shape[0] != K:
        fail(op, f"{name} expected {K} rows (the student weight's K prototypes), got shape {tuple(v.shape)}")
    gname = "gain" if name == "weight" else "teacher_gain"
    if g is not None:
        check_tensor(op, gname, g, dtypes=FLOAT_DTYPES, device=device)
        if g.numel() != v.shape[0] or g.dim() not in (1, 2) or (g.dim() == 2 and g.shape[1] != 1):
            fail(op, f"{gname} expected shape ({v.shape[0]},) or ({v.shape[0]}, 1), got {tuple(g.shape)}")


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
    return_teacher_sum: bool = False,
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
        return_teacher_sum: also return the column sum (K,) of this process's teacher logits
            ``teacher @ W_tᵀ``, from the same pass (as ``dino_loss``; the modules all-reduce it
            for the center update).
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` (default: auto).

    Returns:
        the loss (0-dim fp32; fp64 for fp64 inputs), or ``(loss, teacher_sum)``. Differentiable
        w.r.t. ``student``, ``weight`` and ``gain``: the gradients are computed in the
        forward pass when any of them requires grad, backward rescales them. Arithmetic is
        fp32 (fp64 when an input is fp64); fp16 / bf16 inputs are read as they are (the
        logits are formed in fp32, not rounded to the input dtype as an unfused bf16 head does).
    """
    op = OP
    check_tensor(op, "student", student, dtypes=FLOAT_DTYPES, ndim=2)
    device = student.device
    check_tensor(op, "teacher", teacher, dtypes=FLOAT_DTYPES, ndim=2, device=device)
    D = student.shape[1]
    if teacher.shape[1] != D:
        fail(op, f"teacher expected {D} columns (the student's Db), got shape {tuple(teacher.shape)}")
    _check_layer(op, "weight", weight, gain, D, None, device)
    K = weight.shape[0]
    _check_layer(op, "teacher_weight", teacher_weight, teacher_gain, D, K, device)
    if teacher_mode != "center":
        fail(op, f"teacher_mode expected 'center' (the fused path has no Sinkhorn-Knopp teacher: it needs every "
                 f"teacher logit at once; use the head + dino_loss(teacher_mode='sinkhorn')), got {teacher_mode!r}")
    check_center(op, center, K, device)
    student_temp = check_float(op, "student_temp", student_temp, 0.0, None, lo_open=True)
    teacher_temp = check_float(op, "teacher_temp", teacher_temp, 0.0, None, lo_open=True)
    check_choice(op, "return_teacher_sum", return_teacher_sum, (True, False))
    acc = acc_dtype(student, teacher, weight, teacher_weight)
    if masks is None:
        T, B, V, n_pairs = crop_layout(op, teacher.shape[0], student.shape[0], n_global_crops)
        weights, scale, skip = None, 1.0 / (n_pairs * B), True
    else:
        M = student.shape[0]
        if teacher.shape[0] != M:
            fail(op, f"teacher expected {M} rows (the student's masked tokens), got {teacher.shape[0]}")
        weights = ibot_weights(op, masks, M, check_masks, acc, device)
        V = T = 1
        scale, skip = 1.0 / masks.shape[0], False
    grad_on = torch.is_grad_enabled()
    compute_grad = grad_on and (student.requires_grad or weight.requires_grad
                                or (gain is not None and gain.requires_grad))
    gain_grad = compute_grad and gain is not None and gain.requires_grad
    loss, _, _, _, teacher_sum = torch.ops.sslkern.prototype_loss(
        student.contiguous(), teacher.detach().contiguous(), weight.contiguous(), gain,
        teacher_weight.detach().contiguous(), None if teacher_gain is None else teacher_gain.detach(),
        center.detach().reshape(-1).contiguous(), weights, scale, student_temp, teacher_temp,
        V, T, skip, compute_grad, gain_grad, bool(return_teacher_sum), backend or "")
    return (loss, teacher_sum) if return_teacher_sum else loss
