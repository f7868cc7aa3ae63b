"""Eager reference of ``sslkern.prototype_loss``: dino's head last layer
(``weight_norm(nn.Linear(Db, K, bias=False))``: ``W = g·v/‖v‖``) with autograd, then the
dino ``DINOLoss`` / dinov2 ``iBOTPatchLoss`` math of ``sslkern.reference`` on the logits."""
from __future__ import annotations

import torch

from .dino_loss import dino_loss, ibot_patch_loss


def _weight(v, g):
    return v if g is None else g.reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)


def prototype_loss(student, teacher, weight, teacher_weight, center, gain=None, teacher_gain=None, masks=None,
                   student_temp=0.1, teacher_temp=0.04, n_global_crops=2):
    """The loss (differentiable w.r.t. student, weight, gain); the logits are materialised."""
    s = student @ _weight(weight, gain).t()
    with torch.no_grad():
        t = teacher @ _weight(teacher_weight, teacher_gain).t()
    if masks is None:
        return dino_loss(s, t, center, student_temp, teacher_temp, n_global_crops)
    return ibot_patch_loss(s, t, masks, center, student_temp, teacher_temp)
