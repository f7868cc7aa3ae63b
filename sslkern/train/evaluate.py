"""Frozen-encoder evaluation: weighted kNN (dino ``eval_knn.py``) and a linear probe.

Features: the encoder's final LayerNorm output, mean over the patch tokens (prefix tokens
such as CLS excluded) — better than CLS for small runs. Both splits are streamed: images are
decoded batch by batch (in worker processes for datasets on disk) and rendered as one
centre crop on the device; memory holds the features only, never the images.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class SequentialOrder:
    """Given images of a source in chunks of ``batch_size`` (the last one partial): the
    evaluation's counterpart of :class:`sslkern.data.BatchOrder`, for :class:`sslkern.data.TrainLoader`."""

    def __init__(self, indices, batch_size: int):
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.batch_size = batch_size
        self.steps = math.ceil(len(self.indices) / batch_size)

    def rank_batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        return self.indices[step * self.batch_size:(step + 1) * self.batch_size]

    def replacement(self, step: int, row: int, tries: int) -> int:
        return int(self.indices[(step * self.batch_size + row + tries) % len(self.indices)])


def centre_crop_params(hw: torch.Tensor, crop: float):
    """View parameters of a centred square of side ``crop``·min(H, W), nothing else applied."""
    from sslkern.views import ViewParams

    hw = hw.to(torch.float32)
    side = crop * hw.min(dim=1).values
    v = hw.shape[0]
    box = torch.stack([(hw[:, 0] - side) / 2, (hw[:, 1] - side) / 2, side, side], dim=1)
    return ViewParams(src=torch.arange(v), box=box, angle=torch.zeros(v), flip=torch.zeros(v, dtype=torch.bool),
                      jitter=torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(v, 1),
                      jitter_order=torch.arange(4).repeat(v, 1), gray=torch.zeros(v, dtype=torch.bool),
                      blur_sigma=torch.zeros(v), solarize=torch.zeros(v, dtype=torch.bool))


def eval_batches(source, *, image_size: int, mean, std, crop: float = 1.0, indices=None, batch_size: int = 256,
                 workers: int = 0, min_side: int | None = None, device="cpu"):
    """(views (b, C, S, S), labels (b,)) of ``source`` (or its ``indices``), in order: the centre
    crop of each image resized to ``image_size`` and normalised, streamed batch by batch."""
    import sslkern
    from sslkern.data import TrainLoader

    order = SequentialOrder(range(len(source)) if indices is None else indices, batch_size)
    loader = TrainLoader(source, order, start=0, stop=order.steps, workers=workers, min_side=min_side, device=device)
    for batch in loader:
        params = centre_crop_params(batch.hw, crop).to(device)
        yield sslkern.render_views(batch.images(), params, image_size, mean=mean, std=std), batch.labels


def render_images(data, image_size: int, max_images: int, seed: int = 0, **kw) -> torch.Tensor:
    """Up to ``max_images`` training images (a seeded subset if there are more) as evaluation
    views ``(n, C, S, S)``: for fitting what needs pixels up front (BEiT's tokenizer)."""
    n = len(data.train)
    idx = torch.arange(n) if n <= max_images else \
        torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
    return torch.cat([x for x, _ in eval_batches(data.train, image_size=image_size, mean=data.mean, std=data.std,
                                                 crop=data.eval_crop, indices=idx, **kw)])


@torch.no_grad()
def encoder_features(model, source, *, image_size: int, mean, std, crop: float = 1.0, indices=None,
                     batch_size: int = 256, workers: int = 0,
                     min_side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) fp32 on the CPU, labels (N,)) of every image of ``source``: mean of the
    patch tokens after the final norm of a timm ``VisionTransformer``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    for x, y in eval_batches(source, image_size=image_size, mean=mean, std=std, crop=crop, indices=indices,
                             batch_size=batch_size, workers=workers, min_side=min_side, device=device):
        tokens = model.forward_features(x)
        feats.append(tokens[:, model.num_prefix_tokens:].mean(dim=1).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier of DINO ``eval_knn.py``.

    Features are L2-normalized; the k nearest training samples by cosine similarity vote
    for their label with weight ``exp(sim / temperature)``.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    correct = 0
    for i in range(0, test.shape[0], chunk):
        sim = test[i:i + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return 100.0 * correct / test.shape[0]


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                          test_labels: torch.Tensor, *, C: float = 1.0, max_iter: int = 2000) -> float:
    """Top-1 accuracy (%) of StandardScaler + logistic regression (scikit-learn) on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    # BLAS threads as many as torch's: on a shared 2-core machine extra BLAS threads spin (20 s vs 1 s)
    with threadpool_limits(limits=torch.get_num_threads()):
        clf.fit(train_features.numpy().astype(np.float64), train_labels.numpy())
        return 100.0 * float(clf.score(test_features.numpy().astype(np.float64), test_labels.numpy()))


def _subset(n: int, max_images: int, seed: int):
    if not max_images or n <= max_images:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values


def evaluate_encoder(model, data, *, image_size: int, knn_k: int = 20, probe: bool = True, workers: int = 0,
                     min_side: int | None = None, max_images: int = 0, prefetch: int = 2) -> dict[str, float]:
    """kNN (and probe) accuracy of a frozen encoder on ``data`` (a :class:`sslkern.data.Dataset`),
    on at most ``max_images`` train and test images each (a fixed subset; 0 = all)."""
    kw = dict(image_size=image_size, mean=data.mean, std=data.std, crop=data.eval_crop, workers=workers,
              min_side=min_side)
    ftr, ytr = encoder_features(model, data.train, indices=_subset(len(data.train), max_images, 0), **kw)
    fte, yte = encoder_features(model, data.test, indices=_subset(len(data.test), max_images, 1), **kw)
    n = len(data.classes)
    out = {"knn": knn_accuracy(ftr, ytr, fte, yte, k=knn_k, num_classes=n)}
    if probe:
        out["probe"] = linear_probe_accuracy(ftr, ytr, fte, yte)
    return out
