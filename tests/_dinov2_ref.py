"""Test-only eager transcription of dinov2's loss math (dinov2 is not installed here).

Written for these tests from facebookresearch/dinov2 ``dinov2/loss/dino_clstoken_loss.py``
(``DINOLoss``), ``dinov2/loss/ibot_patch_loss.py`` (``iBOTPatchLoss``, the torch ``lossfunc``
branch) and ``dinov2/loss/koleo_loss.py`` (``KoLeoLoss``), single process: same arithmetic,
same staged center update (``update_center`` stores the batch sum, the next
``softmax_center_teacher`` applies it). ``as_dinov2_modules()`` / ``install_as_dinov2()`` expose them as a
``dinov2.loss`` module so dinov2-style scripts import them unchanged.
"""
import sys
import types

import torch
import torch.nn.functional as F

class DINOLoss(torch.nn.Module):
    """dino_clstoken_loss.py: DINOLoss (world size 1)."""

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.pending = None

    def apply_center(self):
        if self.pending is not None:
            total, n = self.pending
            self.center = self.center * self.center_momentum + (total / n) * (1 - self.center_momentum)
            self.pending = None

    @torch.no_grad()
    def softmax_center_teacher(self, t, teacher_temp):
        self.apply_center()
        return F.softmax((t - self.center) / teacher_temp, dim=-1)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        total = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total = total - torch.sum(t * lsm, dim=-1).mean()
        return total

    @torch.no_grad()
    def update_center(self, t):
        self.pending = (torch.sum(t, dim=0, keepdim=True), len(t))


class iBOTPatchLoss(torch.nn.Module):  # noqa: N801
    """ibot_patch_loss.py: iBOTPatchLoss (torch lossfunc, world size 1)."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self.pending = None

    def apply_center(self):
        if self.pending is not None:
            total, n = self.pending
            self.center = self.center * self.center_momentum + (total / n) * (1 - self.center_momentum)
            self.pending = None

    @torch.no_grad()
    def softmax_center_teacher(self, t, teacher_temp):
        self.apply_center()
        return F.softmax((t - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, t, temp, n_masked, n_iterations=3):
        Q = torch.exp(t.float() / temp).t()
        B, K = n_masked, Q.shape[0]
        Q /= Q.sum()
        for _ in range(n_iterations):
            Q /= Q.sum(dim=1, keepdim=True)
            Q /= K
            Q /= Q.sum(dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.t()

    def forward(self, s, t, masks):
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        loss = torch.sum(loss * masks.float(), dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):
        s, t, masks = student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        if masks_weight is None:
            masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        return -(loss * masks_weight).sum() / masks.shape[0]

    @torch.no_grad()
    def update_center(self, t):
        self.pending = (torch.sum(t.mean(1), dim=0, keepdim=True), len(t))


def ref_koleo(x, eps=1e-8):
    """koleo_loss.py: KoLeoLoss.forward."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    idx = torch.max(dots, dim=1).indices
    return -torch.log(F.pairwise_distance(x, x[idx], p=2, eps=eps) + eps).mean()



class KoLeoLoss(torch.nn.Module):
    def forward(self, student_output, eps=1e-8):
        return ref_koleo(student_output, eps)


def as_dinov2_modules() -> dict:
    """``{"dinov2": ..., "dinov2.loss": ...}`` module objects exposing these classes, for
    ``sys.modules``: then ``from dinov2.loss import DINOLoss, iBOTPatchLoss, KoLeoLoss`` works."""
    pkg = types.ModuleType("dinov2")
    loss = types.ModuleType("dinov2.loss")
    loss.DINOLoss, loss.iBOTPatchLoss, loss.KoLeoLoss = DINOLoss, iBOTPatchLoss, KoLeoLoss
    pkg.loss = loss
    return {"dinov2": pkg, "dinov2.loss": loss}


def install_as_dinov2() -> None:
    sys.modules.update(as_dinov2_modules())
