"""DINO and iBOT loss modules with the interfaces of dino ``main_dino.py: DINOLoss`` and
dinov2 ``iBOTPatchLoss``, running the fused ``sslkern.dino_loss`` / ``ibot_patch_loss``."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..ops.dino_loss import dino_loss, ibot_patch_loss
from ..ops.prototype_loss import prototype_loss
from .heads import layer_parts


def _fused_mode(cls, mode):
    if mode != "center":
        raise ValueError(f"sslkern.nn.{cls}.forward_fused: teacher_mode={mode!r} is not supported by the fused "
                         f"prototype path (the Sinkhorn-Knopp teacher needs every teacher logit at once); "
                         f"use forward() on the head's logits")


class DINOLoss(nn.Module):
    """dino ``DINOLoss``: same arguments, same ``center`` buffer of shape (1, out_dim),
    same teacher-temperature schedule (linear warm-up over epochs, then constant).

    ``forward(student_output, teacher_output, epoch)``: student (ncrops·B, out_dim)
    crop-major, teacher (2·B, out_dim); returns the loss and updates ``center`` (EMA of the
    raw teacher logits, all-reduced when torch.distributed is initialized).
    ``teacher_mode="sinkhorn"`` uses the DINOv2 Sinkhorn-Knopp teacher instead of centering
    (the center is still tracked).
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

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        B = teacher_output.shape[0] // self.n_global_crops
        if student_output.shape[0] != self.ncrops * B:
            raise ValueError(f"sslkern.nn.DINOLoss: student_output expected ncrops·B = {self.ncrops}·{B} rows, "
                             f"got {student_output.shape[0]}")
        loss, new_center = dino_loss(
            student_output, teacher_output, self.center, student_temp=self.student_temp,
            teacher_temp=float(self.teacher_temp_schedule[epoch]), n_global_crops=self.n_global_crops,
            teacher_mode=self.teacher_mode, center_momentum=self.center_momentum)
        with torch.no_grad():
            self.center.copy_(new_center)
        return loss

    def forward_fused(self, student_z: torch.Tensor, teacher_z: torch.Tensor, student_layer: nn.Module,
                      teacher_layer: nn.Module, epoch: int) -> torch.Tensor:
        """``forward(student_layer(student_z), teacher_layer(teacher_z), epoch)`` without the
        logits: ``sslkern.prototype_loss`` on the bottleneck features (ncrops·B and 2·B rows)
        and the last layers (``WeightNormLinear`` or bias-free ``nn.Linear``). Center mode only."""
        _fused_mode("DINOLoss", self.teacher_mode)
        B = teacher_z.shape[0] // self.n_global_crops
        if student_z.shape[0] != self.ncrops * B:
            raise ValueError(f"sslkern.nn.DINOLoss: student_z expected ncrops·B = {self.ncrops}·{B} rows, "
                             f"got {student_z.shape[0]}")
        (w, g), (wt, gt) = layer_parts(student_layer), layer_parts(teacher_layer)
        loss, new_center = prototype_loss(
            student_z, teacher_z, w, wt, self.center, gain=g, teacher_gain=gt, student_temp=self.student_temp,
            teacher_temp=float(self.teacher_temp_schedule[epoch]), n_global_crops=self.n_global_crops,
            center_momentum=self.center_momentum)
        with torch.no_grad():
            self.center.copy_(new_center)
        return loss


class IBOTPatchLoss(nn.Module):
    """dinov2 ``iBOTPatchLoss`` (masked form): ``center`` buffer of shape (1, 1, patch_out_dim).

    ``forward(student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
    teacher_temp=None)``: (M, K) logits of the masked tokens and the (B_g, L) bool masks;
    returns the loss and updates the patch center (EMA of the mean masked teacher logit).
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
                student_masks_flat: torch.Tensor, teacher_temp: float | None = None,
                check_masks: bool = True) -> torch.Tensor:
        # check_masks=False: no host sync for the mask count (CUDA graphs); see ibot_patch_loss
        loss, new_center = ibot_patch_loss(
            student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat, self.center,
            student_temp=self.student_temp, teacher_temp=self.teacher_temp if teacher_temp is None else teacher_temp,
            teacher_mode=self.teacher_mode, center_momentum=self.center_momentum, check_masks=check_masks)
        with torch.no_grad():
            self.center.copy_(new_center)
        return loss

    def forward_fused(self, student_z: torch.Tensor, teacher_z: torch.Tensor, student_layer: nn.Module,
                      teacher_layer: nn.Module, student_masks_flat: torch.Tensor, teacher_temp: float | None = None,
                      check_masks: bool = True) -> torch.Tensor:
        """``forward`` on the masked tokens' bottleneck features (M rows each) and the patch
        heads' last layers, without the (M, K) logits (``sslkern.prototype_loss``). Center mode only."""
        _fused_mode("IBOTPatchLoss", self.teacher_mode)
        (w, g), (wt, gt) = layer_parts(student_layer), layer_parts(teacher_layer)
        loss, new_center = prototype_loss(
            student_z, teacher_z, w, wt, self.center, gain=g, teacher_gain=gt, masks=student_masks_flat,
            student_temp=self.student_temp, teacher_temp=self.teacher_temp if teacher_temp is None else teacher_temp,
            center_momentum=self.center_momentum, check_masks=check_masks)
        with torch.no_grad():
            self.center.copy_(new_center)
        return loss
