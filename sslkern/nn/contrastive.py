"""Contrastive loss modules over the fused ``sslkern.info_nce_loss``: InfoNCE / NT-Xent (MoCo v3, SimCLR) and CPC."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops._common import world_size
from ..ops.info_nce_loss import info_nce_loss


class InfoNCELoss(nn.Module):
    """InfoNCE (MoCo v3) or NT-Xent (SimCLR) loss: ``forward(q, k, pos=None)``.

    Args:
        temperature: τ > 0.
        normalize: L2-normalize q and k inside (as MoCo v3 and lightly do).
        nt_xent: SimCLR NT-Xent over the 2n views ``cat(q, k)`` (lightly ``NTXentLoss``);
            else InfoNCE of the rows q against the columns k (positive of row i: ``k[i]``,
            or ``pos[i]``).
        gather_distributed: with torch.distributed initialized, negatives come from every rank.
            InfoNCE: the keys of every rank are all-gathered (without gradient, as MoCo v3's
            ``concat_all_gather`` of the momentum encoder's keys) and row i's positive is
            ``k_all[i + rank·N]``. NT-Xent: this rank's 2n views are the rows and the 2n·W
            views of all ranks the columns, gathered WITH their gradient (SimCLR's cross-replica
            negatives); the mean over ranks of the loss is the one-process loss.
        scale: multiplies the loss (MoCo v3 reports ``2·τ`` times the cross-entropy: pass
            ``scale=2 * temperature`` to match its numbers).
        rince: ``(q, λ)``: the robust RINCE loss instead of InfoNCE over the same logits (see
            :func:`sslkern.info_nce_loss`; chingyaoc/RINCE's MoCo v3 form with ``scale=2τ``,
            its SimCLR form with ``nt_xent=True``).
    """

    def __init__(self, temperature: float = 0.1, *, normalize: bool = True, nt_xent: bool = False,
                 gather_distributed: bool = False, scale: float = 1.0, rince: Optional[tuple[float, float]] = None):
        super().__init__()
        self.temperature = float(temperature)
        self.normalize = normalize
        self.nt_xent = nt_xent
        self.gather_distributed = gather_distributed
        self.scale = float(scale)
        self.rince = None if rince is None else tuple(rince)

    def forward(self, q: torch.Tensor, k: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.nt_xent and self.gather_distributed and world_size() > 1:
            loss = self._global_nt_xent(q, k)
            return loss * self.scale if self.scale != 1.0 else loss
        offset = 0
        if self.gather_distributed and world_size() > 1:
            d = torch.distributed
            with torch.no_grad():
                parts = [torch.empty_like(k) for _ in range(d.get_world_size())]
                d.all_gather(parts, k.contiguous())
                k = torch.cat(parts, dim=0)
            if pos is None:
                offset = d.get_rank() * q.shape[0]
        loss = info_nce_loss(q, k, self.temperature, normalize=self.normalize, pos=pos, pos_offset=offset,
                             nt_xent=self.nt_xent, rince=self.rince)
        return loss * self.scale if self.scale != 1.0 else loss

    def _global_nt_xent(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Row i = view a of local image j; its positive is view 1 − a of j, its own column left out."""
        from torch.distributed.nn.functional import all_gather

        d = torch.distributed
        z = torch.cat([q, k]).contiguous()
        n2, rank = z.shape[0], d.get_rank()
        z_all = torch.cat(all_gather(z))                                           # rank-major (2n·W, D)
        i = torch.arange(n2, device=z.device)
        return info_nce_loss(z, z_all, self.temperature, normalize=self.normalize, pos=rank * n2 + (i + n2 // 2) % n2,
                             exclude=rank * n2 + i, rince=self.rince)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, normalize={self.normalize}, nt_xent={self.nt_xent}, "
                f"gather_distributed={self.gather_distributed}, scale={self.scale}"
                + (f", rince={self.rince}" if self.rince is not None else ""))


class CPCLoss(nn.Module):
    """CPC's InfoNCE over the global batch (van den Oord et al. 2018; Hénaff et al. 2019,
    appendix A.2 ``CPC``): every prediction against every target of every image of the batch.

    ``forward(preds, targets, labels) -> (loss, stats)``:

    * ``preds``: a sequence of (R_k, C) predictions of this process, one per prediction offset k;
    * ``targets``: (M, C) this process's targets, ``targets_per_image`` consecutive rows per image;
    * ``labels``: a sequence of (R_k,) integer rows of ``targets`` holding each prediction's
      positive (indices into this process's targets).

    The loss is ``Σ_k mean_i [logsumexp_j(p_i·t_j/τ) − p_i·t_label(i)/τ]`` (the pseudo-code's
    ``cross_entropy(matmul(preds, targets, transp_b=True), labels)``, summed over the offsets),
    through :func:`sslkern.info_nce_loss` (tiled: no (rows, targets) logits tensor; τ = 1 and
    no normalisation by default, as CPC). With ``gather_distributed`` and torch.distributed
    initialised, the targets of every process are all-gathered WITH their gradient (rank-major)
    and the labels shifted by ``rank·M``: the negatives are the global batch's, and the mean over
    processes of the loss is the one-process loss (each process holds as many predictions).

    ``stats`` (0-dim tensors, no gradient): ``accuracy`` (share of predictions whose best-scoring
    target is their positive), ``wrong_same_image`` / ``wrong_other_image`` (best target another
    row of the positive's image / of another image; the three add up to 1) and ``chance``
    (1 / the number of targets). The argmax runs over blocks of ``chunk`` rows.
    """

    def __init__(self, targets_per_image: int, *, temperature: float = 1.0, normalize: bool = False,
                 gather_distributed: bool = True, chunk: int = 256):
        super().__init__()
        if isinstance(targets_per_image, bool) or not isinstance(targets_per_image, int) or targets_per_image <= 0:
            raise ValueError(f"sslkern.nn.CPCLoss: targets_per_image expected a positive int, got {targets_per_image!r}")
        self.targets_per_image = targets_per_image
        self.temperature = float(temperature)
        self.normalize = normalize
        self.gather_distributed = gather_distributed
        self.chunk = chunk

    def gather(self, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(the targets of every process, rank-major, with their gradient; this process's first row in them)."""
        if not (self.gather_distributed and world_size() > 1):
            return targets, 0
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(targets.contiguous())), torch.distributed.get_rank() * targets.shape[0]

    def forward(self, preds, targets: torch.Tensor, labels) -> tuple[torch.Tensor, dict]:
        preds, labels = list(preds), list(labels)
        if not preds or len(preds) != len(labels):
            raise ValueError(f"sslkern.nn.CPCLoss: preds and labels expected one entry per offset each, got "
                             f"{len(preds)} and {len(labels)}")
        if targets.dim() != 2 or targets.shape[0] % self.targets_per_image:
            raise ValueError(f"sslkern.nn.CPCLoss: targets expected (images · {self.targets_per_image}, C), got shape "
                             f"{tuple(targets.shape)}")
        all_targets, first = self.gather(targets)
        loss = 0.0
        for p, lab in zip(preds, labels):
            loss = loss + info_nce_loss(p, all_targets, self.temperature, normalize=self.normalize, pos=lab + first)
        return loss, self.guesses(preds, all_targets, [lab + first for lab in labels])

    @torch.no_grad()
    def guesses(self, preds, targets: torch.Tensor, labels) -> dict:
        """Top-1 guesses of every prediction among ``targets`` (global rows; see the class docstring)."""
        per_image = self.targets_per_image
        device = targets.device
        correct = torch.zeros((), dtype=torch.int64, device=device)
        same = torch.zeros((), dtype=torch.int64, device=device)
        rows = 0
        t = targets.detach()
        if self.normalize:
            t = torch.nn.functional.normalize(t, dim=1)
        for p, lab in zip(preds, labels):
            p = p.detach()
            if self.normalize:
                p = torch.nn.functional.normalize(p, dim=1)
            for i in range(0, p.shape[0], self.chunk):
                guess = (p[i:i + self.chunk] @ t.t()).argmax(1)
                want = lab[i:i + self.chunk]
                hit = guess == want
                correct += hit.sum()
                same += (~hit & (guess // per_image == want // per_image)).sum()
            rows += p.shape[0]
        n = max(rows, 1)
        return {"accuracy": correct / n, "wrong_same_image": same / n, "wrong_other_image": (rows - correct - same) / n,
                "chance": torch.tensor(1.0 / targets.shape[0])}
