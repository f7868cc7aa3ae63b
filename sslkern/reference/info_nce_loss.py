"""InfoNCE / NT-Xent contrastive loss, eager PyTorch.

The public code it follows: MoCo v3 ``moco/builder.py`` (``normalize`` both sides,
``einsum('nc,mc->nm') / T``, ``CrossEntropyLoss`` with labels ``arange(N) + N·rank``; MoCo v3
multiplies the result by ``2·T``, which this function does not) and lightly
``NTXentLoss`` (SimCLR: the 2N views of a batch, each view's positive is the other view of
its image, every other view a negative, the self-similarity left out of the denominator).
It materializes the (rows, columns) logits: the oracle for tests and the eager baseline of
the benchmark.

``rince=(q, λ)``: RINCE (Chuang et al. 2022) as chingyaoc/RINCE computes it (MoCo v3
``moco/builder.py: contrastive_loss``, SimCLR ``simclr_module.py: sym_loss``): with
``pos_i = exp(s_i,pos[i])`` and ``neg_i = Σ_{j ≠ exclude[i]} exp(s_ij)`` (the positive included),
``mean_i [−pos_i^q / q] + mean_i [(λ·neg_i)^q / q]``. The exponentials are taken of the logits
themselves, so the value overflows where ``s/τ`` passes the dtype's exp range (fp32: 88.7).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def nt_xent_indices(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos, exclude) of NT-Xent over the 2n rows ``cat(view0, view1)`` against themselves:
    row i's positive is its other view, i ± n, and its own column i is left out."""
    i = torch.arange(2 * n, device=device)
    return (i + n) % (2 * n), i


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.1, *, normalize: bool = True,
                  pos: Optional[torch.Tensor] = None, pos_offset: int = 0, exclude: Optional[torch.Tensor] = None,
                  nt_xent: bool = False, rince: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """``mean_i [logsumexp_{j ≠ exclude[i]}(q_i·k_j/τ) − q_i·k_pos[i]/τ]`` by ``cross_entropy``
    over the materialized logits, in the inputs' dtype (as the public code runs).

    ``nt_xent=True``: q and k are the two views (n, D) of one batch; the rows and the columns
    are ``cat(q, k)`` (2n), positives i ± n, the self-similarity excluded (lightly
    ``NTXentLoss``, SimCLR). Otherwise positives are ``pos`` (default ``arange(N) + pos_offset``,
    MoCo v3's labels) and ``exclude`` (−1 = none) names one column per row left out.
    ``rince=(q, λ)``: the RINCE loss over the same logits (see the module docstring; MoCo v3's
    form multiplies it by 2τ, as the InfoNCE form, outside this function).
    """
    if normalize:
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
    if nt_xent:
        q = k = torch.cat([q, k], dim=0)
        pos, exclude = nt_xent_indices(q.shape[0] // 2, q.device)
    elif pos is None:
        pos = torch.arange(q.shape[0], device=q.device) + pos_offset
    logits = torch.einsum("nc,mc->nm", q, k) / temperature
    if exclude is not None:
        cols = torch.arange(k.shape[0], device=q.device)
        logits = logits.masked_fill(cols[None, :] == exclude.long()[:, None], float("-inf"))
    if rince is not None:
        rq, lam = rince
        exp_logits = torch.exp(logits)
        pos_term = exp_logits.gather(1, pos.long()[:, None])[:, 0]
        return (-(pos_term ** rq) / rq).mean() + ((lam * exp_logits.sum(1)) ** rq / rq).mean()
    return F.cross_entropy(logits, pos.long())
