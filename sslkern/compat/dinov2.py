"""Drop-ins for dinov2's losses (``dinov2/loss/*.py``): same classes, methods, buffers, call order.

::

    from dinov2.loss import DINOLoss, iBOTPatchLoss, KoLeoLoss              # before
    from sslkern.compat.dinov2 import DINOLoss, iBOTPatchLoss, KoLeoLoss    # after

dinov2 splits each loss in two steps: ``softmax_center_teacher`` (or
``sinkhorn_knopp_teacher``) materializes the (N, K) teacher probabilities, then
``forward`` / ``forward_masked`` takes them. The drop-ins keep that API and fuse what the
split leaves: the student log-softmax, the cross-entropy over every (student, teacher)
pair and the student gradient are one pass of ``torch.ops.sslkern.dino_loss`` (no
(N, K) log-softmax, no autograd graph over the pairs). The teacher softmax and the center
sum cannot join that pass — the probabilities already exist when the loss is called.

The fused calls beside them take the teacher *logits* and do the whole step in one pass
(centering + sharpening in the kernel, center sum fused, no probability tensor):

    ``DINOLoss.forward_fused(student_output_list, teacher_output, teacher_temp)``
        = ``forward(student_output_list, softmax_center_teacher(teacher_output, τ).view(T, B, K))``
          followed by ``update_center(teacher_output)``;
    ``iBOTPatchLoss.forward_masked_fused(student, teacher_logits, student_masks_flat, teacher_temp, ...)``
        = ``forward_masked(student, softmax_center_teacher(teacher, τ), ...)`` + ``update_center``.

Center semantics are dinov2's: ``update_center`` only stages the batch sum (all-reduced
asynchronously under torch.distributed); the next ``softmax_center_teacher`` (or fused
call) applies it. Not supported: the unmasked ``iBOTPatchLoss.forward`` over (B, N, K)
inputs runs eagerly, as in dinov2 (it is not what dinov2 trains with).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import FLOAT_DTYPES, check_tensor, fail
from ..ops._common import world_size
from ..ops.dino_loss import koleo_loss
from ..ops.dino_loss import sinkhorn_knopp_teacher as _sinkhorn
from ._common import pair_cross_entropy, rows

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss"]


def _dist() -> bool:
    return world_size() > 1


class _StagedCenter:
    """dinov2's deferred center update: stage a batch sum (async all-reduce), apply later."""

    def _stage(self, batch_sum: Tensor, n: int) -> None:
        self.updated = False
        self._center_len = n
        self.async_batch_center = batch_sum
        self.reduce_handle = dist.all_reduce(batch_sum, async_op=True) if _dist() else None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        if self.updated is False:
            world = world_size()
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            batch = self.async_batch_center / (self._center_len * world)
            self.center = self.center * self.center_momentum + batch * (1 - self.center_momentum)
            self.updated = True


class DINOLoss(_StagedCenter, nn.Module):
    """dinov2 ``DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)``; ``center`` (1, out_dim).

    ``forward(student_output_list, teacher_out_softmaxed_centered_list)`` returns
    ``−Σ_s Σ_t mean_b Σ_k t·log_softmax(s/τs)`` over *all* pairs (dinov2 divides by the number
    of terms outside), fused on the student side; the teacher list is a list of (B, K)
    probability tensors or a (T, B, K) tensor, as dinov2 passes it.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_output = None
        self.async_batch_center = None

    @property
    def _center_len(self):
        return self.len_teacher_output

    @_center_len.setter
    def _center_len(self, n):
        self.len_teacher_output = n

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """dinov2's Sinkhorn-Knopp assignment (fp32), computed in the log domain
        (:func:`sslkern.sinkhorn_knopp_teacher`): equal where dinov2's is finite, and finite
        where dinov2's ``exp(t/τ)`` overflows."""
        return _sinkhorn(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_output_list: Sequence[Tensor], teacher_out_softmaxed_centered_list) -> Tensor:
        op = "compat.dinov2.DINOLoss"
        s, V = rows(op, "student_output_list", list(student_output_list))
        t, T = rows(op, "teacher_out_softmaxed_centered_list", teacher_out_softmaxed_centered_list, device=s.device)
        B = t.shape[0] // T
        loss, _ = pair_cross_entropy(op, s, t, None, n_student_views=V, n_teacher_views=T, skip_same_view=False,
                                     scale=1.0 / B, student_temp=self.student_temp, teacher_is_probs=True)
        return loss

    def forward_fused(self, student_output_list: Sequence[Tensor], teacher_output: Tensor, teacher_temp: float,
                      *, update_center: bool = True) -> Tensor:
        """The fused call: teacher *logits* (T·B, K) (or (T, B, K)), centering + sharpening in
        the kernel. Equals ``forward(student_output_list, softmax_center_teacher(teacher_output,
        teacher_temp).view(T, B, K))`` and, with ``update_center``, then stages
        ``update_center(teacher_output)`` from the fused column sum. Call it once per
        teacher batch with ``update_center=True``: that call first applies the update staged
        by the previous batch (as ``softmax_center_teacher`` does). dinov2 uses one teacher
        batch for its local- and global-crop terms: make the second call with
        ``update_center=False``, which uses the center as it is (neither applies nor stages)."""
        op = "compat.dinov2.DINOLoss.forward_fused"
        s, V = rows(op, "student_output_list", list(student_output_list))
        check_tensor(op, "teacher_output", teacher_output, dtypes=FLOAT_DTYPES, ndim=(2, 3), device=s.device)
        t = teacher_output.reshape(-1, teacher_output.shape[-1])
        B = s.shape[0] // V
        if B == 0 or t.shape[0] % B:
            fail(op, f"teacher_output expected a multiple of the student batch ({B}) rows, got {t.shape[0]}")
        T = t.shape[0] // B
        if update_center:
            self.apply_center_update()
        loss, csum = pair_cross_entropy(op, s, t, self.center, n_student_views=V, n_teacher_views=T,
                                        skip_same_view=False, scale=1.0 / B, student_temp=self.student_temp,
                                        teacher_temp=float(teacher_temp), center_sum=update_center)
        if update_center:
            with torch.no_grad():
                self._stage(csum.to(self.center.dtype).reshape(1, -1), t.shape[0])
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: Tensor) -> None:
        self._stage(torch.sum(teacher_output, dim=0, keepdim=True), len(teacher_output))


class iBOTPatchLoss(_StagedCenter, nn.Module):  # noqa: N801 (dinov2's name)
    """dinov2 ``iBOTPatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)``;
    ``center`` (1, 1, patch_out_dim).

    ``forward_masked(student_patch_tokens_masked, teacher_patch_tokens_masked,
    student_masks_flat, n_masked_patches=None, masks_weight=None)`` (teacher: probabilities
    from ``softmax_center_teacher`` / ``sinkhorn_knopp_teacher``) returns
    ``−Σ_tokens w·Σ_k t·log_softmax(s/τs) / B`` with ``B = student_masks_flat.shape[0]``,
    ``w = masks_weight`` or ``1/n_masked(image)``, over the first ``n_masked_patches`` rows;
    fused on the student side.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_patch_tokens = None
        self.async_batch_center = None

    @property
    def _center_len(self):
        return self.len_teacher_patch_tokens

    @_center_len.setter
    def _center_len(self, n):
        self.len_teacher_patch_tokens = n

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        self.apply_center_update()
        self.center = self.center.to(device=teacher_patch_tokens.device)
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float,
                               n_masked_patches_tensor: Optional[Tensor] = None, n_iterations: int = 3) -> Tensor:
        """dinov2's Sinkhorn-Knopp over the masked tokens, log domain. dinov2's
        ``n_masked_patches_tensor`` only scales the columns before the final column
        normalization, where it cancels: it is accepted and unused (so a single process
        works too; dinov2's ``dist.all_reduce`` of it needs torch.distributed)."""
        return _sinkhorn(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor,
                student_masks_flat: Tensor) -> Tensor:
        """dinov2's unmasked form over (B, N, K) tokens and (B, N) masks: eager, as dinov2."""
        loss = torch.sum(teacher_patch_tokens * F.log_softmax(student_patch_tokens / self.student_temp, dim=-1), -1)
        m = student_masks_flat.float()
        loss = torch.sum(loss * m, dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def _weights(self, op, student_masks_flat, n_rows, n_masked_patches, masks_weight, device, acc):
        check_tensor(op, "student_masks_flat", student_masks_flat, ndim=2, device=device)
        if masks_weight is None:
            m = student_masks_flat.bool()
            masks_weight = (1 / m.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(m)[m]
        else:
            check_tensor(op, "masks_weight", masks_weight, dtypes=FLOAT_DTYPES, ndim=(1, 2), device=device)
            masks_weight = masks_weight.reshape(-1)
        if masks_weight.shape[0] != n_rows:
            fail(op, f"masks_weight expected {n_rows} entries (one per masked patch row), got {masks_weight.shape[0]}")
        return masks_weight.to(acc).contiguous()

    def forward_masked(self, student_patch_tokens_masked: Tensor, teacher_patch_tokens_masked: Tensor,
                       student_masks_flat: Tensor, n_masked_patches: Optional[int] = None,
                       masks_weight: Optional[Tensor] = None) -> Tensor:
        op = "compat.dinov2.iBOTPatchLoss.forward_masked"
        s, t = self._masked_rows(op, student_patch_tokens_masked, teacher_patch_tokens_masked, n_masked_patches)
        w = self._weights(op, student_masks_flat, s.shape[0], n_masked_patches, masks_weight, s.device,
                          torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32)
        loss, _ = pair_cross_entropy(op, s, t, None, n_student_views=1, n_teacher_views=1, skip_same_view=False,
                                     scale=1.0 / student_masks_flat.shape[0], student_temp=self.student_temp,
                                     teacher_is_probs=True, weights=w)
        return loss

    def forward_masked_fused(self, student_patch_tokens_masked: Tensor, teacher_patch_tokens_masked: Tensor,
                             student_masks_flat: Tensor, teacher_temp: float, n_masked_patches: Optional[int] = None,
                             masks_weight: Optional[Tensor] = None, *, update_center: bool = True) -> Tensor:
        """The fused call: teacher *logits* of the masked tokens. Equals ``forward_masked(s,
        softmax_center_teacher(t, teacher_temp), ...)`` and, with ``update_center``, stages
        ``update_center(t)`` (the mean of the masked teacher rows) from the fused sum; as
        for ``DINOLoss.forward_fused``, only a call with ``update_center=True`` applies the
        previously staged update first."""
        op = "compat.dinov2.iBOTPatchLoss.forward_masked_fused"
        s, t = self._masked_rows(op, student_patch_tokens_masked, teacher_patch_tokens_masked, n_masked_patches)
        w = self._weights(op, student_masks_flat, s.shape[0], n_masked_patches, masks_weight, s.device,
                          torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32)
        if update_center:
            self.apply_center_update()
        loss, csum = pair_cross_entropy(op, s, t, self.center, n_student_views=1, n_teacher_views=1,
                                        skip_same_view=False, scale=1.0 / student_masks_flat.shape[0],
                                        student_temp=self.student_temp, teacher_temp=float(teacher_temp),
                                        weights=w, center_sum=update_center)
        if update_center:
            with torch.no_grad():
                # dinov2: sum over the (1, M, K) tensor's mean(1) -> the mean of the M rows, len 1
                self._stage((csum / max(t.shape[0], 1)).to(self.center.dtype).reshape(1, -1), 1)
        return loss

    @staticmethod
    def _masked_rows(op, s, t, n_masked_patches):
        check_tensor(op, "student_patch_tokens_masked", s, dtypes=FLOAT_DTYPES, ndim=(2, 3))
        check_tensor(op, "teacher_patch_tokens_masked", t, dtypes=FLOAT_DTYPES, ndim=(2, 3), device=s.device)
        s = s.reshape(-1, s.shape[-1])
        t = t.reshape(-1, t.shape[-1])
        if n_masked_patches is not None:
            n = int(n_masked_patches)
            if n > s.shape[0] or n > t.shape[0]:
                fail(op, f"n_masked_patches expected <= {min(s.shape[0], t.shape[0])} (rows given), got {n}")
            s, t = s[:n], t[:n]
        if s.shape[0] != t.shape[0]:
            fail(op, f"teacher_patch_tokens_masked expected {s.shape[0]} rows (the student's), got {t.shape[0]}")
        return s, t

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens: Tensor) -> None:
        self._stage(torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True), len(teacher_patch_tokens))


class KoLeoLoss(nn.Module):
    """dinov2 ``KoLeoLoss``: ``forward(student_output, eps=1e-8)`` on (B, D), fp32 arithmetic.

    Runs :func:`sslkern.koleo_loss`. One difference, in a degenerate case only: dinov2 fills
    the diagonal of the similarity matrix with −1, so when every other row is exactly
    antipodal (e.g. B = 2, x₁ = −x₀) its arg-max may pick the row itself (distance 0,
    loss −log eps); sslkern fills −2 (as lightly) and always picks another row."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x: Tensor) -> Tensor:  # noqa: N802 (dinov2's name)
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        return torch.max(dots, dim=1).indices

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        return koleo_loss(student_output, eps=eps)
