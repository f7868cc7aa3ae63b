"""DINO and iBOT loss modules with the interfaces of dino ``main_dino.py: DINOLoss`` and
dinov2 ``iBOTPatchLoss``, running the fused ``sslkern.dino_loss`` / ``ibot_patch_loss`` (or,
given the prototype layers, ``sslkern.prototype_loss``). The modules own the center and
all-reduce its batch statistic across ranks; the functional ops stay local."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from ..ops._common import world_size
from ..ops.dino_loss import dino_loss, ibot_patch_loss
from ..ops.prototype_loss import prototype_loss
from .heads import layer_parts


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over the processes of the default group (``x`` itself on one process)."""
    n = world_size()
    if n == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x / n


@torch.no_grad()
def update_center_(center: torch.Tensor, teacher_sum: torch.Tensor, n_rows: int, momentum: float) -> None:
    """``c ← m·c + (1 − m)·mean over ranks of (teacher_sum / n_rows)``, in place: dino's
    all-reduced batch mean when every rank has the same rows, dinov2's patch center (mean
    of per-rank token means) otherwise."""
    batch = mean_over_ranks(teacher_sum / max(n_rows, 1))
    new = center.reshape(-1).to(batch.dtype) * momentum + batch * (1 - momentum)
    center.copy_(new.reshape(center.shape))


def _fused_layers(cls: str, mode: str, student_layer, teacher_layer):
    if (student_layer is None) != (teacher_layer is None):
        raise ValueError(f"sslkern.nn.{cls}: student_layer and teacher_layer expected both or neither")
    if student_layer is not None and mode != "center":
        raise ValueError(f"sslkern.nn.{cls}: teacher_mode={mode!r} cannot fuse the prototype layers (the "
                         f"Sinkhorn-Knopp teacher needs every teacher logit at once); pass the head's logits")
    return student_layer is not None


class DINOLoss(nn.Module):
    """dino ``DINOLoss``: same arguments, same ``center`` buffer of shape (1, out_dim),
    same teacher-temperature schedule (linear warm-up over epochs, then constant).

    ``forward(student_output, teacher_output, epoch)``: student (ncrops·B, out_dim) logits
    crop-major, teacher (2·B, out_dim); returns the loss and updates ``center`` (EMA of the
    raw teacher logits, all-reduced when torch.distributed is initialized).
    ``forward(student_z, teacher_z, epoch, student_layer, teacher_layer)``: the same from the
    heads' bottleneck features and prototype layers (``WeightNormLinear`` or a bias-free
    ``nn.Linear``), fused (:func:`sslkern.prototype_loss`): no (rows, out_dim) logits.
    ``teacher_mode="sinkhorn"`` uses the DINOv2 Sinkhorn-Knopp teacher instead of centering
    (on logits only; the center is still tracked).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, n_global_crops: int = 2, teacher_mode: str = "center"):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.n_global_crops = n_global_crops
        self.teacher_mode = teacher_mode
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                student_layer: Optional[nn.Module] = None, teacher_layer: Optional[nn.Module] = None) -> torch.Tensor:
        B = teacher_output.shape[0] // self.n_global_crops
        if student_output.shape[0] != self.ncrops * B:
            raise ValueError(f"sslkern.nn.DINOLoss: student_output expected ncrops·B = {self.ncrops}·{B} rows, "
                             f"got {student_output.shape[0]}")
        kw = dict(student_temp=self.student_temp, teacher_temp=float(self.teacher_temp_schedule[epoch]),
                  n_global_crops=self.n_global_crops, return_teacher_sum=True)
        if _fused_layers("DINOLoss", self.teacher_mode, student_layer, teacher_layer):
            (w, g), (wt, gt) = layer_parts(student_layer), layer_parts(teacher_layer)
            loss, teacher_sum = prototype_loss(student_output, teacher_output, w, wt, self.center, gain=g,
                                               teacher_gain=gt, **kw)
        else:
            loss, teacher_sum = dino_loss(student_output, teacher_output, self.center, teacher_mode=self.teacher_mode,
                                          **kw)
        update_center_(self.center, teacher_sum, teacher_output.shape[0], self.center_momentum)
        return loss


class IBOTPatchLoss(nn.Module):
    """dinov2 ``iBOTPatchLoss`` (masked form): ``center`` buffer of shape (1, 1, patch_out_dim).

    ``forward(student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
    teacher_temp=None)``: (M, K) logits of the masked tokens and the (B_g, L) bool masks;
    returns the loss and updates the patch center (EMA of the mean masked teacher logit,
    averaged over ranks). With ``student_layer`` / ``teacher_layer`` the first two arguments
    are the masked tokens' bottleneck features (M, Db) and the loss is fused with the patch
    heads' prototype layers (:func:`sslkern.prototype_loss`, no (M, K) logits).
    ``check_masks=False``: no host sync for the mask count (CUDA graphs; see ``ibot_patch_loss``).
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9, teacher_mode: str = "center"):
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.teacher_mode = teacher_mode
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    def forward(self, student_patch_tokens_masked: torch.Tensor, teacher_patch_tokens_masked: torch.Tensor,
                student_masks_flat: torch.Tensor, teacher_temp: float | None = None, check_masks: bool = True,
                student_layer: Optional[nn.Module] = None, teacher_layer: Optional[nn.Module] = None) -> torch.Tensor:
        kw = dict(student_temp=self.student_temp, teacher_temp=self.teacher_temp if teacher_temp is None else teacher_temp,
                  return_teacher_sum=True, check_masks=check_masks)
        s, t = student_patch_tokens_masked, teacher_patch_tokens_masked
        if _fused_layers("IBOTPatchLoss", self.teacher_mode, student_layer, teacher_layer):
            (w, g), (wt, gt) = layer_parts(student_layer), layer_parts(teacher_layer)
            loss, teacher_sum = prototype_loss(s, t, w, wt, self.center, gain=g, teacher_gain=gt,
                                               masks=student_masks_flat, **kw)
        else:
            loss, teacher_sum = ibot_patch_loss(s, t, student_masks_flat, self.center,
                                                teacher_mode=self.teacher_mode, **kw)
        update_center_(self.center, teacher_sum, t.shape[0], self.center_momentum)
        return loss
