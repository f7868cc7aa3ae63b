"""Eager reference for ``layer_average_targets``.

Follows fairseq ``examples/data2vec/models/data2vec2.py: Data2VecMultiModel.make_targets``:
per-layer ``F.instance_norm`` on (B, D, T) in fp32 (or a parameter-free ``F.layer_norm``
over D, the data2vec v1 path), a running sum in fp32 divided by K, then an optional
parameter-free layer norm over D (or instance norm over tokens) of the average.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _norm(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    if kind == "instance":
        return F.instance_norm(x.float().transpose(1, 2), eps=eps).transpose(1, 2)
    if kind == "layer":
        return F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return x.float()


@torch.no_grad()
def layer_average_targets(layers, layer_norm: str = "instance", final_norm: str = "layer",
                          eps: float = 1e-5) -> torch.Tensor:
    if isinstance(layers, torch.Tensor):
        layers = list(layers.unbind(0))
    normed = [_norm(y, layer_norm, eps) for y in layers]
    y = normed[0].float().clone()
    for t in normed[1:]:
        y.add_(t)
    y.div_(len(normed))
    if final_norm != "none":
        y = _norm(y, final_norm, eps)
    return y.contiguous()
