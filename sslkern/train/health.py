"""Collapse signals, computed from what a step already has (no extra forward passes).

Self-distillation (DINO, iBOT): with teacher probabilities ``p = softmax((t − c)/τt)`` (or
the Sinkhorn-Knopp teacher) over K prototypes,
  * ``teacher_entropy_frac`` = mean_rows H(p) / ln K: near 1 = uniform collapse;
  * ``batch_entropy_frac``  = H(mean_rows p) / ln K: near 0 = every image on one prototype;
  * ``kl`` = student–teacher KL = cross-entropy loss − mean teacher entropy (exact, since each
    teacher row enters the same number of pairs).
Joint embedding (BYOL, SimSiam, MoCo, SimCLR): ``embedding_std`` = mean over dimensions of
the per-dimension std of L2-normalised embeddings, × √D (1 for isotropic, → 0 on collapse).
"""
from __future__ import annotations

import math

import torch

import sslkern
from sslkern.train.distributed import all_reduce_mean


@torch.no_grad()
def teacher_probabilities(teacher_logits: torch.Tensor, center, teacher_temp: float, mode: str = "center") -> torch.Tensor:
    t = teacher_logits.float()
    if mode == "sinkhorn":
        return sslkern.sinkhorn_knopp_teacher(t, teacher_temp).float()
    return torch.softmax((t - center.reshape(1, -1).float()) / teacher_temp, dim=-1)


@torch.no_grad()
def distillation_health(teacher_logits: torch.Tensor, center, teacher_temp: float, loss: torch.Tensor, *,
                        mode: str = "center", weights: torch.Tensor | None = None, prefix: str = "") -> dict:
    """Teacher entropy (fraction of ln K), batch-mean entropy (fraction), KL; see module doc.

    ``weights`` (rows,) weight each teacher row's entropy as the loss weights its rows (iBOT).
    """
    k = teacher_logits.shape[-1]
    p = teacher_probabilities(teacher_logits, center, teacher_temp, mode)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
    mean_ent = (ent * weights).sum() / weights.sum() if weights is not None else ent.mean()
    pbar = all_reduce_mean(p.mean(0))  # the global batch's mean distribution (entropy is not additive)
    batch_ent = -(pbar * pbar.clamp_min(1e-30).log()).sum()
    return {f"{prefix}teacher_entropy_frac": float(mean_ent) / math.log(k),
            f"{prefix}batch_entropy_frac": float(batch_ent) / math.log(k),
            f"{prefix}kl": float(loss.detach()) - float(mean_ent)}


def distillation_verdict(health: dict, prefixes=("",), *, uniform: float = 0.9, single: float = 0.1) -> tuple[bool, str]:
    """Collapsed if the teacher is near uniform (entropy ≥ ``uniform``·ln K) or puts the batch
    on one prototype (batch-mean entropy ≤ ``single``·ln K), for any head."""
    parts, collapsed = [], False
    for pre in prefixes:
        h, hb = health.get(f"{pre}teacher_entropy_frac"), health.get(f"{pre}batch_entropy_frac")
        if h is None or hb is None:
            continue
        name = pre.rstrip("_") or "teacher"
        if h >= uniform:
            collapsed = True
            parts.append(f"{name}: collapsed to uniform (entropy {h:.2f}·ln K ≥ {uniform})")
        elif hb <= single:
            collapsed = True
            parts.append(f"{name}: collapsed to one prototype (batch-mean entropy {hb:.2f}·ln K ≤ {single})")
        else:
            parts.append(f"{name}: not collapsed (entropy {h:.2f}·ln K, batch-mean {hb:.2f}·ln K)")
    return collapsed, "; ".join(parts) or "no health figures logged"


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """√D · mean_d std_b(normalize(z)[:, d]): ≈1 for well-spread embeddings, → 0 on collapse."""
    z = torch.nn.functional.normalize(z.float(), dim=-1)
    return float(z.std(0).mean()) * math.sqrt(z.shape[-1])


@torch.no_grad()
def batch_std(x: torch.Tensor) -> float:
    """Std across the batch (dim 0) of every other coordinate, averaged: → 0 when every image
    gets the same features (regression-target collapse: data2vec, I-JEPA)."""
    x = x.float()
    return float(x.std(0).mean()) if x.shape[0] > 1 else 0.0


def std_verdict(health: dict, name: str, floor: float, *, initial: float | None = None,
                ratio: float = 0.25) -> tuple[bool, str]:
    """Collapsed if the final ``health[name]`` (a :func:`batch_std`) is at or below ``floor``, or,
    given its ``initial`` value (first step), has fallen to ``ratio``·initial or less: the
    features are losing their dependence on the image (a slow collapse)."""
    v = health.get(name)
    if v is None:
        return False, f"{name} not logged"
    if v <= floor:
        return True, f"collapsed: {name} {v:.3f} <= {floor} (features no longer depend on the image)"
    if initial is not None and initial > 0 and v <= ratio * initial:
        return True, (f"collapsing: {name} fell to {v:.3f} from {initial:.3f} at step 1 (<= {ratio:g}x; features "
                      f"lose their dependence on the image)")
    tail = f" ({v / initial:.2f}x its step-1 value {initial:.3f})" if initial else ""
    return False, f"not collapsed: {name} {v:.3f} > {floor}{tail}"


class AttentionDistance:
    """Per layer, the attention-weighted query–key distance (pixels) of a timm ViT's forward,
    from the ``qkv`` outputs captured by forward hooks (no extra pass over the blocks)."""

    def __init__(self, vit):
        self.vit, self.qkv = vit, [None] * len(vit.blocks)
        grid = vit.patch_embed.grid_size
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        pos = torch.stack([rows.flatten(), cols.flatten()], 1).float()
        self.dist = torch.cdist(pos, pos) * vit.patch_embed.patch_size[0]
        for i, blk in enumerate(vit.blocks):
            blk.attn.qkv.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def keep(module, inputs, output):
            self.qkv[i] = output.detach()
        return keep

    @torch.no_grad()
    def read(self, rows: int) -> dict:
        """Distances of the last forward's first ``rows`` sequences; clears the captures."""
        out, p = {}, self.vit.num_prefix_tokens
        for i, (qkv, blk) in enumerate(zip(self.qkv, self.vit.blocks)):
            if qkv is None:
                continue
            attn = blk.attn
            b, n, _ = qkv[:rows].shape
            q, k, _ = qkv[:rows].float().reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            probs = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)[:, :, p:, p:]
            probs = probs / probs.sum(-1, keepdim=True)                 # patch keys only, renormalised
            out[f"attn_dist_{i}"] = float((probs * self.dist.to(probs.device)).sum(-1).mean())
            self.qkv[i] = None
        return out
