"""``AlibiAttention``: a drop-in for timm's ViT ``Attention`` with in-kernel ALiBi.

Same constructor arguments and sub-module names as ``timm.models.vision_transformer.Attention``
(``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``),
so timm weights load with ``strict=True``; the slopes are a non-persistent buffer and the
optional per-head bias scale is supplied from outside (data2vec 2.0 keeps one learnable
``alibi_scale`` for the whole encoder), so the state dict is unchanged.

Coordinates of a masked (gathered) sequence reach every block through a shared
:class:`AlibiContext`. The usual way in::

    vit = timm.create_model("vit_small_patch16_224", num_classes=0)
    alibi = sslkern.nn.use_alibi(vit, mode="2d")           # swaps every block's attention
    y = vit(images)                                        # full grid: raster coordinates

    x = gather(vit.patch_embed(images), ids_keep)          # (B, Lk, D) kept tokens
    x = torch.cat([cls_tokens, x], 1)
    with alibi.tokens(ids_keep=ids_keep):                  # true grid coordinates of the kept tokens
        for blk in vit.blocks:
            x = blk(x)

    alibi.bias_scale = encoder_alibi_scale.clamp(min=0)    # optional (H,) or (depth, H), learnable
    alibi.enabled = False                                  # plain attention (ALiBi off)

Without a context, set ``attn.coords`` / ``attn.bias_scale`` on a module directly.
``attn_mask``, ``is_causal`` or attention dropout in training fall back to SDPA with the
bias materialized (correct, not memory-efficient; with ALiBi off, plain SDPA).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.alibi_attention import alibi_attention
from ..reference.alibi_attention import MODES, alibi_bias, alibi_slopes, effective_slopes_and_coords


class AlibiContext:
    """What all swapped attention modules of one model share: the token coordinates of the
    current call, a per-head (or per-layer-per-head) bias scale and the on/off switch."""

    def __init__(self, grid_size: tuple[int, int], num_prefix_tokens: int):
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.coords: Optional[torch.Tensor] = None      # (B, Lk, 2) / (Lk, 2) for 2D modes
        self.positions: Optional[torch.Tensor] = None   # (B, Lk) / (Lk,) for mode "1d"
        self.bias_scale: Optional[torch.Tensor] = None
        self.enabled = True
        self.modules: list["AlibiAttention"] = []

    def grid_coords(self, device=None) -> torch.Tensor:
        """(h·w, 2) (row, col) of the full patch grid in raster order."""
        h, w = self.grid_size
        idx = torch.arange(h * w, device=device)
        return torch.stack([idx // w, idx % w], dim=-1).to(torch.float32)

    def coords_of(self, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, Lk, 2) grid coordinates of kept patch indices ``ids_keep`` (B, Lk)."""
        h, w = self.grid_size
        if ids_keep.numel() and (int(ids_keep.min()) < 0 or int(ids_keep.max()) >= h * w):
            raise ValueError(f"sslkern.nn.use_alibi: ids_keep expected indices in [0, {h * w}), got values in "
                             f"[{int(ids_keep.min())}, {int(ids_keep.max())}]")
        return torch.stack([ids_keep // w, ids_keep % w], dim=-1).to(torch.float32)

    @contextlib.contextmanager
    def tokens(self, ids_keep: Optional[torch.Tensor] = None, coords: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Within the block, attention uses these patch-token coordinates: ``ids_keep`` (B, Lk)
        indices into the raster grid (checked: one host sync), or ``coords`` (B, Lk, 2) /
        (Lk, 2) directly (for mode "1d": positions (B, Lk) / (Lk,); ``ids_keep`` are the
        positions)."""
        if (ids_keep is None) == (coords is None):
            raise ValueError("sslkern.nn.use_alibi: tokens() expected exactly one of ids_keep or coords")
        old = self.coords, self.positions
        if ids_keep is not None:
            self.coords, self.positions = self.coords_of(ids_keep), ids_keep
        else:
            self.coords = self.positions = coords
        try:
            yield
        finally:
            self.coords, self.positions = old


class AlibiAttention(nn.Module):
    """timm ``Attention`` with ALiBi (:func:`sslkern.alibi_attention`) instead of SDPA.

    Extra arguments: ``alibi_mode`` ("none" | "1d" | "2d" | "2d_euclidean"),
    ``num_prefix_tokens`` (CLS etc., zero bias), ``grid_size`` (patch grid (h, w) for the
    default coordinates; None → square), ``context`` (shared :class:`AlibiContext`),
    ``layer_index`` (row of a (depth, H) context bias scale).
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer: Optional[Type[nn.Module]] = None, device=None, dtype=None, *,
                 alibi_mode: str = "2d", num_prefix_tokens: int = 1, grid_size: Optional[tuple[int, int]] = None,
                 context: Optional[AlibiContext] = None, layer_index: int = 0):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim or dim // num_heads
        if attn_head_dim is None and dim % num_heads:
            raise ValueError(f"AlibiAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("AlibiAttention: norm_layer must be given with qk_norm or scale_norm")
        self.num_heads, self.head_dim, self.attn_dim = num_heads, head_dim, num_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_alibi(alibi_mode, num_prefix_tokens, grid_size, context, layer_index)

    def _init_alibi(self, mode, num_prefix_tokens, grid_size, context, layer_index):
        if mode not in MODES:
            raise ValueError(f"AlibiAttention: alibi_mode must be one of {MODES}, got {mode!r}")
        self.alibi_mode = mode
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.context = context
        self.layer_index = layer_index
        self.coords: Optional[torch.Tensor] = None       # used when there is no context
        self.bias_scale: Optional[torch.Tensor] = None   # (H,), used when there is no context
        self.alibi_enabled = True
        self.register_buffer("slopes", alibi_slopes(self.num_heads).to(self.qkv.weight.device), persistent=False)

    @classmethod
    def from_timm(cls, attn: nn.Module, **alibi_kwargs) -> "AlibiAttention":
        """Wrap an existing timm ``Attention``: its sub-modules are shared, not copied."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name, None) or nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self._init_alibi(alibi_kwargs.pop("alibi_mode", "2d"), alibi_kwargs.pop("num_prefix_tokens", 1),
                         alibi_kwargs.pop("grid_size", None), alibi_kwargs.pop("context", None),
                         alibi_kwargs.pop("layer_index", 0))
        if alibi_kwargs:
            raise TypeError(f"AlibiAttention.from_timm: unexpected arguments {sorted(alibi_kwargs)}")
        return self

    def _alibi_args(self, n_tokens: int, device) -> dict:
        ctx = self.context
        enabled = self.alibi_enabled and (ctx is None or ctx.enabled)
        mode = self.alibi_mode if enabled else "none"
        coords = self.coords if ctx is None else (ctx.positions if mode == "1d" else ctx.coords)
        bias_scale = ctx.bias_scale if ctx is not None else self.bias_scale
        if bias_scale is not None and bias_scale.dim() == 2:
            bias_scale = bias_scale[self.layer_index]
        grid = ctx.grid_size if ctx is not None else self.grid_size
        n_patch = n_tokens - self.num_prefix_tokens
        if coords is None and mode in ("2d", "2d_euclidean") and grid is not None and grid[0] * grid[1] == n_patch:
            h, w = grid
            idx = torch.arange(n_patch, device=device)
            coords = torch.stack([idx // w, idx % w], dim=-1).to(torch.float32)
        return dict(slopes=self.slopes, mode=mode, coords=coords if mode != "none" else None,
                    num_prefix_tokens=self.num_prefix_tokens, bias_scale=bias_scale, scale=self.scale)

    def _prefer_sdpa(self, args: dict, q: torch.Tensor) -> bool:
        """Hook: True to run SDPA instead of the sslkern kernel when there is no bias (subclasses)."""
        return False

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        args = self._alibi_args(N, x.device)
        dropout = self.attn_drop.p if self.training else 0.0
        if attn_mask is None and not is_causal and dropout == 0.0 and not self._prefer_sdpa(args, q):
            x = alibi_attention(q, k, v, **args)
        elif args["mode"] == "none":  # no bias to add: SDPA exactly as timm's Attention calls it
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
                                               scale=self.scale)
        else:  # not in the fused kernel: SDPA with the ALiBi bias materialized
            slopes, coords = effective_slopes_and_coords(q, args["slopes"], args["mode"], args["coords"],
                                                         args["num_prefix_tokens"], args["bias_scale"])
            bias = alibi_bias(slopes, coords, args["mode"], args["num_prefix_tokens"]).to(q.dtype)
            if attn_mask is not None:
                bias = bias.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else bias + attn_mask
            if is_causal:
                causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
                bias = bias.masked_fill(~causal, float("-inf"))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, alibi_mode={self.alibi_mode!r}, " \
               f"num_prefix_tokens={self.num_prefix_tokens}"


def use_alibi(model: nn.Module, mode: str = "2d", num_prefix_tokens: Optional[int] = None,
              grid_size: Optional[tuple[int, int]] = None) -> AlibiContext:
    """Swap the attention of every block of a timm ``VisionTransformer`` (``model.blocks[i].attn``)
    for :class:`AlibiAttention` sharing its weights, and return the shared
    :class:`AlibiContext` (set coordinates with ``ctx.tokens(...)``, ``ctx.bias_scale``,
    ``ctx.enabled``). ``num_prefix_tokens`` / ``grid_size`` default to the model's
    ``num_prefix_tokens`` and ``patch_embed.grid_size``. The state dict is unchanged.
    """
    if num_prefix_tokens is None:
        num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
    if grid_size is None:
        grid_size = tuple(model.patch_embed.grid_size)
    ctx = AlibiContext(grid_size, num_prefix_tokens)
    for i, blk in enumerate(model.blocks):
        attn = blk.attn if not isinstance(blk.attn, AlibiAttention) else None
        if attn is None:
            raise ValueError("sslkern.nn.use_alibi: the model's attention is already AlibiAttention")
        new = AlibiAttention.from_timm(attn, alibi_mode=mode, num_prefix_tokens=num_prefix_tokens,
                                       grid_size=grid_size, context=ctx, layer_index=i)
        blk.attn = new
        ctx.modules.append(new)
    return ctx
