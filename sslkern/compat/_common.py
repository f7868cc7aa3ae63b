"""Shared plumbing of the drop-in modules: the fused pair cross-entropy and the EMA pairing."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._checks import FLOAT_DTYPES, check_tensor, fail, is_dense
from ..ops.ema_update import ema_update_


def rows(op: str, name: str, x, device=None) -> tuple[torch.Tensor, int]:
    """A list / tuple of (B, K) tensors, or one (V, B, K) / (V·B, K) tensor -> ((V·B, K), V).

    A list is concatenated (the one copy lightly's and dinov2's ``torch.stack`` make too);
    a (V·B, K) tensor counts as one view."""
    if isinstance(x, torch.Tensor):
        check_tensor(op, name, x, dtypes=FLOAT_DTYPES, ndim=(2, 3), device=device)
        if x.dim() == 3:
            return x.reshape(-1, x.shape[-1]), x.shape[0]
        return x, 1
    if not isinstance(x, (list, tuple)) or not x:
        fail(op, f"{name} expected a non-empty list of (B, K) tensors or a tensor, got {type(x).__name__}", TypeError)
    for i, t in enumerate(x):
        check_tensor(op, f"{name}[{i}]", t, dtypes=FLOAT_DTYPES, ndim=2, shape=(x[0].shape[0], x[0].shape[1]),
                     device=device if device is not None else x[0].device)
    return (x[0] if len(x) == 1 else torch.cat(list(x), 0)), len(x)


def pair_cross_entropy(op: str, student: torch.Tensor, teacher: torch.Tensor, center: Optional[torch.Tensor], *,
                       n_student_views: int, n_teacher_views: int, skip_same_view: bool, scale: float,
                       student_temp: float, teacher_temp: float = 1.0, teacher_is_probs: bool = False,
                       weights: Optional[torch.Tensor] = None, center_sum: bool = False):
    """``torch.ops.sslkern.dino_loss`` over (V·B, K) student and (T·B, K) teacher rows.

    loss = scale · Σ_b w_b Σ_v Σ_{q (q ≠ v if skip_same_view)} −Σ_k p_q[b, k] log_softmax(s_v[b]/τs)[k]
    with p_q = softmax((t_q − c)/τt) in the kernel, or t_q itself when ``teacher_is_probs``.
    Returns (loss, column sum of the raw teacher rows or None). Differentiable w.r.t. the
    student (the gradient is written in the forward pass)."""
    K = student.shape[1]
    if teacher.shape[1] != K:
        fail(op, f"teacher expected {K} columns (the student's), got shape {tuple(teacher.shape)}")
    B = teacher.shape[0] // n_teacher_views
    if B * n_teacher_views != teacher.shape[0] or B * n_student_views != student.shape[0]:
        fail(op, f"student and teacher views expected the same batch size, got {student.shape[0]} student rows in "
                 f"{n_student_views} views and {teacher.shape[0]} teacher rows in {n_teacher_views} views")
    if teacher.device != student.device:
        fail(op, f"teacher expected to be on {student.device} (like the student), got {teacher.device}")
    c = None
    if not teacher_is_probs:
        if center is None or center.numel() != K:
            fail(op, f"center expected {K} elements, got {None if center is None else tuple(center.shape)}")
        c = center.reshape(-1).to(student.device).contiguous()
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _, csum = torch.ops.sslkern.dino_loss(
        student.contiguous(), teacher.detach().contiguous(), c, weights, float(scale), float(student_temp),
        float(teacher_temp), int(n_student_views), int(n_teacher_views), bool(skip_same_view),
        bool(teacher_is_probs), compute_grad, bool(center_sum and not teacher_is_probs), "")
    return loss, (csum if center_sum and not teacher_is_probs else None)


def ema_pairs(op: str, ema_values: Sequence[torch.Tensor], model_values: Sequence[torch.Tensor], names=None):
    """Pair EMA and model tensors in order; check shapes; split into (lerp_t, lerp_s, copy_t, copy_s)."""
    ema_values, model_values = list(ema_values), list(model_values)
    if len(ema_values) != len(model_values):
        fail(op, f"model expected {len(ema_values)} tensors (as many as the EMA copy), got {len(model_values)}")
    lerp_t, lerp_s, copy_t, copy_s = [], [], [], []
    for i, (e, m) in enumerate(zip(ema_values, model_values)):
        if e.shape != m.shape:
            what = names[i] if names is not None else f"tensor {i}"
            fail(op, f"model {what} expected shape {tuple(e.shape)} (the EMA copy's), got {tuple(m.shape)}")
        if e.is_floating_point():
            lerp_t.append(e)
            lerp_s.append(m)
        else:
            copy_t.append(e)
            copy_s.append(m)
    return lerp_t, lerp_s, copy_t, copy_s


def fused_ema_(teachers: list[torch.Tensor], students: list[torch.Tensor], momentum) -> None:
    """``teacher ← m·teacher + (1 − m)·student`` for all pairs: one ``ema_update_`` pass over the
    pairs it takes (same device, dense, equal strides, no shared memory), ``_foreach`` ops
    for the rest (e.g. a student on another device is first copied over)."""
    fast_t, fast_s, slow_t, slow_s = [], [], [], []
    device = teachers[0].device if teachers else None
    for t, s in zip(teachers, students):
        if s.device != t.device:
            s = s.to(t.device)
        ok = (t.device == device and t.dtype in FLOAT_DTYPES and s.dtype in FLOAT_DTYPES and is_dense(t) and t.stride() == s.stride()
              and (t.numel() == 0 or t.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()))
        (fast_t if ok else slow_t).append(t)
        (fast_s if ok else slow_s).append(s)
    with torch.no_grad():
        if fast_t:
            ema_update_(fast_t, fast_s, momentum)
        for t, s in zip(slow_t, slow_s):
            m = float(momentum)
            t.mul_(m).add_(s.to(t.dtype), alpha=1.0 - m)
