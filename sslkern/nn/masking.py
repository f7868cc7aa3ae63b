"""Masked-token plumbing for timm ViTs: mask → gather (encoder input) → restore (decoder input).

``embed_visible`` runs a timm ``VisionTransformer``'s patch embedding and position
embedding on the kept patches only (one fused ``gather_tokens`` pass: the full
``x + pos_embed`` is never formed); ``sslkern.patch.forward_masked`` continues through the
blocks and the final norm (the encoder on the kept tokens). ``DecoderInput`` builds the MAE /
data2vec 2.0 decoder input with ``restore_tokens`` (mask token or per-slot noise, decoder
positions fused).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.tokens import gather_tokens, restore_tokens


def _prefix_tokens(vit: nn.Module, batch: int) -> list[torch.Tensor]:
    out = []
    if getattr(vit, "cls_token", None) is not None:
        out.append(vit.cls_token.expand(batch, -1, -1))
    if getattr(vit, "reg_token", None) is not None:
        out.append(vit.reg_token.expand(batch, -1, -1))
    return out


def embed_visible(vit: nn.Module, images: torch.Tensor, ids_keep: torch.Tensor, *,
                  mask_major: bool = False, check_indices: bool = True) -> torch.Tensor:
    """Patch-embed ``images`` and keep the tokens ``ids_keep``, with timm's position rules.

    Equals ``vit._pos_embed(vit.patch_embed(images))`` followed by keeping the prefix
    tokens and ``ids_keep`` of the patches (``(B, Nk)``, or ``(B, M, Nk)`` for a clone batch,
    rows image-major or ``mask_major``). Handles ``no_embed_class`` (prefix tokens get no
    position) and register tokens. Not for ``dynamic_img_size`` models.
    ``check_indices``: as :func:`sslkern.gather_tokens` (``False``: no host sync, for CUDA graphs).
    """
    if getattr(vit, "dynamic_img_size", False):
        raise ValueError("sslkern.nn.embed_visible: dynamic_img_size ViTs are not supported")
    patches = vit.patch_embed(images)                      # (B, N, D)
    B, N, D = patches.shape
    P = vit.num_prefix_tokens
    pos = vit.pos_embed
    shared = [t for t in (getattr(vit, "cls_token", None), getattr(vit, "reg_token", None)) if t is not None]
    if shared and pos is not None and not vit.no_embed_class:
        # prefix tokens and their positions fused into the gather (MAE's forward_encoder, no cat)
        pre = torch.cat([t.reshape(-1, D) for t in shared]) if len(shared) > 1 else shared[0].reshape(-1, D)
        return vit.pos_drop(gather_tokens(patches, ids_keep, pos_embed=pos.reshape(-1, D), prefix_tokens=pre,
                                          mask_major=mask_major, check_indices=check_indices))
    prefix = _prefix_tokens(vit, B)
    if pos is not None:
        pos = pos.reshape(-1, D)
        if vit.no_embed_class:
            patch_pos, prefix_pos = pos, None
        else:
            patch_pos, prefix_pos = pos[P:], pos[:P]
    else:
        patch_pos = prefix_pos = None
    vis = gather_tokens(patches, ids_keep, pos_embed=patch_pos, mask_major=mask_major, check_indices=check_indices)
    if not prefix:
        return vit.pos_drop(vis)
    pre = torch.cat(prefix, dim=1)                         # (B, P, D)
    if prefix_pos is not None:
        pre = pre + prefix_pos
    rows = vis.shape[0]
    if rows != B:  # clone batch: each image's prefix repeated for its M rows
        M = rows // B
        pre = pre.repeat(M, 1, 1) if mask_major else pre.repeat_interleave(M, dim=0)
    return vit.pos_drop(torch.cat([pre, vis], dim=1))


class DecoderInput(nn.Module):
    """Decoder input from encoder output: visible tokens back in place, removed slots filled.

    ``mode="mask_token"``: a learned ``(dim,)`` token (MAE, init N(0, 0.02²));
    ``mode="noise"``: fresh ``N(0, noise_std²)`` values per removed slot (data2vec 2.0
    ``Decoder2d`` input). ``pos_embed``: optional ``(1, P + N, dim)`` tensor (fixed sin-cos
    buffers or a parameter) added to every output token.

    ``forward(x_vis, ids_restore)`` with ``x_vis`` ``(B, P + Nk, dim)`` already projected to
    the decoder width returns ``(B, P + N, dim)``; ``check_indices=False`` skips the index
    check's host sync (CUDA graphs).
    """

    def __init__(self, dim: int, *, num_prefix_tokens: int = 1, mode: str = "mask_token", noise_std: float = 0.01,
                 pos_embed: torch.Tensor | None = None):
        super().__init__()
        if mode not in ("mask_token", "noise"):
            raise ValueError(f"sslkern.nn.DecoderInput: mode must be 'mask_token' or 'noise', got {mode!r}")
        self.mode = mode
        self.noise_std = noise_std
        self.num_prefix_tokens = num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(dim)) if mode == "mask_token" else None
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        if pos_embed is None or isinstance(pos_embed, nn.Parameter):
            self.pos_embed = pos_embed
        else:
            self.register_buffer("pos_embed", pos_embed, persistent=False)

    def forward(self, x_vis: torch.Tensor, ids_restore: torch.Tensor,
                generator: torch.Generator | None = None, check_indices: bool = True) -> torch.Tensor:
        fill = None
        if self.mode == "noise":
            B, N, D = x_vis.shape[0], ids_restore.shape[1], x_vis.shape[2]
            fill = torch.randn(B, N, D, device=x_vis.device, dtype=x_vis.dtype, generator=generator) * self.noise_std
        return restore_tokens(x_vis, ids_restore, mask_token=self.mask_token, fill=fill, pos_embed=self.pos_embed,
                              num_prefix_tokens=self.num_prefix_tokens, check_indices=check_indices)
