"""One call that puts sslkern into a timm ``VisionTransformer``: ``patch_timm_vit``.

Liger-Kernel's convention: patch a live instance, or the class before the model is
built; weights and state dict stay as they are; the call returns what it changed::

    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    report = sslkern.patch.patch_timm_vit(model)             # attention -> sslkern kernels
    y = model(images)                                        # same outputs (fp32 rounding)
    z = model.forward_masked(images, ids_keep)               # encoder on the kept tokens only

    sslkern.patch.patch_timm_vit()                           # or: every VisionTransformer
    model = timm.create_model("vit_small_patch16_224")       # built from now on is patched
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .nn.attention import AlibiAttention, AlibiContext
from .nn.masking import embed_visible
from .reference.alibi_attention import MODES

__all__ = ["patch_timm_vit", "PatchReport", "TimmAttention", "forward_masked"]

_OP = "patch.patch_timm_vit"


@dataclass
class PatchReport:
    """What :func:`patch_timm_vit` changed.

    ``attention``: names of the swapped attention modules (``blocks.i.attn``);
    ``methods``: methods added to the model (``forward_masked``); ``alibi``: the shared
    :class:`sslkern.nn.AlibiContext` when ALiBi is on (``ctx.bias_scale``,
    ``ctx.enabled``); ``skipped``: ``(name, reason)`` for what was left alone;
    ``classes``: the classes patched (class mode). ``undo()`` puts everything back (the
    original attention modules, which share the weights, or the original ``__init__``).
    """

    model: Optional[nn.Module] = None
    attention: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    alibi: Optional[AlibiContext] = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: list[type] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __bool__(self) -> bool:
        return bool(self.attention or self.methods or self.classes)


class TimmAttention(AlibiAttention):
    """:class:`sslkern.nn.AlibiAttention` as :func:`patch_timm_vit` installs it.

    With ALiBi on, always sslkern's kernel. With ALiBi off (no bias), each call takes the
    faster of the two exact implementations as measured on CPU (figures in
    docs/ops/alibi_attention.md, *Plain attention in patched timm ViTs*): a call that needs
    gradients runs sslkern's kernel; a call without gradients (eval, the EMA teacher) and every
    CUDA call runs ``F.scaled_dot_product_attention`` as timm's ``Attention`` does (on CUDA
    PyTorch's flash attention; sslkern's Triton kernel has not been measured against it).
    """

    def _prefer_sdpa(self, args: dict, q: torch.Tensor) -> bool:
        if args["mode"] != "none":
            return False
        return q.device.type != "cpu" or not (torch.is_grad_enabled() and q.requires_grad)


def _timm_vit_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Attention


def _rows_ids(ids_keep: torch.Tensor, mask_major: bool) -> torch.Tensor:
    """(rows, Nk) kept indices in the output row order of ``gather_tokens``."""
    if ids_keep.dim() == 2:
        return ids_keep
    B, M, Nk = ids_keep.shape
    return (ids_keep.transpose(0, 1) if mask_major else ids_keep).reshape(B * M, Nk)


def forward_masked(self: nn.Module, x: torch.Tensor, ids_keep: torch.Tensor, *, mask_major: bool = False,
                   attn_mask: Optional[torch.Tensor] = None, check_indices: bool = True) -> torch.Tensor:
    """The encoder on the kept patch tokens only (MAE encoder, data2vec 2.0 / iBOT student).

    ``x``: (B, C, H, W) images. ``ids_keep``: (B, Nk) kept patch indices, or (B, M, Nk)
    for a clone batch of M masks per image (output rows image-major ``b·M + m``, or
    ``m·B + b`` with ``mask_major``). The patch embedding runs on the full image; the
    kept tokens are gathered with their position embedding added in the same pass
    (:func:`sslkern.gather_tokens`), the prefix tokens (CLS, registers) prepended; then
    ``patch_drop``, ``norm_pre``, the blocks (ALiBi, when on, with the kept tokens' true
    grid coordinates) and ``norm``. Returns (rows, P + Nk, D), like ``forward_features``.
    ``check_indices=False``: no host sync for the index check (CUDA graphs; see
    :func:`sslkern.gather_tokens`). On an unpatched timm ViT call it as a function:
    ``sslkern.patch.forward_masked(vit, x, ids_keep)``.
    """
    tokens = embed_visible(self, x, ids_keep, mask_major=mask_major, check_indices=check_indices)
    tokens = self.patch_drop(tokens)
    tokens = self.norm_pre(tokens)
    ctx: Optional[AlibiContext] = getattr(self, "_sslkern_alibi", None)
    if ctx is not None and ctx.enabled:
        with ctx.tokens(ids_keep=_rows_ids(ids_keep, mask_major)):
            tokens = _run_blocks(self, tokens, attn_mask)
    else:
        tokens = _run_blocks(self, tokens, attn_mask)
    return self.norm(tokens)


def _run_blocks(vit, x, attn_mask):
    if attn_mask is None:
        return vit.blocks(x)
    for blk in vit.blocks:
        x = blk(x, attn_mask=attn_mask)
    return x


def _check_options(alibi, masked_tokens, fused_attention):
    if alibi is not None and alibi not in MODES[1:]:
        raise ValueError(f"sslkern.{_OP}: alibi expected None or one of {MODES[1:]}, got {alibi!r}")
    if alibi is not None and not fused_attention:
        raise ValueError(f"sslkern.{_OP}: alibi={alibi!r} needs fused_attention=True (ALiBi runs in sslkern's "
                         "attention kernel)")


def patch_timm_vit(model: Optional[nn.Module] = None, *, alibi: Optional[str] = None, masked_tokens: bool = True,
                   fused_attention: bool = True, num_prefix_tokens: Optional[int] = None,
                   grid_size: Optional[tuple[int, int]] = None) -> PatchReport:
    """Put sslkern's kernels into a timm ``VisionTransformer`` (a live ``model``, or — with
    ``model=None`` — every ``VisionTransformer`` constructed after this call).

    Args:
        model: a ``timm.models.vision_transformer.VisionTransformer`` (or subclass); None
            patches the class.
        alibi: None (plain attention: outputs equal the unpatched model's up to fp32
            rounding) or an ALiBi mode ``"1d"``, ``"2d"``, ``"2d_euclidean"`` (data2vec 2.0
            style bias, computed in the kernel; the model's outputs then change by design).
        masked_tokens: add ``model.forward_masked(x, ids_keep, *, mask_major=False)``
            (:func:`forward_masked`): the encoder on kept tokens, clone batches included.
        fused_attention: swap every block's timm ``Attention`` for :class:`TimmAttention`
            (an :class:`sslkern.nn.AlibiAttention`) sharing its sub-modules (qkv, norms,
            proj): the state dict is unchanged and loads with ``strict=True`` both ways.
            Without ALiBi it runs sslkern's kernel where that is faster (CPU calls that
            need gradients) and SDPA elsewhere (see :class:`TimmAttention`).
            Attention of other classes (RoPE, diff attention, ...) is left alone and listed
            in ``report.skipped``.
        num_prefix_tokens, grid_size: for ALiBi; default the model's ``num_prefix_tokens``
            and ``patch_embed.grid_size``.

    Returns a :class:`PatchReport`. ALiBi is refused with ``dynamic_img_size`` or patch
    dropout (the token coordinates would be unknown).
    """
    _check_options(alibi, masked_tokens, fused_attention)
    if model is None:
        return _patch_class(dict(alibi=alibi, masked_tokens=masked_tokens, fused_attention=fused_attention,
                                 num_prefix_tokens=num_prefix_tokens, grid_size=grid_size))
    VisionTransformer, Attention = _timm_vit_classes()
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"sslkern.{_OP}: model expected a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "_sslkern_patched", False):
        raise ValueError(f"sslkern.{_OP}: model is already patched (call report.undo() first)")
    report = PatchReport(model=model)
    if alibi is not None:
        if getattr(model, "dynamic_img_size", False):
            raise ValueError(f"sslkern.{_OP}: alibi is not supported with dynamic_img_size=True")
        if not isinstance(model.patch_drop, nn.Identity):
            raise ValueError(f"sslkern.{_OP}: alibi is not supported with patch dropout (patch_drop_rate > 0)")
        P = int(model.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens)
        grid = tuple(model.patch_embed.grid_size) if grid_size is None else tuple(grid_size)
        report.alibi = AlibiContext(grid, P)
    if fused_attention:
        _swap_attention(model, report, Attention, alibi, num_prefix_tokens, grid_size)
    if masked_tokens:
        if type(model)._pos_embed is not VisionTransformer._pos_embed:
            report.skipped.append(("forward_masked", f"{type(model).__name__} overrides _pos_embed"))
        elif getattr(model, "dynamic_img_size", False):
            report.skipped.append(("forward_masked", "dynamic_img_size models are not supported"))
        else:
            model.forward_masked = types.MethodType(forward_masked, model)
            report.methods.append("forward_masked")
            report._undo.append(lambda: model.__dict__.pop("forward_masked", None))
    model._sslkern_alibi = report.alibi
    model._sslkern_patched = True

    def _clear():
        model.__dict__.pop("_sslkern_alibi", None)
        model.__dict__.pop("_sslkern_patched", None)

    report._undo.insert(0, _clear)
    return report


def _swap_attention(model, report, Attention, alibi, num_prefix_tokens, grid_size):
    ctx = report.alibi
    mode = alibi or "none"
    P = int(model.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens)
    grid = tuple(model.patch_embed.grid_size) if grid_size is None else tuple(grid_size)
    for i, blk in enumerate(model.blocks):
        name = f"blocks.{i}.attn"
        attn = getattr(blk, "attn", None)
        if attn is None or type(attn) is not Attention:
            report.skipped.append((name, f"{type(attn).__name__} is not timm's Attention"))
            continue
        new = TimmAttention.from_timm(attn, alibi_mode=mode, num_prefix_tokens=P, grid_size=grid, context=ctx,
                                       layer_index=i)
        new.train(attn.training)
        blk.attn = new
        if ctx is not None:
            ctx.modules.append(new)
        report.attention.append(name)
        report._undo.append(lambda blk=blk, attn=attn: setattr(blk, "attn", attn))
    if alibi is not None and not report.attention:
        raise ValueError(f"sslkern.{_OP}: alibi={alibi!r} but no block has timm's Attention to swap")


_CLASS_STATE: dict[str, Any] = {}


def _patch_class(options: dict) -> PatchReport:
    VisionTransformer, _ = _timm_vit_classes()
    if "init" in _CLASS_STATE:  # re-patching replaces the options
        VisionTransformer.__init__ = _CLASS_STATE.pop("init")
    original = VisionTransformer.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not getattr(self, "_sslkern_patched", False):
            patch_timm_vit(self, **options)

    __init__.__wrapped__ = original
    __init__.__doc__ = original.__doc__
    VisionTransformer.__init__ = __init__
    _CLASS_STATE["init"] = original
    report = PatchReport(classes=[VisionTransformer])

    def _restore():
        if VisionTransformer.__init__ is __init__:
            VisionTransformer.__init__ = original
            _CLASS_STATE.pop("init", None)

    report._undo.append(_restore)
    return report
