"""Eager reference of ``relation_loss`` (RelViT, Camporese et al. 2021, arXiv:2107.00103).

Two layers:

* a port of RelViT's own code (``guglielmocamporese/relvit``): the label / target matrices of
  ``datasets/encode_locations.py`` (``create_connectivity_matrix``, ``create_dist_matrix``,
  ``create_angle_matrix``, ``SSLSignal``) and the heads and losses of ``models/relvit.py``
  (``MultiHeadAttentionScores``: one ``q_lin`` / ``k_lin`` pair per class, scores
  ``q·kᵀ/√d_head`` stacked to (B, C, N, N); ``F.cross_entropy`` against the (B, N, N)
  relation labels, ``F.mse_loss`` for distances and angles; ``utils.cross_entropy`` for label
  smoothing). ``relvit_losses`` is that code end to end: the oracle of the tests and the
  ``relvit`` provider of the benchmark.
* ``relation_loss``: the same losses with the op's signature, in plain PyTorch (materialises the
  (B, C, N, N) logits and the (B, N, N) labels; the ``reference`` backend and benchmark provider).

Label of the pair (i, j), tokens at grid cells (r_i, c_i), (r_j, c_j) (RelViT's matrix after its
transpose): ``3·(sgn(r_i − r_j) + 1) + (sgn(c_i − c_j) + 1)``, i.e. where token i lies relative to
token j: 0 = LU (i left of and above j), 1 = CU, 2 = RU, 3 = LC, 4 = CC (same cell), 5 = RC, 6 = LD,
7 = CD, 8 = RD.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------
# RelViT datasets/encode_locations.py, ported (numpy / torch as there)
# ---------------------------------------------------------------------------------------
def relvit_label_matrix(num_patches: int) -> np.ndarray:
    """``create_label_matrix``: the (2s−1, 2s−1) relation classes around a centre patch."""
    labels_matrix = np.arange(9).reshape(3, 3)
    side = 2 * int(math.sqrt(num_patches)) - 1
    cs = (side - 1) // 2
    cor, cen = np.ones([cs, cs], dtype=np.int64), np.ones([1, 1], dtype=np.int64)
    ver, hor = np.ones([cs, 1], dtype=np.int64), np.ones([1, cs], dtype=np.int64)
    l = labels_matrix
    return np.concatenate([
        np.concatenate([l[0, 0] * cor, l[0, 1] * ver, l[0, 2] * cor], 1),
        np.concatenate([l[1, 0] * hor, l[1, 1] * cen, l[1, 2] * hor], 1),
        np.concatenate([l[2, 0] * cor, l[2, 1] * ver, l[2, 2] * cor], 1),
    ], 0)


def relvit_connectivity_matrix(side: int) -> torch.Tensor:
    """``create_connectivity_matrix(arange(side²))``: (G, G) int64 relation labels, G = side²."""
    n = side * side
    labels_matrix = relvit_label_matrix(n)
    conn = -1 * np.ones([n, n], dtype=labels_matrix.dtype)
    center = (labels_matrix.shape[0] - 1) // 2
    for i in range(side):
        for j in range(side):
            conn[i * side + j, :] = labels_matrix[center - i: center - i + side, center - j: center - j + side].reshape(-1)
    return torch.from_numpy(conn.T.copy()).to(torch.int64)


def relvit_dist_matrix(side: int, norm: int = 2, vmin: float = -1, vmax: float = 1) -> torch.Tensor:
    """``create_dist_matrix``: (G, G) fp32 Euclidean cell distances scaled to [vmin, vmax]."""
    x = torch.arange(side).unsqueeze(0).repeat(side, 1)
    y = torch.arange(side).unsqueeze(1).repeat(1, side)
    p = torch.stack([x, y], -1).to(torch.float32).view(-1, 2)
    d = torch.cdist(p.unsqueeze(0), p.unsqueeze(0), p=norm).squeeze(0)
    return d / d.max() * (vmax - vmin) + vmin


def relvit_angle_matrix_loop(side: int, vmin: float = -1, vmax: float = 1) -> torch.Tensor:
    """``create_angle_matrix`` line by line (a Python loop over the G² pairs: small sides only)."""
    x = torch.arange(side).unsqueeze(0).repeat(side, 1) + side / 2
    y = torch.arange(side).unsqueeze(1).repeat(1, side) + side / 2
    p = torch.stack([x, y], -1).to(torch.float32).view(-1, 2)
    a = np.zeros((side * side, side * side), dtype=np.float32)
    for i, p_i in enumerate(p):
        for j, p_j in enumerate(p):
            if i != j:
                a[i, j] = torch.acos((p_i * p_j).sum() / (torch.norm(p_i) * torch.norm(p_j) + 1e-4)) / np.pi
    a = a / a.max() * (vmax - vmin) + vmin
    return torch.from_numpy(a)


def relvit_angle_matrix(side: int, vmin: float = -1, vmax: float = 1) -> torch.Tensor:
    """``create_angle_matrix``, vectorised (same fp32 operations per pair): the angle between the
    cells' position vectors (x + side/2, y + side/2) over π, 0 on the diagonal, scaled to [vmin, vmax]."""
    x = torch.arange(side).unsqueeze(0).repeat(side, 1) + side / 2
    y = torch.arange(side).unsqueeze(1).repeat(1, side) + side / 2
    p = torch.stack([x, y], -1).to(torch.float32).view(-1, 2)
    nrm = torch.stack([torch.norm(pi) for pi in p])
    num = (p[:, None, :] * p[None, :, :]).sum(-1)
    a = torch.acos(num / (nrm[:, None] * nrm[None, :] + 1e-4)) / np.pi
    a.fill_diagonal_(0.0)
    a = a.numpy().astype(np.float32)
    a = a / a.max() * (vmax - vmin) + vmin
    return torch.from_numpy(a)


def relvit_ssl_signal(perm: torch.Tensor, side: int, use_distances=True, use_angles=True) -> dict:
    """``SSLSignal(patches)`` for one image whose token t is the original patch ``perm[t]``
    (``ShuffleDataset``: ``x = x[:, idx_shuffle]``): relations (N, N), distances, angles, abs_positions."""
    out = {"relations": relvit_connectivity_matrix(side)[perm][:, perm], "abs_positions": torch.arange(side * side)[perm]}
    if use_distances:
        out["distances"] = relvit_dist_matrix(side)[perm][:, perm]
    if use_angles:
        out["angles"] = relvit_angle_matrix(side)[perm][:, perm]
    return out


# ---------------------------------------------------------------------------------------
# RelViT models/relvit.py, ported: heads and losses
# ---------------------------------------------------------------------------------------
def relvit_head_scores(z: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """``MultiHeadAttentionScores(z)`` with head h's ``q_lin.weight = wq[h]``, ``k_lin.weight = wk[h]``
    ((d_head, D) each): ``stack_h bmm(z wq[h]ᵀ, (z wk[h]ᵀ)ᵀ) / √d_head`` → (B, H, N, N)."""
    out = []
    for h in range(wq.shape[0]):
        q, k = F.linear(z, wq[h]), F.linear(z, wk[h])
        out.append(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(k.shape[2]))
    return torch.stack(out, 1)


def relvit_cross_entropy(logits, labels, smooth=0.0):
    """``utils.cross_entropy`` (label smoothing as RelViT writes it; its dropout left out: random)."""
    if smooth == 0.0:
        return F.cross_entropy(logits, labels)
    logprobs = F.log_softmax(logits, dim=1)
    nll = -logprobs.gather(dim=1, index=labels.unsqueeze(1)).squeeze(1)
    return ((1.0 - smooth) * nll + smooth * (-logprobs.mean(dim=1))).mean()


def relvit_losses(z, wq, wk, perms, side, dist_w=None, angle_w=None, smooth=0.0) -> dict:
    """RelViT's ``training_step`` losses for patch tokens ``z`` (B, N, D) of images whose patches were
    shuffled by ``perms`` (B, N): labels from ``SSLSignal`` per image, stacked as the dataloader does."""
    sig = [relvit_ssl_signal(p, side, dist_w is not None, angle_w is not None) for p in perms]
    rel_logits = relvit_head_scores(z, wq, wk)
    y_rel = torch.stack([s["relations"] for s in sig]).to(z.device)
    out = {"rel": relvit_cross_entropy(rel_logits, y_rel, smooth),
           "acc": (F.softmax(rel_logits, 1).argmax(1) == y_rel).float().mean()}
    if dist_w is not None:
        y = torch.stack([s["distances"] for s in sig]).to(z.device).unsqueeze(1)
        out["dist"] = F.mse_loss(relvit_head_scores(z, *dist_w), y.to(z.dtype))
    if angle_w is not None:
        y = torch.stack([s["angles"] for s in sig]).to(z.device).unsqueeze(1)
        out["angle"] = F.mse_loss(relvit_head_scores(z, *angle_w), y.to(z.dtype))
    return out


# ---------------------------------------------------------------------------------------
# The op's reference (its signature; eager, materialises logits and labels)
# ---------------------------------------------------------------------------------------
class RelationLosses(NamedTuple):
    """``loss`` = relation + distance + angle (the terms given), each a 0-dim tensor (None if off);
    ``accuracy`` = fraction of pairs whose argmax class is the label (no gradient)."""
    loss: torch.Tensor
    relation: torch.Tensor
    distance: Optional[torch.Tensor]
    angle: Optional[torch.Tensor]
    accuracy: torch.Tensor


def relation_labels(positions: torch.Tensor, grid_w: int) -> torch.Tensor:
    """(B, N, N) int64 labels from the tokens' grid cells (row-major index, grid width ``grid_w``)."""
    r, c = positions // grid_w, positions % grid_w
    dr = torch.sign(r[:, :, None] - r[:, None, :]) + 1
    dc = torch.sign(c[:, :, None] - c[:, None, :]) + 1
    return 3 * dr + dc


def pair_targets(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, N, N) ``table[pos_i, pos_j]``."""
    return table[positions[:, :, None], positions[:, None, :]]


def relation_loss(tokens, wq, wk, positions=None, *, grid=None, distance=None, angle=None, label_smoothing=0.0,
                  num_prefix_tokens=0, tables=None) -> RelationLosses:
    """Same arguments and result as :func:`sslkern.relation_loss`; ``tables`` = (distance table, angle
    table) of shape (G, G) (built by the caller for the grid; default: RelViT's for a square grid)."""
    z = tokens[:, num_prefix_tokens:]
    B, N, _ = z.shape
    if positions is None:
        positions = torch.arange(N, device=z.device).expand(B, N)
    gh, gw = (grid, grid) if isinstance(grid, int) else (grid or (int(round(math.sqrt(N))),) * 2)
    acc_t = torch.float64 if z.dtype == torch.float64 else torch.float32
    logits = relvit_head_scores(z.to(acc_t), wq.to(acc_t), wk.to(acc_t))
    y = relation_labels(positions.long(), gw)
    rel = relvit_cross_entropy(logits, y, label_smoothing)
    acc = (logits.argmax(1) == y).to(acc_t).mean()
    total, out = rel, {}
    for name, w, idx in (("distance", distance, 0), ("angle", angle, 1)):
        if w is None:
            out[name] = None
            continue
        table = tables[idx] if tables is not None else (relvit_dist_matrix if idx == 0 else relvit_angle_matrix)(gw)
        t = pair_targets(table.to(z.device, acc_t), positions.long())
        wq_r, wk_r = (x.to(acc_t).reshape(1, -1, x.shape[-1]) for x in w)
        out[name] = F.mse_loss(relvit_head_scores(z.to(acc_t), wq_r, wk_r)[:, 0], t)
        total = total + out[name]
    return RelationLosses(total, rel, out["distance"], out["angle"], acc.detach())
