"""Drop-ins for lightly (1.6): same names, arguments, buffers and state-dict keys, fused ops inside.

Swap the imports, keep the code::

    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss               # before
    from lightly.models.utils import update_momentum, get_at_index, set_at_index, random_token_mask

    from sslkern.compat.lightly import DINOLoss, IBOTPatchLoss, KoLeoLoss    # after
    from sslkern.compat.lightly import update_momentum, get_at_index, set_at_index, random_token_mask

=========================  ====================================================================
lightly                    here
=========================  ====================================================================
``loss.DINOLoss``          :func:`sslkern.dino_loss` (teacher softmax, cross-entropy over view
                           pairs, gradient and center sum in one pass)
``loss.IBOTPatchLoss``     :func:`sslkern.ibot_patch_loss`
``loss.KoLeoLoss``         :func:`sslkern.koleo_loss` (``p=2``; other ``p`` eager, as lightly)
``update_momentum``        :func:`sslkern.ema_update_` (one pass over all parameters)
``get_at_index``           :func:`sslkern.gather_tokens`
``set_at_index``           :func:`sslkern.restore_tokens` (one pass instead of clone + scatter)
``random_token_mask``      lightly's algorithm and random stream (same indices for a seed)
=========================  ====================================================================

Not supported: ``DINOLoss(center_mode=...)`` other than ``"mean"`` (lightly has no other
either); ``set_at_index`` with repeated indices in a row (lightly's ``torch.scatter`` keeps
an arbitrary one; here it is an error).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_tensor, fail
from ..nn.dino import mean_over_ranks
from ..ops.dino_loss import ibot_patch_loss, koleo_loss
from ..ops.tokens import gather_tokens, restore_tokens
from ._common import fused_ema_, pair_cross_entropy, rows

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "update_momentum", "get_at_index", "set_at_index",
           "random_token_mask", "Center"]


class DINOLoss(nn.Module):
    """lightly ``DINOLoss``: same constructor, ``center`` buffer (1, 1, output_dim),
    ``teacher_temp_schedule`` (``torch.linspace`` warm-up over epochs) and ``forward``.

    ``forward(teacher_out, student_out, teacher_temp=None, epoch=None)``: lists of (B, K)
    views (teacher: the global views; student: the same global views first, then the
    local ones); returns the mean cross-entropy over (teacher view, student view) pairs
    with different indices and updates ``center`` (EMA of the mean teacher output,
    averaged over ranks under torch.distributed), as lightly does, in one fused pass.
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean") -> None:
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center: Tensor
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.center_momentum = center_momentum
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(start=warmup_teacher_temp, end=teacher_temp,
                                                    steps=warmup_teacher_temp_epochs)

    def _temperature(self, teacher_temp: Optional[float], epoch: Optional[int]) -> float:
        # lightly divides by a float32 tensor: use the same float32-rounded value
        if teacher_temp is not None:
            return float(torch.tensor(teacher_temp))
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return float(torch.tensor(self.teacher_temp))

    def forward(self, teacher_out: list[Tensor], student_out: list[Tensor], teacher_temp: Optional[float] = None,
                epoch: Optional[int] = None) -> Tensor:
        op = "compat.lightly.DINOLoss"
        t, T = rows(op, "teacher_out", teacher_out)
        s, V = rows(op, "student_out", student_out, device=t.device)
        n_terms = T * V - min(T, V)
        if n_terms == 0:
            raise ValueError(
                "DINOLoss requires at least two views in total (the diagonal matching the same view index is "
                f"excluded), but got {T} teacher view(s) and {V} student view(s), which leaves no cross-view terms "
                "to compute the loss from.")
        B = t.shape[0] // T
        loss, csum = pair_cross_entropy(op, s, t, self.center, n_student_views=V, n_teacher_views=T,
                                        skip_same_view=True, scale=1.0 / (n_terms * B),
                                        student_temp=self.student_temp,
                                        teacher_temp=self._temperature(teacher_temp, epoch), center_sum=True)
        with torch.no_grad():
            batch_center = mean_over_ranks((csum / t.shape[0]).reshape(self.center.shape))
            self.center.copy_(self.center * self.center_momentum + batch_center * (1 - self.center_momentum))
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """lightly ``update_center``: ``teacher_out`` (views, B, K)."""
        batch_center = mean_over_ranks(torch.mean(teacher_out, dim=(0, 1), keepdim=True))
        self.center.copy_(self.center * self.center_momentum + batch_center * (1 - self.center_momentum))


class Center(nn.Module):
    """lightly ``models.modules.center.Center`` (mode "mean"): buffer ``center`` of ``size``,
    ``value``, ``update(x)`` (mean over the dims where ``size`` is 1, averaged over ranks)."""

    def __init__(self, size: Tuple[int, ...], mode: str = "mean", momentum: float = 0.9) -> None:
        super().__init__()
        if mode != "mean":
            raise ValueError(f"Unknown mode '{mode}'. Valid modes are ['mean'].")
        self.size = size
        self.dim = tuple(i for i, s in enumerate(size) if s == 1)
        self.center: Tensor
        self.register_buffer("center", torch.zeros(size))
        self.momentum = momentum

    @property
    def value(self) -> Tensor:
        return self.center

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        batch_center = mean_over_ranks(torch.mean(x, dim=self.dim, keepdim=True))
        self.center.copy_(self.center * self.momentum + batch_center * (1 - self.momentum))


class IBOTPatchLoss(nn.Module):
    """lightly ``IBOTPatchLoss``: same constructor, ``center`` sub-module (state-dict key
    ``center.center``, shape (1, output_dim)).

    ``forward(teacher_out, student_out, mask, teacher_temp=None)``: (M, K) logits of the M
    masked tokens and the (B, H, W) (or (B, N)) bool mask with M entries set; returns
    ``Σ_tokens CE / n_masked(image) / B`` and updates the center (mean masked teacher
    logit), fused (:func:`sslkern.ibot_patch_loss`).
    """

    def __init__(self, output_dim: int = 65536, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_mode: str = "mean", center_momentum: float = 0.9) -> None:
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center = Center(size=(1, output_dim), mode=center_mode, momentum=center_momentum)

    def forward(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor,
                teacher_temp: Optional[float] = None) -> Tensor:
        temp = float(torch.tensor(teacher_temp if teacher_temp is not None else self.teacher_temp))
        loss, teacher_sum = ibot_patch_loss(student_out, teacher_out, mask, self.center.value,
                                            student_temp=self.student_temp, teacher_temp=temp, return_teacher_sum=True)
        with torch.no_grad():  # lightly's Center.update: the mean masked teacher row, averaged over ranks
            batch_center = mean_over_ranks(teacher_sum / max(teacher_out.shape[0], 1))
            c = self.center.center
            c.copy_(c * self.center.momentum + batch_center.reshape(c.shape).to(c.dtype) * (1 - self.center.momentum))
        return loss


class KoLeoLoss(nn.Module):
    """lightly ``KoLeoLoss(p=2, eps=1e-8)``: ``−mean log(‖x̂ − x̂_nn‖_p + eps)`` over the rows
    of (B, D) ``x`` (x̂ = L2-normalized). ``p=2`` runs :func:`sslkern.koleo_loss` (fp32
    arithmetic for fp16/bf16 inputs); other ``p`` are computed as lightly does."""

    def __init__(self, p: float = 2, eps: float = 1e-8):
        super().__init__()
        self.p = p
        self.eps = eps
        self.pairwise_distance = nn.PairwiseDistance(p=p, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 2:
            return koleo_loss(x, eps=self.eps)
        x = F.normalize(x, p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            cos_sim = torch.mm(x, x.t())
            cos_sim.fill_diagonal_(-2)
            nn_idx = cos_sim.argmax(dim=1)
        return -(self.pairwise_distance(x, x[nn_idx]) + self.eps).log().mean()


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: Union[float, Tensor]) -> None:
    """lightly ``update_momentum``: ``θ_ema ← m·θ_ema + (1 − m)·θ`` for the parameters of the
    two modules paired in order (buffers untouched, as lightly), in one
    :func:`sslkern.ema_update_` pass."""
    ema_params = list(model_ema.parameters())
    params = list(model.parameters())
    if len(ema_params) != len(params):
        fail("compat.lightly.update_momentum",
             f"model expected {len(ema_params)} parameters (as many as model_ema), got {len(params)}")
    for i, (e, p) in enumerate(zip(ema_params, params)):
        if e.shape != p.shape:
            fail("compat.lightly.update_momentum",
                 f"model parameter {i} expected shape {tuple(e.shape)} (model_ema's), got {tuple(p.shape)}")
    fused_ema_([e.data for e in ema_params], [p.detach() for p in params], m)


def get_at_index(tokens: Tensor, index: Tensor) -> Tensor:
    """lightly ``get_at_index``: ``tokens[b, index[b, j]]`` -> (B, Nk, D); :func:`sslkern.gather_tokens`."""
    return gather_tokens(tokens, index)


def set_at_index(tokens: Tensor, index: Tensor, value: Tensor) -> Tensor:
    """lightly ``set_at_index``: a copy of ``tokens`` (B, N, D) with ``value[b, j]`` written at
    ``index[b, j]``; one :func:`sslkern.restore_tokens` pass (the other rows read from
    ``tokens``). Indices must be distinct within a row (checked)."""
    op = "compat.lightly.set_at_index"
    check_tensor(op, "tokens", tokens, ndim=3)
    check_tensor(op, "index", index, dtypes=(torch.int64, torch.int32), ndim=2, device=tokens.device)
    B, N, D = tokens.shape
    Nk = index.shape[1]
    check_tensor(op, "value", value, shape=(B, Nk, D), device=tokens.device)
    if index.shape[0] != B or Nk > N:
        fail(op, f"index expected shape ({B}, <= {N}), got {tuple(index.shape)}")
    index = index.long()
    if Nk and (int(index.min()) < 0 or int(index.max()) >= N):
        fail(op, f"index expected values in [0, {N}), got [{int(index.min())}, {int(index.max())}]")
    # ranks: slot index[b, j] takes value row j; every other slot a rank >= Nk (its tokens row)
    taken = torch.zeros(B, N, dtype=torch.bool, device=tokens.device).scatter_(1, index, True)
    if int(taken.sum()) != B * Nk:
        fail(op, "index expected distinct indices in every row, got repeats")
    free_rank = Nk + torch.cumsum(~taken, dim=1) - 1
    ranks = torch.empty(B, N, dtype=torch.int64, device=tokens.device)
    ranks.scatter_(1, index, torch.arange(Nk, device=tokens.device).expand(B, Nk))
    ranks = torch.where(taken, ranks, free_rank)
    return restore_tokens(value.to(tokens.dtype), ranks, fill=tokens)


def random_token_mask(size: Tuple[int, int], mask_ratio: float = 0.6, mask_class_token: bool = False,
                      device: Optional[Union[torch.device, str]] = None) -> Tuple[Tensor, Tensor]:
    """lightly ``random_token_mask``: ``(idx_keep, idx_mask)`` for a (batch, sequence_length)
    token batch, drawn exactly as lightly draws them (same indices for the same seed).
    Index 0 (the class token) is always kept unless ``mask_class_token``. Feed
    ``idx_keep`` to :func:`get_at_index` / :func:`sslkern.gather_tokens`."""
    batch_size, sequence_length = size
    n_maskable = sequence_length - int(not mask_class_token)
    num_keep = int(n_maskable * (1 - mask_ratio))
    noise = torch.rand(batch_size, sequence_length, device=device)
    if not mask_class_token and sequence_length > 0:
        noise[:, 0] = -1
        num_keep = max(1, num_keep + 1)
    order = torch.argsort(noise, dim=1)
    return order[:, :num_keep], order[:, num_keep:]
