"""Projection heads of the self-distillation methods (dino ``vision_transformer.py: DINOHead``).

``DINOHead``: MLP (optional BatchNorm, GELU) → L2-normalised bottleneck → weight-normalised
linear layer onto K prototypes. Parameter names follow dino (``mlp.*``,
``last_layer.weight_g``, ``last_layer.weight_v``), so dino checkpoints load with
``strict=True``. BatchNorm layers are :class:`GlobalBatchNorm1d`: under torch.distributed
their statistics are those of the global batch (dino converts to SyncBatchNorm, which has
no CPU implementation), so a run on N ranks computes the same step as one process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics span all ranks (differentiable all-reduce).

    Single process: exactly ``nn.BatchNorm1d``. Under torch.distributed: the mean and the
    (biased) variance of the global batch, computed in two all-reduces, gradients flowing
    through both; running statistics as BatchNorm (unbiased variance).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        # the global row count: ranks may hold different numbers of rows (iBOT's patch head
        # sees each rank's masked tokens)
        count = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        n = int(count.item())
        mean = all_reduce(x.sum(0)) / n
        var = all_reduce(((x - mean) ** 2).sum(0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


class WeightNormLinear(nn.Module):
    """``nn.utils.weight_norm(nn.Linear(in, out, bias=False))``: ``W = g · v / ‖v‖`` (rows).

    ``fix_gain=True`` (dino ``norm_last_layer``) keeps ``g = 1`` frozen, so every prototype
    has unit norm and the logits are cosine similarities.
    """

    def __init__(self, in_dim: int, out_dim: int, *, fix_gain: bool = True):
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(v, a=5 ** 0.5)  # nn.Linear's default init
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_gain)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def layer_parts(layer: nn.Module):
    """(weight, gain) of a prototype layer for :func:`sslkern.prototype_loss`:
    ``(weight_v, weight_g)`` of a :class:`WeightNormLinear` (or of torch's ``weight_norm``
    forms), ``(weight, None)`` of a bias-free ``nn.Linear``."""
    if isinstance(layer, WeightNormLinear) or (hasattr(layer, "weight_v") and hasattr(layer, "weight_g")):
        return layer.weight_v, layer.weight_g
    p = getattr(layer, "parametrizations", None)
    if p is not None and hasattr(p, "weight") and len(p.weight.original) == 2:  # parametrizations.weight_norm
        return p.weight.original1, p.weight.original0
    if isinstance(layer, nn.Linear) and layer.bias is None:
        return layer.weight, None
    raise TypeError(f"sslkern.nn: prototype layer expected a WeightNormLinear, a weight_norm Linear or a bias-free "
                    f"nn.Linear, got {type(layer).__name__}")


class DINOHead(nn.Module):
    """dino ``DINOHead(in_dim, out_dim, use_bn, norm_last_layer, nlayers, hidden_dim, bottleneck_dim)``.

    ``forward(x)``: (R, in_dim) → (R, out_dim) prototype logits;
    ``forward(x, return_bottleneck=True)`` also returns the L2-normalised bottleneck features.
    The loss without the logits: ``sslkern.nn.DINOLoss(...)(head.bottleneck(x), teacher.bottleneck(xt),
    epoch, head.last_layer, teacher.last_layer)`` (or :func:`sslkern.prototype_loss`).
    """

    def __init__(self, in_dim: int, out_dim: int, *, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(GlobalBatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck features (what the last layer reads)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor, return_bottleneck: bool = False):
        z = self.bottleneck(x)
        logits = self.last_layer(z)
        return (logits, z) if return_bottleneck else logits


class MultiCropWrapper(nn.Module):
    """dino ``MultiCropWrapper``: one backbone pass per crop resolution, then the head on all crops.

    ``backbone``: a timm ``VisionTransformer`` (``dynamic_img_size=True`` for several sizes);
    ``pool``: ``"mean"`` (patch tokens after the final norm, as sslkern's evaluation) or
    ``"cls"``. ``forward(crops)``: a list of (B, C, S, S) crops → (len(crops)·B, K) logits,
    crop-major (what ``dino_loss`` expects).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"sslkern.nn.MultiCropWrapper: pool expected 'mean' or 'cls', got {pool!r}")
        self.backbone, self.head, self.pool = backbone, head, pool

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.backbone.num_prefix_tokens:].mean(1) if self.pool == "mean" else tokens[:, 0]

    def features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        out, i = [], 0
        while i < len(crops):  # consecutive crops of one size go through the backbone together
            j = i + 1
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            out.append(self.pooled(self.backbone.forward_features(torch.cat(crops[i:j]))))
            i = j
        return torch.cat(out)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(crops))
