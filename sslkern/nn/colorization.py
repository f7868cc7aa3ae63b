"""Soft-target cross-entropy with class rebalancing in the gradient only (colorization).

richzhang/colorization ``models/colorization_train_val_v2.prototxt``: the 313 logits pass
``ClassRebalanceMultLayer`` (identity forward; backward multiplies the gradient by the
per-pixel ``prior_boost_nongray``) into ``SoftmaxCrossEntropyLoss`` against the soft-encoded
targets. So the logged loss is the plain soft cross-entropy, and each pixel's gradient is
scaled by its rebalancing weight (0 for grey images).
"""
from __future__ import annotations

import torch

from .._checks import check_tensor, fail


class _RebalancedSoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, weights, rebalance):
        z = logits.float()
        lse = torch.logsumexp(z, dim=-1)                                   # (N,)
        picked = (weights * z.gather(-1, ids)).sum(-1)                     # Σ_k w_k z_{id_k}
        per_pixel = lse * weights.sum(-1) - picked                         # −Σ_k w_k log softmax(z)_{id_k}
        ctx.save_for_backward(logits, ids, weights, rebalance, lse)
        return per_pixel.mean()

    @staticmethod
    def backward(ctx, grad):
        logits, ids, weights, rebalance, lse = ctx.saved_tensors
        z = logits.float()
        g = torch.exp(z - lse[:, None]) * weights.sum(-1, keepdim=True)   # softmax · Σw
        g.scatter_add_(-1, ids, -weights)
        coef = rebalance.float() * (grad.float() / z.shape[0])             # gradient-only weight, fp32
        return (g * coef[:, None]).to(logits.dtype), None, None, None


def rebalanced_soft_cross_entropy(logits: torch.Tensor, bin_ids: torch.Tensor, weights: torch.Tensor,
                                  rebalance: torch.Tensor) -> torch.Tensor:
    r"""``mean_pixels(−Σ_k w_k · log softmax(logits)[id_k])``; gradient of pixel i scaled by ``rebalance[i]``.

    Args:
        logits: (..., Q) per-pixel logits over the bins (any float dtype; computed in fp32).
        bin_ids: (..., K) integer bin ids (``colorization_targets(...).bin_ids``), same leading shape.
        weights: (..., K) soft-encoding weights.
        rebalance: (...) per-pixel gradient weight (``colorization_targets(...).rebalance``).

    Returns the 0-dim fp32 mean over pixels of the UNWEIGHTED soft cross-entropy (the value the
    released net logs); backward gives ``rebalance_i · (softmax(z_i)·Σ_k w_ik − t_i) / N``.
    The dense (..., Q) target is never formed (the K weights are scattered into the gradient).
    """
    op = "rebalanced_soft_cross_entropy"
    check_tensor(op, "logits", logits)
    if not logits.is_floating_point():
        fail(op, f"logits expected a float tensor, got {logits.dtype}", TypeError)
    lead = tuple(logits.shape[:-1])
    check_tensor(op, "bin_ids", bin_ids, dtypes=(torch.int16, torch.int32, torch.int64), shape=(*lead, None))
    check_tensor(op, "weights", weights, dtypes=(torch.float32, torch.float64), shape=(*lead, bin_ids.shape[-1]))
    check_tensor(op, "rebalance", rebalance, dtypes=(torch.float32, torch.float64), shape=lead)
    Q = logits.shape[-1]
    return _RebalancedSoftCrossEntropy.apply(logits.reshape(-1, Q), bin_ids.reshape(-1, bin_ids.shape[-1]).long(),
                                             weights.reshape(-1, weights.shape[-1]).float(),
                                             rebalance.reshape(-1).detach())
