"""``gather_tokens`` / ``restore_tokens`` — fused masked-token gather and restore (mae ``models_mae.py``).

MAE, data2vec 2.0, I-JEPA and iBOT all keep a subset of patch tokens for the encoder and
put the encoder output back in place (with mask tokens) for the decoder. Done eagerly this
is an ``x + pos`` pass, a gather, a ``repeat_interleave`` for clone batches, a ``cat`` with
mask tokens, an unshuffle gather and another ``+ pos``. Here each direction is one pass:
every output row is read once from its source row (position embedding added on the way)
and written once; the clone batch is never materialized.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import Dispatch, ext_op, module_attr
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_int, check_tensor, fail
from ._common import acc_dtype, check_index_values

_TRITON = "sslkern.triton_ops.tokens"


# ---------------------------------------------------------------------------------------
# Eager backends: the custom ops' contracts in plain PyTorch
# ---------------------------------------------------------------------------------------
def gather_tokens_eager(x, ids_keep, pos_embed, num_prefix_tokens, mask_major):
    """``gather_tokens`` without shared prefix tokens, on the oracle."""
    from ..reference.tokens import gather_tokens

    return gather_tokens(x, ids_keep, pos_embed=pos_embed, num_prefix_tokens=num_prefix_tokens,
                         mask_major=mask_major).contiguous()


def restore_tokens_eager(x_vis, ids_restore, mask_token, fill, pos_embed, num_prefix_tokens):
    """``restore_tokens`` on the oracle."""
    from ..reference.tokens import restore_tokens

    return restore_tokens(x_vis, ids_restore, mask_token=mask_token, fill=fill, pos_embed=pos_embed,
                          num_prefix_tokens=num_prefix_tokens).contiguous()


def gather_tokens_backward_eager(grad_out, ids_keep, num_tokens, num_prefix_tokens, mask_major, need_pos):
    """(grad_x, grad_pos) written out (custom-op bodies run below autograd)."""
    B, M, Nk = ids_keep.shape
    P, D = num_prefix_tokens, grad_out.shape[-1]
    g = grad_out.reshape(M, B, P + Nk, D).transpose(0, 1) if mask_major else grad_out.reshape(B, M, P + Nk, D)
    acc = acc_dtype(grad_out)
    grad_x = torch.zeros(B, num_tokens, D, dtype=acc, device=grad_out.device)
    grad_x[:, :P] = g[:, :, :P].to(acc).sum(1)
    idx = (ids_keep.long() + P).reshape(B, M * Nk, 1).expand(-1, -1, D)
    grad_x.scatter_add_(1, idx, g[:, :, P:].reshape(B, M * Nk, D).to(acc))
    grad_pos = grad_x.sum(0).to(grad_out.dtype) if need_pos else grad_out.new_empty(0)
    return grad_x.to(grad_out.dtype), grad_pos


def restore_tokens_backward_eager(grad_out, ids_restore, num_visible, num_prefix_tokens, need_mask_token, need_fill,
                                  need_pos):
    """(grad_x_vis, grad_mask_token, grad_fill, grad_pos) written out."""
    B, N = ids_restore.shape
    P, Nk, D = num_prefix_tokens, num_visible, grad_out.shape[-1]
    g = grad_out[:, P:]
    rank = ids_restore.long()
    visible = (rank < Nk).unsqueeze(-1)
    grad_vis = torch.zeros(B, P + Nk, D, dtype=grad_out.dtype, device=grad_out.device)
    grad_vis[:, :P] = grad_out[:, :P]
    if Nk > 0:
        # slot i goes to visible rank ids_restore[b, i]; removed slots go to a dummy row Nk
        target = torch.where(rank < Nk, rank, torch.full_like(rank, Nk)) + P
        buf = torch.zeros(B, P + Nk + 1, D, dtype=grad_out.dtype, device=grad_out.device)
        buf.scatter_(1, target.unsqueeze(-1).expand(-1, -1, D), g)
        grad_vis[:, P:] = buf[:, P:P + Nk]
    acc = acc_dtype(grad_out)
    removed_g = torch.where(visible, torch.zeros((), dtype=g.dtype, device=g.device), g)
    gmt = removed_g.to(acc).sum((0, 1)).to(grad_out.dtype) if need_mask_token else grad_out.new_empty(0)
    gfill = removed_g if need_fill else grad_out.new_empty(0)
    gpos = grad_out.to(acc).sum(0).to(grad_out.dtype) if need_pos else grad_out.new_empty(0)
    return grad_vis, gmt, gfill.contiguous(), gpos


# ---------------------------------------------------------------------------------------
# Backend adapters: every backend takes the custom ops' arguments
# ---------------------------------------------------------------------------------------
def _gather_with_prefix(loader):
    """A gather kernel without shared prefix tokens (and no use for ``unique``): the patches
    through the kernel, the P shared rows (plus their positions) put in front."""
    def load():
        fn = loader()

        def gather(x, ids_keep, pos_embed, num_prefix_tokens, mask_major, unique, prefix_tokens):
            if prefix_tokens is None:
                return fn(x, ids_keep, pos_embed, num_prefix_tokens, mask_major)
            P = num_prefix_tokens
            body = fn(x, ids_keep, None if pos_embed is None else pos_embed[P:].contiguous(), 0, mask_major)
            pre = prefix_tokens if pos_embed is None else prefix_tokens + pos_embed[:P]
            return torch.cat([pre.unsqueeze(0).expand(body.shape[0], -1, -1), body], dim=1)
        return gather
    return load


def _gather_cpu():
    fn = ext_op("gather_tokens_cpu")()  # the C++ kernel fuses the shared prefix into the copy
    return lambda x, ids_keep, pos_embed, P, mask_major, unique, prefix_tokens: fn(
        x, ids_keep, pos_embed, P, mask_major, prefix_tokens)


def _gather_backward_with_prefix(loader):
    """A gather backward kernel ``fn(grad_out, ids, num_tokens, P, mask_major, need_pos, unique)``
    without the shared-prefix form: ``external_prefix`` sums the prefix rows' gradient here."""
    def load():
        fn = loader()

        def backward(grad_out, ids_keep, num_tokens, num_prefix_tokens, mask_major, need_pos, unique,
                     external_prefix):
            if not external_prefix:
                return fn(grad_out, ids_keep, num_tokens, num_prefix_tokens, mask_major, need_pos, unique)
            P = num_prefix_tokens
            grad_x, grad_pos = fn(grad_out[:, P:].contiguous(), ids_keep, num_tokens, 0, mask_major, need_pos, unique)
            grad_pre = grad_out[:, :P].to(acc_dtype(grad_out)).sum(0).to(grad_out.dtype)
            return grad_x, (torch.cat([grad_pre, grad_pos], dim=0) if need_pos else grad_pre)
        return backward
    return load


def _gather_backward_cpu():
    fn = ext_op("gather_tokens_backward_cpu")()  # no atomics on CPU: ``unique`` has no use there
    return lambda grad_out, ids_keep, num_tokens, P, mask_major, need_pos, unique, external_prefix: fn(
        grad_out, ids_keep, num_tokens, P, mask_major, need_pos, external_prefix)


def _gather_backward_eager_any_unique():
    return lambda grad_out, ids_keep, num_tokens, P, mask_major, need_pos, unique: gather_tokens_backward_eager(
        grad_out, ids_keep, num_tokens, P, mask_major, need_pos)


def _gather_backward_cuda():
    fn = ext_op("gather_tokens_backward_cuda")()

    def run(grad_out, ids_keep, num_tokens, num_prefix_tokens, mask_major, need_pos, unique):
        if torch.are_deterministic_algorithms_enabled():  # the kernel's atomics: take the index_add_ path
            from ..triton_ops.tokens import gather_tokens_backward_deterministic as det
            gx = det(grad_out, ids_keep, num_tokens, num_prefix_tokens, mask_major)
            return gx.to(grad_out.dtype), (gx.sum(0).to(grad_out.dtype) if need_pos else grad_out.new_empty(0))
        return fn(grad_out, ids_keep, num_tokens, num_prefix_tokens, mask_major, need_pos)
    return run


def _restore_backward_cuda():
    fn = ext_op("restore_tokens_backward_cuda")()

    def run(grad_out, ids_restore, num_visible, num_prefix_tokens, need_mask_token, need_fill, need_pos):
        if need_mask_token and torch.are_deterministic_algorithms_enabled():  # its sum uses atomics
            from ..triton_ops.tokens import restore_mask_token_grad
            gv, _, gf, gp = fn(grad_out, ids_restore, num_visible, num_prefix_tokens, False, need_fill, need_pos)
            gm = restore_mask_token_grad(grad_out, ids_restore, num_visible, num_prefix_tokens).to(grad_out.dtype)
            return gv, gm, gf, gp
        return fn(grad_out, ids_restore, num_visible, num_prefix_tokens, need_mask_token, need_fill, need_pos)
    return run


gather_dispatch = Dispatch("gather_tokens", {
    "reference": _gather_with_prefix(lambda: gather_tokens_eager),
    "cpu": _gather_cpu,
    "triton": _gather_with_prefix(module_attr(_TRITON, "gather_tokens_triton")),
    "cuda": _gather_with_prefix(ext_op("gather_tokens_cuda")),
}, checks_indices=("cpu",))
gather_backward_dispatch = Dispatch("gather_tokens_backward", {
    "reference": _gather_backward_with_prefix(_gather_backward_eager_any_unique),
    "cpu": _gather_backward_cpu,
    "triton": _gather_backward_with_prefix(module_attr(_TRITON, "gather_tokens_backward_triton")),
    "cuda": _gather_backward_with_prefix(_gather_backward_cuda),
})
restore_dispatch = Dispatch("restore_tokens", {
    "reference": lambda: restore_tokens_eager,
    "cpu": ext_op("restore_tokens_cpu"),
    "triton": module_attr(_TRITON, "restore_tokens_triton"),
    "cuda": ext_op("restore_tokens_cuda"),
}, checks_indices=("cpu",))
restore_backward_dispatch = Dispatch("restore_tokens_backward", {
    "reference": lambda: restore_tokens_backward_eager,
    "cpu": ext_op("restore_tokens_backward_cpu"),
    "triton": module_attr(_TRITON, "restore_tokens_backward_triton"),
    "cuda": _restore_backward_cuda,
})
dispatch = gather_dispatch  # the backends of this op family (tests parametrize over it)


# ---------------------------------------------------------------------------------------
# gather
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("sslkern::gather_tokens", mutates_args=())
def _gather_op(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: Optional[torch.Tensor], num_prefix_tokens: int,
               mask_major: bool, unique: bool, prefix_tokens: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return gather_dispatch(x.device, backend)(x, ids_keep, pos_embed, num_prefix_tokens, mask_major, unique,
                                              prefix_tokens)


@_gather_op.register_fake
def _(x, ids_keep, pos_embed, num_prefix_tokens, mask_major, unique, prefix_tokens, backend):
    B, M, Nk = ids_keep.shape
    return x.new_empty(B * M, num_prefix_tokens + Nk, x.shape[2])


@torch.library.custom_op("sslkern::gather_tokens_backward", mutates_args=())
def _gather_backward_op(grad_out: torch.Tensor, ids_keep: torch.Tensor, num_tokens: int, num_prefix_tokens: int,
                        mask_major: bool, need_pos: bool, unique: bool, external_prefix: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, sums): sums = the batch sum of grad_out's rows by position (pos_embed's
    gradient, fused), (P + N, D) if ``need_pos`` else empty (0,). ``external_prefix``: x held
    no prefix rows (``num_tokens`` = N) and sums are (P, D) without ``need_pos``: its first P
    rows are the shared prefix tokens' gradient either way. ``unique``: every grad_x row has
    at most one source row (plain stores on the GPU)."""
    return gather_backward_dispatch(grad_out.device, backend)(grad_out, ids_keep, num_tokens, num_prefix_tokens,
                                                              mask_major, need_pos, unique, external_prefix)


@_gather_backward_op.register_fake
def _(grad_out, ids_keep, num_tokens, num_prefix_tokens, mask_major, need_pos, unique, external_prefix, backend):
    D = grad_out.shape[2]
    if need_pos:
        gpos = grad_out.new_empty(num_tokens + (num_prefix_tokens if external_prefix else 0), D)
    else:
        gpos = grad_out.new_empty(num_prefix_tokens, D) if external_prefix else grad_out.new_empty(0)
    return grad_out.new_empty(ids_keep.shape[0], num_tokens, D), gpos


def _gather_setup(ctx, inputs, output):
    x, ids_keep, pos_embed, P, mask_major, unique, prefix, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.meta = (x.shape[1], P, mask_major, unique, backend, pos_embed is not None, prefix is not None)


def _gather_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    L, P, mask_major, unique, backend, has_pos, has_prefix = ctx.meta
    need_pos = bool(has_pos and ctx.needs_input_grad[2])
    grad = grad.contiguous()
    grad_x, grad_pos = _gather_backward_op(grad, ids_keep, L, P, mask_major, need_pos, unique, has_prefix, backend)
    # shared prefix tokens: every output row's prefix rows, summed over the batch (the first P sums)
    grad_prefix = None
    if has_prefix and ctx.needs_input_grad[6]:  # a copy: grad_pos may be accumulated in place
        grad_prefix = grad_pos[:P].clone() if need_pos else grad_pos
    return (grad_x if ctx.needs_input_grad[0] else None), None, (grad_pos if need_pos else None), None, None, None, \
        grad_prefix, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def _check_pos(op, pos_embed, n_total, d, dtype, device):
    if pos_embed is None:
        return None
    check_tensor(op, "pos_embed", pos_embed, dtypes=FLOAT_DTYPES, ndim=(2, 3), device=device)
    want = (n_total, d) if pos_embed.dim() == 2 else (1, n_total, d)
    check_tensor(op, "pos_embed", pos_embed, shape=want)
    return pos_embed.reshape(n_total, d).to(dtype).contiguous()


def _repeats_in_rows(ids: torch.Tensor, hi: int) -> torch.Tensor:
    """(B,) bool: whether a (clamped) index repeats within each row of ``ids`` (B, ...)."""
    flat = ids.reshape(ids.shape[0], -1).clamp(0, max(hi - 1, 0))
    counts = torch.zeros(ids.shape[0], max(hi, 1), dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.int32))
    return (counts > 1).any(1)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, *, pos_embed: torch.Tensor | None = None,
                  num_prefix_tokens: int = 0, prefix_tokens: torch.Tensor | None = None, mask_major: bool = False,
                  check_indices: bool = True,
                  backend: str | None = None) -> torch.Tensor:
    r"""Keep the tokens ``ids_keep`` of every image (prefix tokens first), adding positions.

    ``out[r, t] = x[b, s] + pos_embed[s]`` with ``s = t`` for the ``P`` prefix tokens
    (CLS, registers: never masked) and ``s = P + ids_keep[b, (m,) t − P]`` after them.

    Args:
        x: ``(B, P + N, D)`` tokens, fp32 / bf16 / fp16 (fp64 for gradcheck).
        ids_keep: ``(B, Nk)`` or ``(B, M, Nk)`` int64/int32 indices into the ``N`` patch
            tokens, each in ``[0, N)``. Order is kept as given (MAE's shuffle order, or
            ascending for block masks). Repeats are allowed (gradients add up).
        check_indices: check the values here, once (an ``IndexError`` names ``ids_keep``):
            one device reduction and one host sync, which also finds out whether any index
            repeats within an image (if none, the GPU backward writes with plain stores).
            On the C++ CPU backend the kernel checks every index itself (the same
            ``IndexError``), so no separate pass runs here.
            ``False``: no check and no sync (for CUDA-graph capture, e.g. an MAE / data2vec
            step); out-of-range rows then read and write nothing (zero output rows, no
            gradient) on the GPU; the C++ CPU kernels still raise. Backward never checks, and
            neither does a ``torch.compile``\ d call (the check would be a sync in the graph).
        pos_embed: ``None``, ``(P + N, D)`` or ``(1, P + N, D)``: added to each output token at
            its original position (prefix too), fused into the copy; cast to ``x.dtype``.
        num_prefix_tokens: ``P``.
        prefix_tokens: ``None``, or ``(P, D)`` / ``(1, P, D)`` tokens shared by every image
            (MAE's ``cls_token``, register tokens): then ``x`` is ``(B, N, D)``, the patch
            tokens only, ``out[r, t] = prefix_tokens[t] + pos_embed[t]`` for ``t < P`` and
            ``pos_embed`` is ``(P + N, D)``. MAE's ``forward_encoder`` is then one call,
            ``gather_tokens(patch_embed(img), ids_keep, pos_embed=pos_embed,
            prefix_tokens=cls_token)``, with no ``cat``. ``num_prefix_tokens`` must be 0 or
            ``P``. Gradient: the sum over all output rows of their prefix rows.
        mask_major: for ``(B, M, Nk)`` ids, output row ``b·M + m`` (False: image-major, the
            data2vec 2.0 clone batch ``x.repeat_interleave(M, 0)``) or ``m·B + b`` (True:
            I-JEPA ``apply_masks`` order ``cat_m gather(x, masks[m])``).
        backend: force ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"`` (default: auto).

    Returns:
        ``(B, P + Nk, D)``, or ``(B·M, P + Nk, D)`` for multi-mask ids; the repeat of ``x``
        is never materialized. Backward scatter-adds into ``x``'s gradient (fp32 sums for
        tokens kept by several masks) and sums over the batch for ``pos_embed``.

    Matches mae ``models_mae.py: random_masking`` (``torch.gather(x, 1, ids_keep…)``) after
    ``x + pos_embed[:, 1:]`` and ``cls_token + pos_embed[:, :1]``; lightly
    ``utils.get_at_index``; I-JEPA ``src/masks/utils.py: apply_masks``.
    """
    op = "gather_tokens"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, ndim=3)
    B, L, D = x.shape
    prefix = None
    if prefix_tokens is not None:
        check_tensor(op, "prefix_tokens", prefix_tokens, dtypes=FLOAT_DTYPES, ndim=(2, 3), device=x.device)
        P_ext = prefix_tokens.shape[-2]
        if prefix_tokens.shape[-1] != D or (prefix_tokens.dim() == 3 and prefix_tokens.shape[0] != 1):
            fail(op, f"prefix_tokens expected shape ({P_ext}, {D}) or (1, {P_ext}, {D}), "
                     f"got {tuple(prefix_tokens.shape)}")
        if num_prefix_tokens not in (0, P_ext) or isinstance(num_prefix_tokens, bool):
            fail(op, f"num_prefix_tokens expected 0 or {P_ext} (the rows of prefix_tokens), got {num_prefix_tokens!r}")
        prefix = prefix_tokens.reshape(P_ext, D).to(x.dtype).contiguous()
    check_tensor(op, "ids_keep", ids_keep, dtypes=INDEX_DTYPES, ndim=(2, 3), device=x.device)
    if ids_keep.shape[0] != B:
        fail(op, f"ids_keep expected batch size {B} (x.shape[0]), got shape {tuple(ids_keep.shape)}")
    num_prefix_tokens = check_int(op, "num_prefix_tokens", num_prefix_tokens, 0, L if prefix is None else None)
    check_choice(op, "mask_major", mask_major, (True, False))
    mask_major = bool(mask_major)
    check_choice(op, "check_indices", check_indices, (True, False))
    if mask_major and ids_keep.dim() != 3:
        fail(op, f"mask_major=True needs ids_keep of shape (B, M, Nk), got {tuple(ids_keep.shape)}")
    ids = ids_keep if ids_keep.dim() == 3 else ids_keep.unsqueeze(1)
    ids = ids.to(torch.int64).contiguous()
    P = num_prefix_tokens if prefix is None else prefix.shape[0]
    unique = False
    if check_indices and gather_dispatch.needs_index_check(x.device, backend):
        n_patches = L - (num_prefix_tokens if prefix is None else 0)
        # the same sync finds out whether an index repeats within an image (if not, the GPU
        # backward writes with plain stores)
        unique = not check_index_values(op, "ids_keep", ids, n_patches, meaning=" (patch token indices)",
                                        also=_repeats_in_rows(ids, n_patches))
    pos = _check_pos(op, pos_embed, L if prefix is None else P + L, D, x.dtype, x.device)
    return _gather_op(x.contiguous(), ids, pos, P, mask_major, unique, prefix, backend or "")


# ---------------------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("sslkern::restore_tokens", mutates_args=())
def _restore_op(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: Optional[torch.Tensor],
                fill: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor], num_prefix_tokens: int,
                backend: str) -> torch.Tensor:
    return restore_dispatch(x_vis.device, backend)(x_vis, ids_restore, mask_token, fill, pos_embed, num_prefix_tokens)


@_restore_op.register_fake
def _(x_vis, ids_restore, mask_token, fill, pos_embed, num_prefix_tokens, backend):
    return x_vis.new_empty(x_vis.shape[0], num_prefix_tokens + ids_restore.shape[1], x_vis.shape[2])


@torch.library.custom_op("sslkern::restore_tokens_backward", mutates_args=())
def _restore_backward_op(grad_out: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                         num_prefix_tokens: int, need_mask_token: bool, need_fill: bool, need_pos: bool,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x_vis, grad_mask_token, grad_fill, grad_pos); the last three empty if not needed."""
    return restore_backward_dispatch(grad_out.device, backend)(grad_out, ids_restore, num_visible, num_prefix_tokens,
                                                               need_mask_token, need_fill, need_pos)


@_restore_backward_op.register_fake
def _(grad_out, ids_restore, num_visible, num_prefix_tokens, need_mask_token, need_fill, need_pos, backend):
    B, N = ids_restore.shape
    D = grad_out.shape[2]
    gv = grad_out.new_empty(B, num_prefix_tokens + num_visible, D)
    gm = grad_out.new_empty(D) if need_mask_token else grad_out.new_empty(0)
    gf = grad_out.new_empty(B, N, D) if need_fill else grad_out.new_empty(0)
    gp = grad_out.new_empty(num_prefix_tokens + N, D) if need_pos else grad_out.new_empty(0)
    return gv, gm, gf, gp


def _restore_setup(ctx, inputs, output):
    x_vis, ids_restore, mask_token, fill, pos_embed, P, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.meta = (x_vis.shape[1] - P, P, backend, pos_embed is not None)


def _restore_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    Nk, P, backend, has_pos = ctx.meta
    need_x, _, need_mt, need_fill, need_pos = ctx.needs_input_grad[:5]
    need_pos = bool(has_pos and need_pos)
    gv, gm, gf, gp = _restore_backward_op(grad.contiguous(), ids_restore, Nk, P, bool(need_mt), bool(need_fill),
                                          need_pos, backend)
    return ((gv if need_x else None), None, (gm if need_mt else None), (gf if need_fill else None),
            (gp if need_pos else None), None, None)


_restore_op.register_autograd(_restore_backward, setup_context=_restore_setup)


def restore_tokens(x_vis: torch.Tensor, ids_restore: torch.Tensor, *, mask_token: torch.Tensor | None = None,
                   fill: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None,
                   num_prefix_tokens: int = 0, check_indices: bool = True,
                   backend: str | None = None) -> torch.Tensor:
    r"""Put visible tokens back in place and fill the removed slots (MAE decoder input).

    ``out[b, t] = x_vis[b, t]`` for prefix ``t < P``; for patch ``i`` (``t = P + i``) with
    ``k = ids_restore[b, i]``: ``x_vis[b, P + k]`` if ``k < Nk`` else ``mask_token`` (or
    ``fill[b, i]``); then ``+ pos_embed[t]``.

    Args:
        x_vis: ``(B, P + Nk, D)`` encoder output (visible tokens in ``ids_keep`` order).
        ids_restore: ``(B, N)`` int64/int32, MAE semantics: original position ``i`` holds
            shuffle rank ``ids_restore[b, i]``; each row must be a permutation of ``0..N−1``
            (checked by the C++ CPU kernels: an error names ``ids_restore``; elsewhere only the
            range is checked — a non-permutation there gives an output row per slot but
            ``x_vis`` gradients of ranks that never appear are zero, and of ranks that appear
            twice are one of the two).
        check_indices: check the range here, once (one device reduction and one host sync;
            an ``IndexError`` names ``ids_restore``; on the C++ CPU backend the kernel checks instead). ``False``: no check, no sync (CUDA-graph
            capture); out-of-range ranks then give zero rows on the GPU. Backward never checks,
            nor does a ``torch.compile``\ d call.
        mask_token: ``(D,)``, ``(1, 1, D)`` learned token (MAE); gradient = sum over removed slots.
        fill: ``(B, N, D)`` per-slot values (data2vec 2.0 ``N(0, 0.01²)`` noise); exactly one
            of ``mask_token`` and ``fill``. Only removed slots are read.
        pos_embed: ``None``, ``(P + N, D)`` or ``(1, P + N, D)`` added to every output token.
        num_prefix_tokens: ``P`` (CLS etc., copied first).
        backend: force ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"`` (default: auto).

    Clone batch (``gather_tokens`` with ``(B, M, Nk)`` ids, image-major rows): pass the
    encoder output ``(B·M, P + Nk, D)`` with ``ids_restore.reshape(B·M, N)``.

    Returns ``(B, P + N, D)``. Matches mae ``models_mae.py: forward_decoder``
    (``cat([x[:, 1:], mask_tokens])``, ``torch.gather(…, ids_restore…)``, ``+ decoder_pos_embed``)
    and lightly ``utils.set_at_index`` on a mask-token filled sequence.
    """
    op = "restore_tokens"
    check_tensor(op, "x_vis", x_vis, dtypes=FLOAT_DTYPES, ndim=3)
    B, Lv, D = x_vis.shape
    check_tensor(op, "ids_restore", ids_restore, dtypes=INDEX_DTYPES, ndim=2, device=x_vis.device)
    N = ids_restore.shape[1]
    if ids_restore.shape[0] != B:
        fail(op, f"ids_restore expected batch size {B} (x_vis.shape[0]), got shape {tuple(ids_restore.shape)}")
    num_prefix_tokens = check_int(op, "num_prefix_tokens", num_prefix_tokens, 0, Lv)
    check_choice(op, "check_indices", check_indices, (True, False))
    Nk = Lv - num_prefix_tokens
    if Nk > N:
        fail(op, f"x_vis expected at most {num_prefix_tokens} + {N} tokens (ids_restore has N = {N}), got {Lv}")
    if (mask_token is None) == (fill is None):
        fail(op, "exactly one of mask_token and fill must be given")
    if mask_token is not None:
        check_tensor(op, "mask_token", mask_token, dtypes=FLOAT_DTYPES, device=x_vis.device)
        if mask_token.numel() != D or any(s != 1 for s in mask_token.shape[:-1]) or mask_token.dim() == 0:
            fail(op, f"mask_token expected shape ({D},) or (1, 1, {D}), got {tuple(mask_token.shape)}")
        mask_token = mask_token.reshape(D).to(x_vis.dtype).contiguous()
    if fill is not None:
        check_tensor(op, "fill", fill, dtypes=FLOAT_DTYPES, shape=(B, N, D), device=x_vis.device)
        fill = fill.to(x_vis.dtype).contiguous()
    pos = _check_pos(op, pos_embed, num_prefix_tokens + N, D, x_vis.dtype, x_vis.device)
    ids = ids_restore.to(torch.int64).contiguous()
    if check_indices and restore_dispatch.needs_index_check(x_vis.device, backend):
        check_index_values(op, "ids_restore", ids, N, meaning=" (shuffle ranks)")
    return _restore_op(x_vis.contiguous(), ids, mask_token, fill, pos, num_prefix_tokens, backend or "")
