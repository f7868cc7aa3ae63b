"""Contrastive loss module over the fused ``sslkern.info_nce_loss``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.info_nce_loss import info_nce_loss


def _dist_ready() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


class InfoNCELoss(nn.Module):
    """InfoNCE (MoCo v3) or NT-Xent (SimCLR) loss: ``forward(q, k, pos=None)``.

    Args:
        temperature: τ > 0.
        normalize: L2-normalize q and k inside (as MoCo v3 and lightly do).
        nt_xent: SimCLR NT-Xent over the 2n views ``cat(q, k)`` (lightly ``NTXentLoss``);
            else InfoNCE of the rows q against the columns k (positive of row i: ``k[i]``,
            or ``pos[i]``).
        gather_distributed: InfoNCE only. With torch.distributed initialized, the keys of every
            rank are all-gathered (without gradient, as MoCo v3's ``concat_all_gather`` of the
            momentum encoder's keys) and row i's positive is ``k_all[i + rank·N]``.
        scale: multiplies the loss (MoCo v3 reports ``2·τ`` times the cross-entropy: pass
            ``scale=2 * temperature`` to match its numbers).
        rince: ``(q, λ)``: the robust RINCE loss instead of InfoNCE over the same logits (see
            :func:`sslkern.info_nce_loss`; chingyaoc/RINCE's MoCo v3 form with ``scale=2τ``,
            its SimCLR form with ``nt_xent=True``).
    """

    def __init__(self, temperature: float = 0.1, *, normalize: bool = True, nt_xent: bool = False,
                 gather_distributed: bool = False, scale: float = 1.0, rince: Optional[tuple[float, float]] = None):
        super().__init__()
        if nt_xent and gather_distributed:
            raise ValueError("sslkern.nn.InfoNCELoss: gather_distributed expected False with nt_xent=True "
                             "(build pos / exclude for cross-rank NT-Xent with sslkern.info_nce_loss)")
        self.temperature = float(temperature)
        self.normalize = normalize
        self.nt_xent = nt_xent
        self.gather_distributed = gather_distributed
        self.scale = float(scale)
        self.rince = None if rince is None else tuple(rince)

    def forward(self, q: torch.Tensor, k: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        offset = 0
        if self.gather_distributed and _dist_ready():
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

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, normalize={self.normalize}, nt_xent={self.nt_xent}, "
                f"gather_distributed={self.gather_distributed}, scale={self.scale}"
                + (f", rince={self.rince}" if self.rince is not None else ""))
