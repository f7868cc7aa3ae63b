"""Eager references for the DINO / iBOT / DINOv2 losses.

Follow dino ``main_dino.py: DINOLoss`` (centering + sharpening, same-view pairs skipped,
center EMA on the raw teacher logits), dinov2 ``dinov2/loss/dino_clstoken_loss.py``
(``sinkhorn_knopp_teacher``), ``dinov2/loss/ibot_patch_loss.py`` (``forward_masked``) and
``dinov2/loss/koleo_loss.py``. Plain PyTorch, materializing every probability: the oracle
for tests and the baseline for benchmarks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_teacher_probs(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """``softmax((t − c)/τt)`` (dino ``DINOLoss.forward``)."""
    return F.softmax((teacher - center) / teacher_temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """dinov2 ``DINOLoss.sinkhorn_knopp_teacher`` (single process), verbatim math: no
    max-subtraction, so it overflows for ``t/τt`` above ~88 (fp32)."""
    Q = torch.exp((teacher if teacher.dtype == torch.float64 else teacher.float()) / teacher_temp).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor | None, student_temp: float = 0.1,
              teacher_temp: float = 0.04, n_global_crops: int = 2, teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """dino ``DINOLoss.forward``: mean over (q, v ≠ q) pairs of the batch-mean cross-entropy.

    ``student`` (V·B, K) crop-major, ``teacher`` (T·B, K) with T = ``n_global_crops``; the
    teacher probabilities are ``softmax((t − c)/τt)`` unless ``teacher_probs`` is given
    (e.g. from ``sinkhorn_knopp_teacher``).
    """
    n_crops = student.shape[0] // (teacher.shape[0] // n_global_crops)
    student_out = (student / student_temp).chunk(n_crops)
    if teacher_probs is None:
        teacher_probs = dino_teacher_probs(teacher, center, teacher_temp)
    teacher_out = teacher_probs.detach().chunk(n_global_crops)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss = total_loss + loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


@torch.no_grad()
def center_update(center: torch.Tensor, teacher: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """dino ``DINOLoss.update_center`` (world size 1 unless torch.distributed is initialized)."""
    batch_center = torch.sum(teacher, dim=0, keepdim=True)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(batch_center)
        world = torch.distributed.get_world_size()
    batch_center = batch_center / (len(teacher) * world)
    return (center * momentum + batch_center * (1 - momentum)).reshape(center.shape)


def ibot_patch_loss(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, center: torch.Tensor | None,
                    student_temp: float = 0.1, teacher_temp: float = 0.04,
                    teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
    """dinov2 ``iBOTPatchLoss.forward_masked``: ``student``/``teacher`` (M, K) masked tokens in
    ``masks.flatten(1)`` row-major order, ``masks`` (B_g, ...) bool."""
    if teacher_probs is None:
        teacher_probs = dino_teacher_probs(teacher, center, teacher_temp)
    masks = masks.flatten(1)
    loss = torch.sum(teacher_probs.detach() * F.log_softmax(student / student_temp, dim=-1), dim=-1)
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    loss = loss * masks_weight
    return -loss.sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """dinov2 ``KoLeoLoss``: ``−mean log(‖x̂ − x̂_nn‖ + eps)`` with x̂ = normalize(x, eps=1e-8)
    and the nearest neighbour by largest dot product, excluding the point itself."""
    with torch.autocast("cuda", enabled=False):
        x = F.normalize(x, eps=eps, p=2, dim=-1)
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        indices = torch.max(dots, dim=1).indices
        distances = F.pairwise_distance(x, x[indices], p=2, eps=eps)
        return -torch.log(distances + eps).mean()
