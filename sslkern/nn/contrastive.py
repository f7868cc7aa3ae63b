"""Contrastive loss module over the fused ``sslkern.info_nce_loss``."""
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
    """

    def __init__(self, temperature: float = 0.1, *, normalize: bool = True, nt_xent: bool = False,
                 gather_distributed: bool = False, scale: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)
        self.normalize = normalize
        self.nt_xent = nt_xent
        self.gather_distributed = gather_distributed
        self.scale = float(scale)

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
                             nt_xent=self.nt_xent)
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
                             exclude=rank * n2 + i)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, normalize={self.normalize}, nt_xent={self.nt_xent}, "
                f"gather_distributed={self.gather_distributed}, scale={self.scale}")
