"""``relation_loss`` — RelViT's pairwise spatial-relation loss, fused.

RelViT (Camporese et al. 2021; ``guglielmocamporese/relvit`` ``models/relvit.py``,
``datasets/encode_locations.py``) shuffles the patches of each image and asks, for every pair
of patch tokens (i, j), where patch i lay relative to patch j in the original image: one of 9
classes (LU, CU, RU, LC, CC, RC, LD, CD, RD). Its head ``MultiHeadAttentionScores(D, 9)`` has
one query / key projection per class and scores ``x_c(i, j) = q_c(z_i)·k_c(z_j)/√d_head``;
the loss is ``F.cross_entropy`` of the (B, 9, N, N) scores against the (B, N, N) labels.
Optional regressions (``use_distances`` / ``use_angles``) use one-head scores of width D and
``F.mse_loss`` against RelViT's distance and angle matrices.

Fused: the labels come from the tokens' grid cells inside the kernel
(``3·(sgn(r_i − r_j) + 1) + sgn(c_i − c_j) + 1``; targets of the regressions are read from a
(G, G) table of the grid, G = cells), the (B, 9, N, N) scores and the (B, N, N) labels never
exist; the kernels stream over tiles of j. The projections ``z·Wᵀ`` are one GEMM each, done
here with differentiable torch ops (their gradients to the tokens and the weights flow through
autograd; for fp32 CPU tensors in eager mode ``_CPUProjections`` runs the forward products on
torch's oneDNN linear, which beat MKL's ``F.linear`` there: docs/design.md, *Fast paths*); the
custom op takes the projected (B, N, C·d_head) tensors.

Custom ops: ``torch.ops.sslkern.relation_loss(q, k, pos, table, grid_w, cells, classes, scale,
smoothing, backend) -> (loss, accuracy)`` and its backward
``sslkern::relation_loss_backward`` (recomputes the scores; returns dq, dk); and
``sslkern::relation_loss_with_grad`` (same arguments) -> (loss, accuracy, dq, dk), the loss and
its gradients to q and k from one pass over the scores (C++; the other backends run their
forward and backward kernels), whose backward only scales the saved dq, dk by the incoming
gradient (``register_saved_gradients``). ``relation_loss`` uses it when q or k needs a
gradient: the scores are formed once instead of twice, at the cost of keeping dq, dk (the
size of q, k) from forward to backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._backend import Dispatch, cpu_dnn_linear, cpu_native_half, ext_op, module_attr, standard_impls
from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_float, check_int, check_tensor, dtype_name, fail
from ..reference.relation_loss import (RelationLosses, pair_targets, relation_labels, relvit_angle_matrix,
                                       relvit_dist_matrix)
from ._common import acc_dtype, check_index_values, register_saved_gradients

OP = "relation_loss"

NUM_RELATIONS = 9


def _scores(q, k, classes, scale):
    """(B, C, N, N) scores in the accumulation type."""
    B, N, _ = q.shape
    acc = acc_dtype(q)
    qa = q.to(acc).reshape(B, N, classes, -1).transpose(1, 2)
    ka = k.to(acc).reshape(B, N, classes, -1).transpose(1, 2)
    return (qa @ ka.transpose(2, 3)) * scale, qa, ka


def relation_loss_eager(q, k, pos, table, grid_w, cells, classes, scale, smoothing):
    """The forward custom op's contract in eager PyTorch (the ``reference`` backend)."""
    s, _, _ = _scores(q, k, classes, scale)
    if table is None:
        y = relation_labels(pos, grid_w)
        logp = torch.log_softmax(s, dim=1)
        nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
        loss = ((1 - smoothing) * nll + smoothing * (-logp.mean(1))).mean()
        accuracy = (s.argmax(1) == y).to(s.dtype).mean()
    else:
        t = pair_targets(table, pos).to(s.dtype)
        loss = ((s[:, 0] - t) ** 2).mean()
        accuracy = s.new_zeros(())
    return loss, accuracy


def relation_loss_backward_eager(grad, q, k, pos, table, grid_w, cells, classes, scale, smoothing):
    """The backward custom op's contract in eager PyTorch: dq, dk written out."""
    s, qa, ka = _scores(q, k, classes, scale)
    B, N = pos.shape
    g = grad.to(s.dtype) / (B * N * N)
    if table is None:
        y = relation_labels(pos, grid_w)
        G = torch.softmax(s, dim=1) - smoothing / classes
        G = G - (1 - smoothing) * F.one_hot(y, classes).permute(0, 3, 1, 2).to(s.dtype)
    else:
        G = 2 * (s - pair_targets(table, pos).to(s.dtype).unsqueeze(1))
    G = G * (g * scale)
    dq = (G @ ka).transpose(1, 2).reshape(q.shape).to(q.dtype)
    dk = (G.transpose(2, 3) @ qa).transpose(1, 2).reshape(k.shape).to(k.dtype)
    return dq, dk


def _forward_then_backward(fwd_loader, bwd_loader):
    """A backend's ``relation_loss_with_grad``: the loss and (dq, dk) of grad 1 from its
    forward and backward kernels (two passes; the C++ backend has a one-pass kernel)."""
    def load():
        fwd, bwd = fwd_loader(), bwd_loader()

        def fn(q, k, pos, table, grid_w, cells, classes, scale, smoothing):
            loss, accuracy = fwd(q, k, pos, table, grid_w, cells, classes, scale, smoothing)
            dq, dk = bwd(torch.ones((), dtype=loss.dtype, device=loss.device), q, k, pos, table, grid_w, cells,
                         classes, scale, smoothing)
            return loss, accuracy, dq, dk
        return fn
    return load


_TRITON = "sslkern.triton_ops.relation_loss"
dispatch = Dispatch(OP, standard_impls(OP, relation_loss_eager), checks_indices=("cpu",))
dispatch_backward = Dispatch(OP + "_backward", standard_impls(OP + "_backward", relation_loss_backward_eager,
                                                              triton_module=OP))
dispatch_with_grad = Dispatch(OP + "_with_grad", {
    "reference": _forward_then_backward(lambda: relation_loss_eager, lambda: relation_loss_backward_eager),
    "cpu": ext_op("relation_loss_with_grad_cpu"),
    "triton": _forward_then_backward(module_attr(_TRITON, "relation_loss_triton"),
                                     module_attr(_TRITON, "relation_loss_backward_triton")),
}, checks_indices=("cpu",))


@torch.library.custom_op("sslkern::relation_loss", mutates_args=())
def _relation_loss_op(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, table: Optional[torch.Tensor], grid_w: int,
                      cells: int, classes: int, scale: float, smoothing: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch(q.device, backend)(q, k, pos, table, grid_w, cells, classes, scale, smoothing)


@_relation_loss_op.register_fake
def _(q, k, pos, table, grid_w, cells, classes, scale, smoothing, backend):
    return q.new_empty((), dtype=acc_dtype(q)), q.new_empty((), dtype=acc_dtype(q))


@torch.library.custom_op("sslkern::relation_loss_backward", mutates_args=())
def _relation_loss_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor,
                               table: Optional[torch.Tensor], grid_w: int, cells: int, classes: int, scale: float,
                               smoothing: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch_backward(q.device, backend)(grad, q, k, pos, table, grid_w, cells, classes, scale, smoothing)


@_relation_loss_backward_op.register_fake
def _(grad, q, k, pos, table, grid_w, cells, classes, scale, smoothing, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, pos, table, grid_w, cells, classes, scale, smoothing, backend = inputs
    ctx.save_for_backward(q, k, pos, table)
    ctx.args = (grid_w, cells, classes, scale, smoothing, backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, g_loss, g_acc):
    q, k, pos, table = ctx.saved_tensors
    if g_loss is None:
        return (None,) * 10
    dq, dk = torch.ops.sslkern.relation_loss_backward(g_loss, q, k, pos, table, *ctx.args)
    return (dq, dk) + (None,) * 8


_relation_loss_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("sslkern::relation_loss_with_grad", mutates_args=())
def _relation_loss_with_grad_op(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, table: Optional[torch.Tensor],
                                grid_w: int, cells: int, classes: int, scale: float, smoothing: float,
                                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch_with_grad(q.device, backend)(q, k, pos, table, grid_w, cells, classes, scale, smoothing)


@_relation_loss_with_grad_op.register_fake
def _(q, k, pos, table, grid_w, cells, classes, scale, smoothing, backend):
    acc = acc_dtype(q)
    return (q.new_empty((), dtype=acc), q.new_empty((), dtype=acc),
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


# q (input 0) and k (input 1) get dq and dk (outputs 2, 3) times the incoming gradient
register_saved_gradients(_relation_loss_with_grad_op, OP, lambda inputs: {0: 2, 1: 3})


class _CPUProjections(torch.autograd.Function):
    """``q = z·Wqᵀ``, ``k = z·Wkᵀ`` for fp32 CPU tensors in eager mode: the forward products on
    torch's oneDNN linear (faster than MKL's ``F.linear`` at RelViT's size on the CPUs measured,
    docs/design.md), the backward on MKL with the two parts of dz summed by ``addmm`` (no separate add):
    ``dz = dq·Wq + dk·Wk``, ``dWq = dqᵀ·z``, ``dWk = dkᵀ·z``. Same products as ``F.linear``;
    only the summation order inside the GEMMs differs (fp32 rounding)."""

    @staticmethod
    def forward(ctx, z, w_q, w_k, linear):
        ctx.save_for_backward(z, w_q, w_k)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zero GEMMs)
        return linear(z, w_q, None, "none", [], ""), linear(z, w_k, None, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq, dk):
        z, w_q, w_k = ctx.saved_tensors
        D = z.shape[-1]
        z2 = z.reshape(-1, D)
        dq2 = None if dq is None else dq.reshape(-1, dq.shape[-1])
        dk2 = None if dk is None else dk.reshape(-1, dk.shape[-1])
        dz = dwq = dwk = None
        if ctx.needs_input_grad[0]:
            if dq2 is not None and dk2 is not None:
                dz = torch.addmm(dq2 @ w_q, dk2, w_k)
            elif dq2 is not None:
                dz = dq2 @ w_q
            elif dk2 is not None:
                dz = dk2 @ w_k
            if dz is not None:
                dz = dz.view(z.shape)
        if ctx.needs_input_grad[1] and dq2 is not None:
            dwq = dq2.t() @ z2
        if ctx.needs_input_grad[2] and dk2 is not None:
            dwk = dk2.t() @ z2
        return dz, dwq, dwk, None


def _projections(z: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z·Wqᵀ, z·Wkᵀ), contiguous, differentiable; z (B, N, D), w (H, D)."""
    linear = cpu_dnn_linear() if z.device.type == "cpu" and z.dtype == torch.float32 else None
    if linear is not None and not torch.compiler.is_compiling():
        return _CPUProjections.apply(z.contiguous(), w_q.contiguous(), w_k.contiguous(), linear)
    return F.linear(z, w_q).contiguous(), F.linear(z, w_k).contiguous()


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------
_TABLES: dict = {}


def regression_table(kind: str, side: int, device: torch.device) -> torch.Tensor:
    """RelViT's (G, G) fp32 ``create_dist_matrix`` / ``create_angle_matrix`` for a side × side grid (cached)."""
    key = (kind, side, str(device))
    t = _TABLES.get(key)
    if t is None:
        t = (relvit_dist_matrix if kind == "distance" else relvit_angle_matrix)(side).to(torch.float32)
        t = _TABLES[key] = t.contiguous().to(device)
    return t


def _weights(name: str, w, D: int, dtype, device, classes: Optional[int]):
    check_tensor(OP, name, w, dtypes=FLOAT_DTYPES, ndim=(2, 3), device=device)
    if w.dtype != dtype:
        fail(OP, f"{name} expected dtype {dtype_name(dtype)} (tokens' dtype), got {dtype_name(w.dtype)}", TypeError)
    if w.dim() == 2:
        w = w.unsqueeze(0)
    if w.shape[-1] != D or (classes is not None and w.shape[0] != classes) or w.shape[1] == 0:
        want = f"({classes}, d_head, {D})" if classes is not None else f"(1, d_head, {D}) or (d_head, {D})"
        fail(OP, f"{name} expected shape {want}, got {tuple(w.shape)}")
    return w


def relation_loss(
    tokens: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    *,
    grid=None,
    distance: Optional[tuple] = None,
    angle: Optional[tuple] = None,
    label_smoothing: float = 0.0,
    num_prefix_tokens: int = 0,
    backend: Optional[str] = None,
) -> RelationLosses:
    r"""RelViT's spatial-relation loss over every pair of patch tokens, fused.

    ``x_c(i, j) = (z_i·Wq_cᵀ)·(z_j·Wk_cᵀ)/√d_head`` for the 9 relation classes c, and
    ``relation = mean_{b,i,j} CE(x(i, j), y_ij)`` with ``y_ij`` where token i's grid cell lies
    relative to token j's (0 LU, 1 CU, 2 RU, 3 LC, 4 CC, 5 RC, 6 LD, 7 CD, 8 RD; row index grows
    downwards): RelViT ``F.cross_entropy(out['rel'], batch['relations'])``.

    Args:
        tokens: (B, P + N, D) token features (RelViT: the backbone's ``z_patches``); the first
            ``num_prefix_tokens`` P (CLS) are skipped. fp32, bf16, fp16 or fp64.
        wq, wk: (9, d_head, D) the per-class query / key weights of RelViT's
            ``MultiHeadAttentionScores(D, 9)`` (``torch.stack([h.q_lin.weight for h in heads])``;
            d_head = D // 9 there), tokens' dtype and device.
        positions: (B, N) integer grid cell (row-major index) of each token, in [0, cells)
            — the patch index before the shuffle (RelViT's ``idx_shuffle``). Default: token t
            at cell t (needs N = cells).
        grid: grid side (int) or (rows, cols); default a square grid of N cells.
        distance, angle: optional ``(wq, wk)`` pairs of shape (1, d, D) or (d, D) (RelViT's
            one-head ``dist_head`` / ``angle_head``, d = D): adds ``F.mse_loss`` of their
            scores against RelViT's distance / angle matrices (square grid only).
        label_smoothing: s of RelViT's ``utils.cross_entropy``:
            ``(1 − s)·nll + s·mean_c(−log p_c)`` (its loss dropout is not implemented).
        num_prefix_tokens: leading tokens to skip (CLS, registers).
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Returns:
        ``RelationLosses(loss, relation, distance, angle, accuracy)``: 0-dim fp32 tensors (fp64
        for fp64 inputs); ``loss`` = the sum of the terms given (RelViT adds them with weight 1),
        ``distance`` / ``angle`` None when off, ``accuracy`` the fraction of pairs whose argmax
        class is the label (no gradient). Gradients flow to ``tokens`` and every weight.

    Given positions are checked here, with one reduction and one host sync (an ``IndexError``
    naming ``positions``); the C++ kernel checks every value itself, so CPU calls skip that pass.
    """
    check_tensor(OP, "tokens", tokens, dtypes=FLOAT_DTYPES, ndim=3)
    device, dtype = tokens.device, tokens.dtype
    num_prefix_tokens = check_int(OP, "num_prefix_tokens", num_prefix_tokens, 0)
    B, L, D = tokens.shape
    N = L - num_prefix_tokens
    if B == 0 or N <= 0 or D == 0:
        fail(OP, f"tokens expected (B, {num_prefix_tokens} + N, D) with B, N, D > 0, got shape {tuple(tokens.shape)}")
    wq = _weights("wq", wq, D, dtype, device, NUM_RELATIONS)
    wk = _weights("wk", wk, D, dtype, device, NUM_RELATIONS)
    if wk.shape != wq.shape:
        fail(OP, f"wk expected shape {tuple(wq.shape)} (wq's), got {tuple(wk.shape)}")
    if grid is None:
        side = math.isqrt(N)
        if side * side != N:
            fail(OP, f"grid expected when N = {N} is not a square (tokens' patch count after the prefix)")
        gh = gw = side
    elif isinstance(grid, int) and not isinstance(grid, bool):
        gh = gw = grid
    elif isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) for g in grid):
        gh, gw = grid
    else:
        fail(OP, f"grid expected an int or (rows, cols), got {grid!r}", TypeError)
    if gh <= 0 or gw <= 0:
        fail(OP, f"grid expected positive sizes, got {grid!r}")
    cells = gh * gw
    if positions is None:
        if N != cells:
            fail(OP, f"positions expected when N = {N} differs from the grid's {cells} cells")
        positions = torch.arange(N, device=device).expand(B, N).contiguous()
    else:
        check_tensor(OP, "positions", positions, dtypes=INDEX_DTYPES, shape=(B, N), device=device)
        positions = positions.to(torch.int64).contiguous()
        if dispatch.needs_index_check(device, backend):
            check_index_values(OP, "positions", positions, cells, meaning=" (grid cells)")
    label_smoothing = check_float(OP, "label_smoothing", label_smoothing, 0.0, 1.0)
    regs = {}
    for name, pair in (("distance", distance), ("angle", angle)):
        if pair is None:
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            fail(OP, f"{name} expected a (wq, wk) pair of weights, got {type(pair).__name__}", TypeError)
        a = _weights(f"{name}[0]", pair[0], D, dtype, device, None)
        b = _weights(f"{name}[1]", pair[1], D, dtype, device, None)
        if a.shape[0] != 1 or b.shape != a.shape:
            fail(OP, f"{name} expected two weights of one shape (1, d, {D}), got {tuple(a.shape)} and {tuple(b.shape)}")
        if gh != gw or cells < 2:
            fail(OP, f"{name} expected a square grid of at least 2x2 (RelViT's matrices), got {gh}x{gw}")
        regs[name] = (a, b)
    backend = backend or ""

    z = tokens[:, num_prefix_tokens:]
    # fp16 / bf16 tokens on a CPU without native half GEMMs (no AVX512-BF16 / AMX-FP16):
    # the projections run in fp32 (bf16 in, fp32 accumulate, as the reference does), since
    # torch emulates half GEMMs there, far slower than fp32 (docs/design.md, *Fast paths*)
    upcast = z.device.type == "cpu" and z.dtype in (torch.float16, torch.bfloat16) and not cpu_native_half(z.dtype)

    def term(w_q, w_k, classes, table):
        zz, w_q, w_k = (z.float(), w_q.float(), w_k.float()) if upcast else (z, w_q, w_k)
        q, k = _projections(zz, w_q.reshape(-1, D), w_k.reshape(-1, D))
        scale = 1.0 / math.sqrt(w_q.shape[1])
        args = (q, k, positions, table, gw, cells, classes, scale, label_smoothing, backend)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            # one pass gives the loss and d loss / d(q, k); the backward only scales them
            return torch.ops.sslkern.relation_loss_with_grad(*args)[:2]
        return torch.ops.sslkern.relation_loss(*args)

    rel, accuracy = term(wq, wk, NUM_RELATIONS, None)
    total, out = rel, {}
    for name in ("distance", "angle"):
        out[name] = None
        if name in regs:
            out[name], _ = term(*regs[name], 1, regression_table(name, gw, device))
            total = total + out[name]
    return RelationLosses(total, rel, out["distance"], out["angle"], accuracy)
