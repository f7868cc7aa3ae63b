"""A small visual tokenizer fitted on the training set: k-means on patch pixels.

BEiT (Bao et al. 2021) predicts the discrete tokens that a pretrained tokenizer (DALL-E's
dVAE, 8,192 codes, one token per 16x16 patch) gives each patch. That tokenizer cannot be
downloaded here, so the recipes fit their own: **k-means on the pixels of the training
patches** (one token per ViT patch, ``K`` centroids, nearest centroid = token).

Why k-means and not a small VQ model: a VQ-VAE's codebook minimises the same quantisation
error that Lloyd's algorithm does, only through an encoder and by SGD. On small patches
(4x4 grey pixels on the default data) an encoder adds little, k-means is deterministic, has
no hyper-parameters beyond ``K`` and fits in well under a second; a VQ model would need its
own training run, dead-code handling and tuning. The cost: they quantise raw pixels, not
learned features. ``context`` narrows the other gap: DALL-E's encoder sees a neighbourhood,
and with ``context = c`` each token is the nearest centroid of the zero-padded window of
(2c + 1) x (2c + 1) patches centred on its patch (``patch_windows``), so a token says what
the patch is part of, not only its pixels. ``context = 0`` is the patch alone.

``PatchKMeansTokenizer`` holds the codebook as a buffer (so it is part of a recipe's state
dict), ``fit`` is seeded by a ``torch.Generator`` (k-means++ seeding, then Lloyd steps; a
cluster left empty keeps its centroid), ``save`` / ``load`` write a safetensors file with its
settings in the metadata, and ``perplexity`` measures codebook usage (exp of the entropy of
the token histogram: K when every code is equally used, 1 when one code takes everything).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt

__all__ = ["PatchKMeansTokenizer", "patchify", "patch_windows", "perplexity"]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, N, p·p·C): patches row-major (the ViT's token order), pixels (row, col, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: image size {h}x{w} expected a multiple of patch_size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def patch_windows(images: torch.Tensor, patch_size: int, context: int = 0) -> torch.Tensor:
    """(B, C, H, W) → (B, N, C·w·w): for each patch (row-major), the pixels of the window of
    ``w = (2·context + 1)·patch_size`` centred on it (zero outside the image), channel-major.

    ``context = 0`` is :func:`patchify` (the patch itself, pixels (row, col, channel)).
    """
    if context < 0:
        raise ValueError(f"patch_windows: context expected >= 0, got {context}")
    if context == 0:
        return patchify(images, patch_size)
    h, w, p = images.shape[2], images.shape[3], patch_size
    if h % p or w % p:
        raise ValueError(f"patch_windows: image size {h}x{w} expected a multiple of patch_size {p}")
    k = (2 * context + 1) * p
    return F.unfold(images, kernel_size=k, padding=context * p, stride=p).transpose(1, 2)


@torch.no_grad()
def perplexity(ids: torch.Tensor, num_codes: int) -> float:
    """exp(entropy) of the histogram of ``ids``: how many codes are effectively in use."""
    counts = torch.bincount(ids.flatten().to(torch.int64), minlength=num_codes).double()
    p = counts / counts.sum().clamp(min=1)
    h = -(p * p.clamp(min=1e-30).log()).sum()
    return float(h.exp())


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(M, P), (K, P) → (M, K) squared Euclidean distances (clamped at 0)."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)).clamp(min=0)


class PatchKMeansTokenizer(nn.Module):
    """Nearest-centroid tokens of image patches; ``forward(images) → (B, N) int64``."""

    def __init__(self, num_codes: int, patch_size: int, in_chans: int, context: int = 0):
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"PatchKMeansTokenizer: num_codes expected >= 2, got {num_codes}")
        if patch_size < 1 or in_chans < 1:
            raise ValueError(f"PatchKMeansTokenizer: patch_size and in_chans expected positive, got {patch_size}, {in_chans}")
        if context < 0:
            raise ValueError(f"PatchKMeansTokenizer: context expected >= 0 (patches of neighbourhood per side), got {context}")
        self.num_codes, self.patch_size, self.in_chans, self.context = num_codes, patch_size, in_chans, context
        side = (2 * context + 1) * patch_size
        self.register_buffer("codebook", torch.zeros(num_codes, side * side * in_chans))

    @property
    def settings(self) -> dict:
        return {"num_codes": self.num_codes, "patch_size": self.patch_size, "in_chans": self.in_chans,
                "context": self.context}

    def windows(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, N, codebook dim): what each token quantises (the patch, or its window)."""
        return patch_windows(images, self.patch_size, self.context)

    @torch.no_grad()
    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., P) patch pixels → (...) token ids."""
        flat = patches.reshape(-1, patches.shape[-1]).to(self.codebook.dtype)
        return _sq_dist(flat, self.codebook).argmin(1).reshape(patches.shape[:-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"PatchKMeansTokenizer: images expected (B, {self.in_chans}, H, W), got {tuple(images.shape)}")
        return self.encode_patches(self.windows(images))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, generator: torch.Generator, *, iters: int = 30,
            max_patches: int = 50_000) -> dict:
        """k-means++ seeding then ``iters`` Lloyd steps on the patches of ``images`` (B, C, H, W).

        At most ``max_patches`` patches (a seeded random subset) are used. Returns
        ``{"inertia": mean squared distance to the nearest centroid, "perplexity": codebook
        usage on the fitted patches, "patches": count}``.
        """
        x = self.windows(images.float()).reshape(-1, self.codebook.shape[1]).to(self.codebook.device)
        if x.shape[0] > max_patches:
            x = x[torch.randperm(x.shape[0], generator=generator, device=generator.device)[:max_patches].to(x.device)]
        m, k = x.shape[0], self.num_codes
        if m < k:
            raise ValueError(f"PatchKMeansTokenizer.fit: {m} patches for {k} codes (expected at least as many patches)")
        rand = lambda *s: torch.rand(*s, generator=generator, device=generator.device, dtype=torch.float64).to(x.device)  # noqa: E731
        # k-means++ (Arthur & Vassilvitskii): next centroid drawn with probability ∝ squared distance
        centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
        centers[0] = x[int(rand(1) * m) % m]
        d2 = _sq_dist(x, centers[:1]).squeeze(1).double()
        for i in range(1, k):
            cdf = d2.cumsum(0)
            if float(cdf[-1]) <= 0:  # fewer distinct patches than codes: repeat a point
                j = int(rand(1) * m) % m
            else:
                j = int(torch.searchsorted(cdf, rand(1) * cdf[-1]).clamp(max=m - 1))
            centers[i] = x[j]
            d2 = torch.minimum(d2, _sq_dist(x, centers[i:i + 1]).squeeze(1).double())
        for _ in range(iters):  # Lloyd
            assign = _sq_dist(x, centers).argmin(1)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)
            nonempty = counts > 0
            new = torch.where(nonempty.unsqueeze(1), sums / counts.clamp(min=1).unsqueeze(1), centers)
            if torch.equal(new, centers):
                break
            centers = new
        self.codebook.copy_(centers)
        assign = _sq_dist(x, centers)
        inertia = float(assign.min(1).values.mean())
        return {"inertia": inertia, "perplexity": perplexity(assign.argmin(1), k), "patches": m}

    def save(self, path: str, **info) -> None:
        """Atomic safetensors file: the codebook, the settings and ``info`` in the metadata."""
        ckpt.save_tensors(path, {"codebook": self.codebook}, {**self.settings, **info})

    @classmethod
    def load(cls, path: str) -> tuple["PatchKMeansTokenizer", dict]:
        """(tokenizer, metadata) from a file written by :meth:`save`."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        tensors, meta = ckpt.load_tensors(path)
        if "codebook" not in tensors or not all(k in meta for k in ("num_codes", "patch_size", "in_chans")):
            raise ValueError(f"{path!r} is not a PatchKMeansTokenizer file (expected a codebook and its settings)")
        tok = cls(meta["num_codes"], meta["patch_size"], meta["in_chans"], meta.get("context", 0))
        if tuple(tensors["codebook"].shape) != tuple(tok.codebook.shape):
            raise ValueError(f"{path!r}: codebook shape {tuple(tensors['codebook'].shape)} does not match its settings {tok.settings}")
        tok.codebook.copy_(tensors["codebook"])
        return tok, meta
