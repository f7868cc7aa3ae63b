"""Frozen-encoder evaluation (SPEC section 6): weighted kNN and a linear probe.

Features follow CALIBRATION: the encoder's final LayerNorm output, mean over the patch
tokens (prefix tokens such as CLS excluded) — better than CLS for small runs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def vit_features(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean of the patch tokens after the final norm of a timm ``VisionTransformer``, (N, D) fp32."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = model.forward_features(images[i:i + batch_size].to(device))
        out.append(x[:, model.num_prefix_tokens:].mean(dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(out)


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


def evaluate_encoder(model, dataset, *, knn_k: int = 20, probe: bool = True) -> dict[str, float]:
    """kNN (and probe) accuracy of a frozen encoder on ``dataset`` (an ``ImageDataset``)."""
    ftr = vit_features(model, dataset.train_images)
    fte = vit_features(model, dataset.test_images)
    n = len(dataset.classes)
    out = {"knn": knn_accuracy(ftr, dataset.train_labels, fte, dataset.test_labels, k=knn_k, num_classes=n)}
    if probe:
        out["probe"] = linear_probe_accuracy(ftr, dataset.train_labels, fte, dataset.test_labels)
    return out
