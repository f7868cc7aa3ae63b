"""Masked-token plumbing for timm ViTs: mask → gather (encoder input) → restore (decoder input).

``embed_visible`` runs a timm ``VisionTransformer``'s patch embedding and position
embedding on the kept patches only (one fused ``gather_tokens`` pass: the full
``x + pos_embed`` is never formed); ``sslkern.patch.forward_masked`` continues through the
blocks and the final norm (the encoder on the kept tokens). ``DecoderInput`` builds the MAE /
data2vec 2.0 decoder input with ``restore_tokens`` (mask token or per-slot noise, decoder
positions fused).

``encode_with_mask_token`` is the other way to mask (BEiT, iBOT / DINOv2, data2vec v1, MaskFeat,
SimMIM): every patch stays in the sequence and masked ones get a learned token; and
``block_outputs`` returns a teacher's intermediate block outputs (data2vec targets).
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


def encode_with_mask_token(vit: nn.Module, images: torch.Tensor, mask: torch.Tensor | None,
                           mask_token: torch.Tensor) -> torch.Tensor:
    """``vit.forward_features`` with the masked patches' embeddings replaced by ``mask_token``.

    ``vit.patch_embed(images)``; patches where ``mask`` (``(B, N)`` bool, True = masked) is set
    become ``mask_token`` (a ``(D,)`` parameter of the caller); then timm's position embedding,
    prefix tokens, blocks and final norm: ``(B, P + N, D)`` (dinov2
    ``prepare_tokens_with_masks``, BEiT ``VisionTransformerForMaskedImageModeling``, fairseq
    data2vec vision, MaskFeat, SimMIM). Works with ``dynamic_img_size`` ViTs (multi-crop).
    """
    x = vit.patch_embed(images)                       # (B, N, D), or (B, H, W, D) for dynamic sizes
    if mask is not None:
        x = torch.where(mask.view(*x.shape[:-1], 1), mask_token.reshape(-1).to(x.dtype), x)
    return vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))))


def block_outputs(vit: nn.Module, images: torch.Tensor, top_k: int, *, site: str = "block") -> list[torch.Tensor]:
    """The outputs of ``vit``'s last ``top_k`` blocks on ``images``, prefix tokens dropped:
    a list of ``(B, N, D)``. ``site="block"``: each block's output (data2vec v1 vision);
    ``site="mlp"``: its FFN output before the residual (fairseq data2vec 2.0 ``layer_results``)."""
    if site not in ("block", "mlp"):
        raise ValueError(f"sslkern.nn.block_outputs: site expected 'block' or 'mlp', got {site!r}")
    if not 1 <= top_k <= len(vit.blocks):
        raise ValueError(f"sslkern.nn.block_outputs: top_k expected in [1, {len(vit.blocks)}], got {top_k}")
    outs: list[torch.Tensor] = []
    p = vit.num_prefix_tokens
    hooks = [(blk if site == "block" else blk.mlp).register_forward_hook(lambda m, i, o: outs.append(o[:, p:]))
             for blk in vit.blocks[-top_k:]]
    try:
        if torch.compiler.is_compiling():
            vit.forward_features(images)
        else:  # torch.compile'd blocks (--compile) do not see hooks added per call (dynamo does not guard on them)
            with torch.compiler.set_stance("force_eager"):
                vit.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    return outs


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
                generator: torch.Generator | None = None, check_indices: bool = True,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """``noise`` (mode "noise"): the standard-normal draws ``(B, N, dim)`` to scale by
        ``noise_std`` (a training loop's per-sample draws); else drawn here from ``generator``."""
        fill = None
        if self.mode == "noise":
            B, N, D = x_vis.shape[0], ids_restore.shape[1], x_vis.shape[2]
            if noise is None:
                noise = torch.randn(B, N, D, device=x_vis.device, dtype=x_vis.dtype, generator=generator)
            fill = noise.to(x_vis.dtype) * self.noise_std
        return restore_tokens(x_vis, ids_restore, mask_token=self.mask_token, fill=fill, pos_embed=self.pos_embed,
                              num_prefix_tokens=self.num_prefix_tokens, check_indices=check_indices)
