"""``gather_tokens`` / ``restore_tokens`` — Triton kernels.

Every kernel works on a ``ROWS × BLOCK_D`` tile of output rows: it computes each row's
source row from the index tensor (prefix rows copy themselves), loads the tile with one
gathered 2-D access (contiguous along D, so loads/stores vectorize to 16 bytes), adds the
position rows in fp32 and stores once. The clone batch is an index computation, never a
copy. Backward of gather writes each kept row's gradient into an fp32 buffer: plain stores
when every destination has one writer (``unique``: the public function found no repeated
index), relaxed fp32 atomics otherwise (tokens kept by several clone masks add up), and a
deterministic ``index_add_`` instead when ``torch.are_deterministic_algorithms_enabled()``.
Backward of restore is a scatter of visible rows (one writer each: plain stores) plus a
relaxed atomic add per tile for the mask token's gradient (a ``torch.sum`` in deterministic
mode). Position-embedding gradients are a separate batch reduction (``sum(0)``), never
atomics.

Index values are validated once by the public functions (one device reduction and a host
sync, skipped with ``check_indices=False``); the launchers never sync, and the kernels mask
any out-of-range row, so no access leaves the tensors even without the check.
``ids_restore`` is only range checked on CUDA (a permutation check would cost a sort): see
``restore_tokens``' docstring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16
BLOCK_D = 128
NUM_WARPS = 4

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


@triton.jit
def _gather_source(r, row_ok, ids_ptr, B, M, Nk, L, P, MASK_MAJOR: tl.constexpr):
    """Output row r of gather_tokens (P prefix rows, then Nk kept rows, per clone) -> its image b,
    its source row s in x (0 where invalid) and whether that source is valid (in range)."""
    Lo = P + Nk
    row = r // Lo
    t = r % Lo
    if MASK_MAJOR:
        b = row % B
        m = row // B
    else:
        b = row // M
        m = row % M
    patch = t >= P
    k = tl.load(ids_ptr + ((b * M + m) * Nk + (t - P)).to(tl.int64), mask=row_ok & patch, other=0)
    s = tl.where(patch, P + k, t)
    ok = row_ok & (s >= 0) & (s < L)
    return b, tl.where(ok, s, 0), ok


@triton.jit
def _restore_source(r, row_ok, ids_ptr, N, Nk, P):
    """Output row r of restore_tokens (P prefix rows, then N patch rows per image) -> image b, token t,
    patch index i = t - P, is-patch flag, its row s in x_vis (0 unless visible), and whether the row
    is visible (prefix, or a patch of rank < Nk) or removed (rank >= Nk); out-of-range ranks are neither."""
    L = P + N
    b = r // L
    t = r % L
    i = t - P
    patch = t >= P
    k = tl.load(ids_ptr + (b * N + i).to(tl.int64), mask=row_ok & patch, other=0)
    k_ok = (k >= 0) & (k < N)
    visible = row_ok & ((~patch) | (k_ok & (k < Nk)))
    removed = row_ok & patch & k_ok & (k >= Nk)
    s = tl.where(visible, tl.where(patch, P + k, t), 0)
    return b, t, i, patch, s, visible, removed


@triton.jit
def gather_rows_kernel(x_ptr, ids_ptr, pos_ptr, out_ptr, B, M, Nk, L, P, D, n_rows,
                       HAS_POS: tl.constexpr, MASK_MAJOR: tl.constexpr, COMPUTE: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = r < n_rows
    d_ok = d < D
    b, s, src_ok = _gather_source(r, row_ok, ids_ptr, B, M, Nk, L, P, MASK_MAJOR)
    ld_mask = src_ok[:, None] & d_ok[None, :]
    src = (b.to(tl.int64) * L + s)[:, None] * D + d[None, :]
    v = tl.load(x_ptr + src, mask=ld_mask, other=0.0).to(COMPUTE)
    if HAS_POS:
        v += tl.load(pos_ptr + (s.to(tl.int64)[:, None] * D + d[None, :]), mask=ld_mask, other=0.0).to(COMPUTE)
    dst = r.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(out_ptr + dst, v.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def gather_rows_backward_kernel(grad_out_ptr, ids_ptr, grad_x_ptr, B, M, Nk, L, P, D, n_rows,
                                MASK_MAJOR: tl.constexpr, UNIQUE: tl.constexpr,
                                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = r < n_rows
    d_ok = d < D
    b, s, dst_ok = _gather_source(r, row_ok, ids_ptr, B, M, Nk, L, P, MASK_MAJOR)
    g = tl.load(grad_out_ptr + (r.to(tl.int64)[:, None] * D + d[None, :]), mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(grad_x_ptr.dtype.element_ty)
    dst = (b.to(tl.int64) * L + s)[:, None] * D + d[None, :]
    if UNIQUE:  # one writer per destination: a plain store
        tl.store(grad_x_ptr + dst, g, mask=dst_ok[:, None] & d_ok[None, :])
    else:  # clone masks may keep the same token: add up; no ordering needed, so relaxed
        tl.atomic_add(grad_x_ptr + dst, g, mask=dst_ok[:, None] & d_ok[None, :], sem="relaxed")


@triton.jit
def restore_rows_kernel(x_vis_ptr, ids_ptr, mask_token_ptr, fill_ptr, pos_ptr, out_ptr, N, Nk, P, D, n_rows,
                        HAS_FILL: tl.constexpr, HAS_POS: tl.constexpr, COMPUTE: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = r < n_rows
    d_ok = d < D
    Lv = P + Nk
    b, t, i, patch, s, visible, removed = _restore_source(r, row_ok, ids_ptr, N, Nk, P)
    b64 = b.to(tl.int64)
    dm = d_ok[None, :]
    v = tl.load(x_vis_ptr + ((b64 * Lv + s)[:, None] * D + d[None, :]), mask=visible[:, None] & dm,
                other=0.0).to(COMPUTE)
    if HAS_FILL:
        f = tl.load(fill_ptr + ((b64 * N + tl.where(removed, i, 0))[:, None] * D + d[None, :]),
                    mask=removed[:, None] & dm, other=0.0).to(COMPUTE)
    else:
        f = tl.load(mask_token_ptr + d, mask=d_ok, other=0.0).to(COMPUTE)[None, :]
    v = tl.where(removed[:, None], f, v)
    if HAS_POS:
        v += tl.load(pos_ptr + (t.to(tl.int64)[:, None] * D + d[None, :]), mask=row_ok[:, None] & dm,
                     other=0.0).to(COMPUTE)
    tl.store(out_ptr + (r.to(tl.int64)[:, None] * D + d[None, :]), v.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dm)


@triton.jit
def restore_rows_backward_kernel(grad_out_ptr, ids_ptr, grad_vis_ptr, grad_fill_ptr, grad_mt_ptr,
                                 N, Nk, P, D, n_rows, NEED_FILL: tl.constexpr, NEED_MT: tl.constexpr,
                                 ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = r < n_rows
    d_ok = d < D
    dm = d_ok[None, :]
    Lv = P + Nk
    b, t, i, patch, s, visible, removed = _restore_source(r, row_ok, ids_ptr, N, Nk, P)
    b64 = b.to(tl.int64)
    g = tl.load(grad_out_ptr + (r.to(tl.int64)[:, None] * D + d[None, :]), mask=row_ok[:, None] & dm, other=0.0)
    tl.store(grad_vis_ptr + ((b64 * Lv + s)[:, None] * D + d[None, :]), g, mask=visible[:, None] & dm)
    if NEED_FILL:
        fill_row = row_ok & patch
        gf = tl.where(removed[:, None], g, tl.zeros_like(g))
        tl.store(grad_fill_ptr + ((b64 * N + tl.where(fill_row, i, 0))[:, None] * D + d[None, :]), gf,
                 mask=fill_row[:, None] & dm)
    if NEED_MT:
        part = tl.sum(tl.where(removed[:, None], g.to(grad_mt_ptr.dtype.element_ty), 0.0), axis=0)
        tl.atomic_add(grad_mt_ptr + d, part, mask=d_ok, sem="relaxed")


# ---------------------------------------------------------------------------------------
def _compute(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grid(n_rows, D):
    return (triton.cdiv(n_rows, ROWS), triton.cdiv(D, BLOCK_D))


def gather_tokens_triton(x, ids_keep, pos_embed, num_prefix_tokens, mask_major):
    B, L, D = x.shape
    _, M, Nk = ids_keep.shape
    P = num_prefix_tokens
    out = torch.empty(B * M, P + Nk, D, dtype=x.dtype, device=x.device)
    n_rows = B * M * (P + Nk)
    if out.numel():
        gather_rows_kernel[_grid(n_rows, D)](
            x, ids_keep, pos_embed if pos_embed is not None else x, out, B, M, Nk, L, P, D, n_rows,
            HAS_POS=pos_embed is not None, MASK_MAJOR=bool(mask_major), COMPUTE=_compute(x.dtype),
            ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return out


def gather_destinations(ids_keep, num_tokens, num_prefix_tokens, mask_major):
    """Flat destination row ``b·L + s`` in grad_x of every row of grad_out (B·M·(P + Nk),),
    or -1 for an out-of-range index (dropped, as the kernels do)."""
    B, M, Nk = ids_keep.shape
    P, L = num_prefix_tokens, num_tokens
    dev = ids_keep.device
    src = torch.cat([torch.arange(P, device=dev).expand(B, M, P), ids_keep + P], dim=2)  # (B, M, P + Nk)
    ok = (src >= 0) & (src < L) & ((src >= P) | (torch.arange(P + Nk, device=dev) < P))
    dst = torch.where(ok, src + torch.arange(B, device=dev).view(B, 1, 1) * L, -1)
    return (dst.transpose(0, 1) if mask_major else dst).reshape(-1)


def gather_tokens_backward_deterministic(grad_out, ids_keep, num_tokens, num_prefix_tokens, mask_major):
    """fp32 (fp64) grad_x by ``index_add_``, deterministic on CUDA in deterministic mode."""
    B = ids_keep.shape[0]
    D = grad_out.shape[2]
    dst = gather_destinations(ids_keep, num_tokens, num_prefix_tokens, mask_major)
    keep = dst >= 0
    grad_x = torch.zeros(B * num_tokens, D, dtype=_acc(grad_out.dtype), device=grad_out.device)
    rows = grad_out.reshape(-1, D)
    grad_x.index_add_(0, dst[keep], rows[keep].to(grad_x.dtype))
    return grad_x.view(B, num_tokens, D)


def gather_tokens_backward_triton(grad_out, ids_keep, num_tokens, num_prefix_tokens, mask_major, need_pos, unique):
    B, M, Nk = ids_keep.shape
    D = grad_out.shape[2]
    P = num_prefix_tokens
    # prefix rows of several clones land on one row too, so "unique" needs M == 1 or P == 0
    unique = bool(unique) and (M == 1 or P == 0)
    n_rows = B * M * (P + Nk)
    if not unique and torch.are_deterministic_algorithms_enabled():
        grad_x = gather_tokens_backward_deterministic(grad_out, ids_keep, num_tokens, P, mask_major)
    else:
        grad_x = torch.zeros(B, num_tokens, D, dtype=_acc(grad_out.dtype), device=grad_out.device)
        if n_rows and D:
            gather_rows_backward_kernel[_grid(n_rows, D)](
                grad_out, ids_keep, grad_x, B, M, Nk, num_tokens, P, D, n_rows,
                MASK_MAJOR=bool(mask_major), UNIQUE=unique, ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    # the position embedding's gradient is the batch sum of grad_x: a reduction, not atomics
    grad_pos = grad_x.sum(0).to(grad_out.dtype) if need_pos else grad_out.new_empty(0)
    return grad_x.to(grad_out.dtype), grad_pos


def restore_tokens_triton(x_vis, ids_restore, mask_token, fill, pos_embed, num_prefix_tokens):
    B, Lv, D = x_vis.shape
    N = ids_restore.shape[1]
    P = num_prefix_tokens
    out = torch.empty(B, P + N, D, dtype=x_vis.dtype, device=x_vis.device)
    n_rows = B * (P + N)
    if out.numel():
        restore_rows_kernel[_grid(n_rows, D)](
            x_vis, ids_restore, mask_token if mask_token is not None else x_vis,
            fill if fill is not None else x_vis, pos_embed if pos_embed is not None else x_vis, out,
            N, Lv - P, P, D, n_rows, HAS_FILL=fill is not None, HAS_POS=pos_embed is not None,
            COMPUTE=_compute(x_vis.dtype), ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return out


def restore_mask_token_grad(grad_out, ids_restore, num_visible, num_prefix_tokens):
    """Sum of grad_out over the removed slots (rank >= Nk), fp32 (fp64): a plain reduction."""
    P = num_prefix_tokens
    removed = (ids_restore >= num_visible) & (ids_restore < ids_restore.shape[1])
    g = grad_out[:, P:].to(_acc(grad_out.dtype))
    return torch.where(removed.unsqueeze(-1), g, 0).sum((0, 1))


def restore_tokens_backward_triton(grad_out, ids_restore, num_visible, num_prefix_tokens, need_mask_token, need_fill,
                                   need_pos):
    B, N = ids_restore.shape
    D = grad_out.shape[2]
    P, Nk = num_prefix_tokens, num_visible
    deterministic = torch.are_deterministic_algorithms_enabled()
    # zeros: a rank that never appears (not a permutation) leaves a zero gradient row
    grad_vis = torch.zeros(B, P + Nk, D, dtype=grad_out.dtype, device=grad_out.device)
    grad_fill = torch.empty(B, N, D, dtype=grad_out.dtype, device=grad_out.device) if need_fill \
        else grad_out.new_empty(0)
    atomic_mt = need_mask_token and not deterministic
    grad_mt = torch.zeros(D if atomic_mt else 0, dtype=_acc(grad_out.dtype), device=grad_out.device)
    n_rows = B * (P + N)
    if n_rows and D:
        restore_rows_backward_kernel[_grid(n_rows, D)](
            grad_out, ids_restore, grad_vis, grad_fill if need_fill else grad_vis,
            grad_mt if atomic_mt else grad_vis, N, Nk, P, D, n_rows,
            NEED_FILL=bool(need_fill), NEED_MT=bool(atomic_mt), ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    if need_mask_token and not atomic_mt:
        grad_mt = restore_mask_token_grad(grad_out, ids_restore, Nk, P)
    grad_pos = grad_out.to(_acc(grad_out.dtype)).sum(0).to(grad_out.dtype) if need_pos else grad_out.new_empty(0)
    return (grad_vis, (grad_mt.to(grad_out.dtype) if need_mask_token else grad_out.new_empty(0)), grad_fill, grad_pos)


# ---------------------------------------------------------------------------------------
# Integer arguments that are multiples of 16 at the benchmark sizes (D = 384 / 768): a real
# launch specialises them (tt.divisibility = 16), so the GPU report compiles them so too.
AOT_DIVISIBLE = ("D",)
# Every configuration the launchers can pick, for the GPU report (compiled ahead of time).
_DT = [("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16), ("fp64", tl.float64)]
_BASE = dict(ROWS=ROWS, BLOCK_D=BLOCK_D)
_INTS = ["B", "M", "Nk", "L", "P", "D", "n_rows"]


def _sig(ptrs: dict, ints: list) -> dict:
    return {**ptrs, **{n: "i32" for n in ints}}


AOT_CONFIGS = (
    [dict(name=f"gather_rows_kernel {n} pos={hp} mask_major={mm}", kernel=gather_rows_kernel,
          signature=_sig({"x_ptr": f"*{n}", "ids_ptr": "*i64", "pos_ptr": f"*{n}", "out_ptr": f"*{n}"}, _INTS),
          constexprs={"HAS_POS": hp, "MASK_MAJOR": mm, "COMPUTE": tl.float64 if n == "fp64" else tl.float32, **_BASE},
          num_warps=NUM_WARPS, num_stages=3)
     for n, _ in _DT for hp in (False, True) for mm in (False, True)]
    + [dict(name=f"gather_rows_backward_kernel {n} mask_major={mm} unique={un}", kernel=gather_rows_backward_kernel,
            signature=_sig({"grad_out_ptr": f"*{n}", "ids_ptr": "*i64",
                            "grad_x_ptr": "*fp64" if n == "fp64" else "*fp32"}, _INTS),
            constexprs={"MASK_MAJOR": mm, "UNIQUE": un, **_BASE}, num_warps=NUM_WARPS, num_stages=3)
       for n, _ in _DT for mm in (False, True) for un in (False, True)]
    + [dict(name=f"restore_rows_kernel {n} fill={hf} pos={hp}", kernel=restore_rows_kernel,
            signature=_sig({"x_vis_ptr": f"*{n}", "ids_ptr": "*i64", "mask_token_ptr": f"*{n}", "fill_ptr": f"*{n}",
                            "pos_ptr": f"*{n}", "out_ptr": f"*{n}"}, ["N", "Nk", "P", "D", "n_rows"]),
            constexprs={"HAS_FILL": hf, "HAS_POS": hp, "COMPUTE": tl.float64 if n == "fp64" else tl.float32, **_BASE},
            num_warps=NUM_WARPS, num_stages=3)
       for n, _ in _DT for hf in (False, True) for hp in (False, True)]
    + [dict(name=f"restore_rows_backward_kernel {n} fill={nf} mask_token={nm}",
            kernel=restore_rows_backward_kernel,
            signature=_sig({"grad_out_ptr": f"*{n}", "ids_ptr": "*i64", "grad_vis_ptr": f"*{n}",
                            "grad_fill_ptr": f"*{n}",
                            "grad_mt_ptr": ("*fp64" if n == "fp64" else "*fp32") if nm else f"*{n}"},
                           ["N", "Nk", "P", "D", "n_rows"]),
            constexprs={"NEED_FILL": nf, "NEED_MT": nm, **_BASE}, num_warps=NUM_WARPS, num_stages=3)
       # fill and mask_token are exclusive (restore_tokens takes exactly one), so never both
       for n, _ in _DT for nf, nm in ((False, False), (True, False), (False, True))]
)
