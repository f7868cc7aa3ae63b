"""``dino_loss``, ``ibot_patch_loss`` — fused teacher softmax + sharpened cross-entropy
over multi-crop pairs (SPEC section 2); ``sinkhorn_knopp_teacher`` and ``koleo_loss``.

Both losses run the one custom op ``torch.ops.sslkern.dino_loss``, which for ``B`` groups
(images, or masked tokens for iBOT), ``V`` student rows and ``T`` teacher rows per group computes

    loss = scale · Σ_b w_b Σ_v Σ_{q paired with v} ( logsumexp(s_v/τs) − Σ_k p_q[k] s_v[k]/τs )

with ``p_q = softmax((t_q − c)/τt)`` (or ``t_q`` itself when the teacher is passed as
probabilities, e.g. Sinkhorn-Knopp), and — in the same pass, without materializing any
probability — the gradient w.r.t. the student logits
``scale·w_b/τs · (n_v softmax(s_v/τs) − Σ_{q paired with v} p_q)`` and the column sum of
the raw teacher logits for the center update. Backward only rescales the stored gradient
(Liger cross-entropy style), so the extra memory is O((V+T)·B) row statistics.
"""
from __future__ import annotations

import math
import operator

from typing import Optional

import torch
import torch.nn.functional as F

from .._backend import Dispatch, ext_op, module_attr, requested_backend
from .._checks import check_choice, check_range, check_tensor, fail

OP = "dino_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def crop_layout(op: str, teacher_rows: int, student_rows: int, n_global_crops) -> tuple[int, int, int, int]:
    """DINO's multi-crop layout from the row counts: (T, B, V, n_pairs) for T = n_global_crops
    teacher views and V student views of B images, rows view-major; n_pairs = T·V − min(T, V)
    (same-view pairs skipped). Raises naming the argument when the rows do not fit."""
    T = int(n_global_crops)
    if T < 1:
        fail(op, f"n_global_crops expected >= 1, got {n_global_crops}")
    if teacher_rows % T:
        fail(op, f"teacher expected T·B rows with T = n_global_crops = {T}, got {teacher_rows} rows")
    B = teacher_rows // T
    if B == 0 or student_rows % B:
        fail(op, f"student expected V·B rows with B = {B} images (teacher rows / n_global_crops), "
                 f"got {student_rows} rows")
    V = student_rows // B
    n_pairs = T * V - min(T, V)
    if n_pairs <= 0:
        fail(op, f"no (teacher, student) pairs with different views: {T} teacher and {V} student crops "
                 f"(same-view pairs are skipped); pass the local crops too")
    return T, B, V, n_pairs


def _reference_impl(student, teacher, center, weights, scale, student_temp, teacher_temp, n_student_views,
                    n_teacher_views, skip_same_view, teacher_is_probs, compute_grad, center_sum):
    """The custom op's contract in eager PyTorch (materializes probabilities)."""
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    B = student.shape[0] // n_student_views
    K = student.shape[1]
    with torch.no_grad():
        if teacher_is_probs:
            p = teacher.to(acc)
        else:
            p = F.softmax((teacher.to(acc) - center.to(acc)) / teacher_temp, dim=-1)
    p = p.view(n_teacher_views, B, K)
    w = torch.full((B,), scale, dtype=acc, device=student.device)
    if weights is not None:
        w = w * weights.to(acc)
    # Custom-op bodies run below autograd, so the gradient is written out:
    # d/ds_v = w_b/τs · (n_v softmax(s_v/τs) − Σ_{q paired with v} p_q).
    logq = F.log_softmax(student.to(acc) / student_temp, dim=-1).view(n_student_views, B, K)
    total = torch.zeros((), dtype=acc, device=student.device)
    grad = torch.zeros_like(logq) if compute_grad else None
    for v in range(n_student_views):
        for q in range(n_teacher_views):
            if skip_same_view and q == v:
                continue
            total = total + (w * -(p[q] * logq[v]).sum(-1)).sum()
            if compute_grad:
                grad[v] += (w / student_temp).unsqueeze(-1) * (logq[v].exp() - p[q])
    grad = grad.reshape(student.shape).to(student.dtype) if compute_grad else student.new_empty(0)
    csum = teacher.to(acc).sum(0) if center_sum else student.new_empty(0, dtype=acc)
    return total.detach(), grad, csum


dispatch = Dispatch(
    OP,
    {
        "reference": lambda: _reference_impl,
        "cpu": ext_op("dino_loss_cpu"),
        "triton": module_attr("sslkern.triton_ops.dino_loss", "dino_loss_triton"),
    },
)


@torch.library.custom_op("sslkern::dino_loss", mutates_args=())
def _dino_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    scale: float,
    student_temp: float,
    teacher_temp: float,
    n_student_views: int,
    n_teacher_views: int,
    skip_same_view: bool,
    teacher_is_probs: bool,
    compute_grad: bool,
    center_sum: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = dispatch(student.device, backend)
    loss, grad, csum = fn(student, teacher, center, weights, scale, student_temp, teacher_temp, n_student_views,
                          n_teacher_views, skip_same_view, teacher_is_probs, compute_grad, center_sum)
    return loss, grad, csum


@_dino_loss_op.register_fake
def _(student, teacher, center, weights, scale, student_temp, teacher_temp, n_student_views, n_teacher_views,
      skip_same_view, teacher_is_probs, compute_grad, center_sum, backend):
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    loss = student.new_empty((), dtype=acc)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    csum = student.new_empty((student.shape[1],) if center_sum else (0,), dtype=acc)
    return loss, grad, csum


def _setup_context(ctx, inputs, output):
    ctx.compute_grad = inputs[11]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no (V·B, K) zeros for the unused outputs' gradients


def _is_eager_cpu_scalar(x: torch.Tensor) -> bool:
    """A real CPU tensor (not traced by torch.compile / AOT autograd): its value can be read."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch._guards.detect_fake_mode((x,)) is None)


def _backward(ctx, g_loss, g_grad, g_csum):
    if not ctx.compute_grad:
        raise RuntimeError("sslkern.dino_loss: backward through a call made without compute_grad "
                           "(the student did not require grad when the loss was computed)")
    (grad,) = ctx.saved_tensors
    if g_loss is None:
        return (None,) * 14
    if _is_eager_cpu_scalar(g_loss) and float(g_loss) == 1.0:
        # the usual case (loss.backward()): the stored gradient is the answer, no copy
        # (Liger cross-entropy does the same); a CPU scalar, so no device sync
        return (grad,) + (None,) * 13
    # Multiply in fp32 (fp64 for fp64) and round once: the upstream scalar of an fp16 step
    # under GradScaler is 65,536 (initial scale), which is inf in fp16 itself.
    acc = torch.float64 if torch.float64 in (grad.dtype, g_loss.dtype) else torch.float32
    return (torch.mul(grad.to(acc), g_loss.to(device=grad.device, dtype=acc)).to(grad.dtype),) + (None,) * 13


_dino_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------
def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _logsumexp_over_batch(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0, across ranks when torch.distributed is initialized."""
    if _world() == 1:
        return torch.logsumexp(x, dim=0, keepdim=True)
    m = x.amax(dim=0, keepdim=True)
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=0, keepdim=True)
    torch.distributed.all_reduce(s)
    return m + torch.log(s)


def _sinkhorn_log_domain(teacher: torch.Tensor, teacher_temp: float, n_iterations: int,
                         keep_last: int = 0) -> torch.Tensor:
    """The eager log-domain Sinkhorn (torch ops; batch normalization across ranks when
    torch.distributed is initialized): the reference backend, GPUs and multi-rank runs.
    ``keep_last > 0``: the probabilities of the last ``keep_last`` rows only."""
    log_q = (teacher if teacher.dtype == torch.float64 else teacher.float()) / teacher_temp
    for _ in range(int(n_iterations)):
        log_q = log_q - _logsumexp_over_batch(log_q)                 # Q /= rowsum (per prototype)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # Q /= colsum (per sample)
    if keep_last:
        log_q = log_q[log_q.shape[0] - keep_last:]
    # probabilities below the smallest normal are 0, not subnormals (each subnormal costs a
    # microcode assist in every later product; at randn x 1 logits / 0.04 most entries are)
    return torch.exp(log_q.masked_fill_(log_q < math.log(torch.finfo(log_q.dtype).tiny), float("-inf")))


sinkhorn_dispatch = Dispatch(
    "sinkhorn_knopp_teacher",
    {"reference": lambda: _sinkhorn_log_domain, "cpu": ext_op("sinkhorn_teacher_cpu")},
)


@torch.library.custom_op("sslkern::sinkhorn_teacher", mutates_args=())
def _sinkhorn_op(teacher: torch.Tensor, teacher_temp: float, n_iterations: int, backend: str,
                 keep_last: int = 0) -> torch.Tensor:
    want = requested_backend(backend)
    if want not in ("reference", "cpu"):  # no triton / cuda Sinkhorn: the default rule
        want = "cpu" if sinkhorn_dispatch._usable("cpu", teacher.device)[0] else "reference"
    return sinkhorn_dispatch(teacher.device, want)(teacher, teacher_temp, n_iterations, keep_last)


@_sinkhorn_op.register_fake
def _(teacher, teacher_temp, n_iterations, backend, keep_last=0):
    rows = keep_last or teacher.shape[0]
    return teacher.new_empty((rows, teacher.shape[1]),
                             dtype=torch.float64 if teacher.dtype == torch.float64 else torch.float32)


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher: torch.Tensor, teacher_temp: float, n_iterations: int = 3, *,
                           keep_last: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    r"""DINOv2 Sinkhorn-Knopp teacher probabilities, (N, K) fp32 (fp64 for fp64) rows summing to 1.

    Same result as dinov2 ``DINOLoss.sinkhorn_knopp_teacher`` (``Q = exp(t/τt)ᵀ``, global
    normalization, then ``n_iterations`` × (prototype rows over the batch, sample columns
    over the prototypes)) wherever that is finite, but computed in the log domain, so
    logits of any size (``t/τt`` ≫ 88) do not overflow. The global scalings of the
    reference cancel exactly and are left out. Probabilities below the smallest normal
    float are exactly 0.

    Backends: on CPU the C++ kernel (two potential vectors, no (N, K) intermediate, no
    float32 subnormals: torch's logsumexp took 3× longer on randn × 3 logits than on
    randn × 0.3 at τt = 0.04); elsewhere, and with torch.distributed initialized (the batch
    normalization then runs over all ranks, as dinov2 does), the eager log-domain version.

    ``keep_last``: return only the last ``keep_last`` rows' probabilities, the equipartition
    still running over every row (swav ``main_swav.py``: the codes of the batch, whose
    Sinkhorn also sees the queue's scores; no (queue, K) output).
    """
    check_tensor("sinkhorn_knopp_teacher", "teacher", teacher, dtypes=_FLOATS, ndim=2)
    check_range("sinkhorn_knopp_teacher", "teacher_temp", float(teacher_temp), 0.0, None, lo_open=True)
    try:
        n_iterations = operator.index(n_iterations)
    except TypeError:
        fail("sinkhorn_knopp_teacher", f"n_iterations expected an int, got {type(n_iterations).__name__}", TypeError)
    if n_iterations < 0:
        fail("sinkhorn_knopp_teacher", f"n_iterations expected an int >= 0, got {n_iterations}")
    keep = 0
    if keep_last is not None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or not 1 <= keep_last <= teacher.shape[0]:
            fail("sinkhorn_knopp_teacher", f"keep_last expected an int in [1, {teacher.shape[0]}] (rows of teacher), "
                                           f"got {keep_last!r}")
        keep = keep_last if keep_last < teacher.shape[0] else 0
    if _world() > 1:
        return _sinkhorn_log_domain(teacher, float(teacher_temp), n_iterations, keep)
    return _sinkhorn_op(teacher, float(teacher_temp), n_iterations, backend or "", keep)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def _check_common(op, student, teacher, center, student_temp, teacher_temp, teacher_mode):
    check_tensor(op, "student", student, dtypes=_FLOATS, ndim=2)
    device = student.device
    check_tensor(op, "teacher", teacher, dtypes=_FLOATS, ndim=2, device=device)
    K = student.shape[1]
    if teacher.shape[1] != K:
        fail(op, f"teacher expected {K} columns (the student's K), got shape {tuple(teacher.shape)}")
    check_choice(op, "teacher_mode", teacher_mode, ("center", "sinkhorn"))
    if center is not None:
        check_tensor(op, "center", center, dtypes=_FLOATS, device=device)
        if center.numel() != K or center.dim() == 0 or any(d != 1 for d in center.shape[:-1]):
            fail(op, f"center expected shape ({K},) (or (1, {K})), got {tuple(center.shape)}")
    elif teacher_mode == "center":
        fail(op, "center expected a tensor of shape (K,) when teacher_mode='center', got None")
    check_range(op, "student_temp", float(student_temp), 0.0, None, lo_open=True)
    check_range(op, "teacher_temp", float(teacher_temp), 0.0, None, lo_open=True)


def _teacher_input(teacher, center, teacher_temp, teacher_mode, sinkhorn_iterations, backend=None):
    if teacher_mode == "sinkhorn":
        return sinkhorn_knopp_teacher(teacher, teacher_temp, sinkhorn_iterations, backend=backend), None, True
    return teacher.contiguous(), center.reshape(-1).contiguous(), False


def _new_center(center, csum, n_rows, center_momentum):
    # Per-rank mean, then the mean over ranks: dino's all-reduced sum / (rows·world) when every
    # rank has the same rows; dinov2's patch center (mean of per-rank token means) otherwise.
    with torch.no_grad():
        batch_center = csum / n_rows
        if _world() > 1:
            torch.distributed.all_reduce(batch_center)
            batch_center = batch_center / _world()
        new = center.reshape(-1).to(csum.dtype) * center_momentum + batch_center * (1 - center_momentum)
        return new.to(center.dtype).reshape(center.shape)


def dino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: Optional[torch.Tensor],
    *,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    n_global_crops: int = 2,
    teacher_mode: str = "center",
    center_momentum: Optional[float] = None,
    sinkhorn_iterations: int = 3,
    backend: Optional[str] = None,
):
    r"""DINO loss over multi-crop pairs (dino ``main_dino.py: DINOLoss``), fused.

    ``L = 1/P Σ_{q<T} Σ_{v<V, v≠q} mean_b(−Σ_k p_q[b,k] log_softmax(s_v[b]/τs)[k])`` with
    ``p_q = softmax((t_q − c)/τt)`` (``teacher_mode="center"``) or the DINOv2 Sinkhorn-Knopp
    teacher (``"sinkhorn"``, ``sinkhorn_iterations``; ``center`` is then only used for the
    optional center update), and P = T·V − T the number of pairs with v ≠ q.

    Args:
        student: (V·B, K) logits, crop-major (crop 0's B rows first); fp32, bf16, fp16, fp64.
        teacher: (T·B, K) logits of the T = ``n_global_crops`` global crops; no gradient.
        center: (K,) (or DINO's (1, K)) teacher center; no gradient.
        student_temp, teacher_temp: τs, τt > 0.
        center_momentum: if given, also return DINO's updated center
            ``m·c + (1−m)·Σ_rows(t)/(T·B·world)`` (batch sum fused into the loss pass and
            all-reduced when torch.distributed is initialized), in ``center``'s shape and dtype.
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Returns:
        the loss, a 0-dim fp32 tensor (fp64 for fp64 inputs); ``(loss, new_center)`` when
        ``center_momentum`` is given. Differentiable w.r.t. ``student`` only: the gradient is
        computed in the forward pass when ``student`` requires grad (stored in its dtype),
        backward rescales it. Arithmetic is fp32 (fp64 for fp64 inputs).

    NaN: a NaN in a student row gives a NaN loss and a NaN gradient for that row; a NaN in
    a teacher row gives a NaN loss and NaN gradients for the student rows paired with it
    (the same rows as the eager reference). With ``"sinkhorn"`` a NaN spreads over the batch.
    """
    _check_common(OP, student, teacher, center, student_temp, teacher_temp, teacher_mode)
    T, B, V, n_pairs = crop_layout(OP, teacher.shape[0], student.shape[0], n_global_crops)
    if center_momentum is not None:
        check_range(OP, "center_momentum", float(center_momentum), 0.0, 1.0)
        if center is None:
            fail(OP, "center expected a tensor when center_momentum is given, got None")
    t_in, c_in, is_probs = _teacher_input(teacher, center, teacher_temp, teacher_mode, sinkhorn_iterations, backend)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    want_sum = center_momentum is not None
    loss, _, csum = torch.ops.sslkern.dino_loss(
        student.contiguous(), t_in, c_in, None, 1.0 / (n_pairs * B), float(student_temp), float(teacher_temp),
        V, T, True, is_probs, compute_grad, want_sum and not is_probs, backend or "")
    if not want_sum:
        return loss
    if is_probs:  # the fused sum runs over the raw logits; the Sinkhorn path passes probabilities
        csum = teacher.to(loss.dtype).sum(0)
    return loss, _new_center(center, csum.detach(), teacher.shape[0], float(center_momentum))


def ibot_patch_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    masks: torch.Tensor,
    center: Optional[torch.Tensor],
    *,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    teacher_mode: str = "center",
    center_momentum: Optional[float] = None,
    sinkhorn_iterations: int = 3,
    check_masks: bool = True,
    backend: Optional[str] = None,
):
    r"""iBOT / DINOv2 masked patch loss (dinov2 ``iBOTPatchLoss.forward_masked``), fused.

    ``L = −1/B_g Σ_tokens w · Σ_k p_t[k] log_softmax(s/τs)[k]`` over the masked tokens,
    ``w = 1/max(n_masked(image), 1)``, ``B_g = masks.shape[0]`` (every global-crop image,
    masked or not), ``p_t = softmax((t − c)/τt)`` or the Sinkhorn-Knopp teacher.

    Args:
        student, teacher: (M, K) logits of the masked patch tokens, in the order of
            ``masks.flatten(1).nonzero()`` (what ``x[masks]`` gives).
        masks: (B_g, ...) bool, M entries set.
        check_masks: check that count (eager mode only): one host sync. ``False`` skips it
            (no sync: CUDA-graph capture); a wrong count then gives wrong per-image weights.
        center: (K,) (or dinov2's (1, 1, K)) patch center.
        center_momentum: if given, also return the updated patch center
            ``m·c + (1−m)·mean_tokens(t)`` (all-reduced across ranks when distributed).
    Returns: the loss (0-dim fp32; fp64 for fp64 inputs), or ``(loss, new_center)``.
    """
    op = "ibot_patch_loss"
    _check_common(op, student, teacher, center, student_temp, teacher_temp, teacher_mode)
    check_tensor(op, "masks", masks, dtypes=(torch.bool,), device=student.device)
    if masks.dim() < 2:
        fail(op, f"masks expected (B_g, L) or (B_g, H, W), got shape {tuple(masks.shape)}")
    M = student.shape[0]
    if teacher.shape[0] != M:
        fail(op, f"teacher expected {M} rows (the student's masked tokens), got {teacher.shape[0]}")
    n_masked = masks.flatten(1).sum(-1)
    if check_masks and not torch.compiler.is_compiling() and int(n_masked.sum()) != M:
        fail(op, f"masks expected {M} set entries (one per masked token row), got {int(n_masked.sum())}")
    if center_momentum is not None:
        check_range(op, "center_momentum", float(center_momentum), 0.0, 1.0)
        if center is None:
            fail(op, "center expected a tensor when center_momentum is given, got None")
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    per_image = 1.0 / n_masked.clamp(min=1).to(acc)
    weights = torch.repeat_interleave(per_image, n_masked, output_size=M)
    t_in, c_in, is_probs = _teacher_input(teacher, center, teacher_temp, teacher_mode, sinkhorn_iterations, backend)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    want_sum = center_momentum is not None
    loss, _, csum = torch.ops.sslkern.dino_loss(
        student.contiguous(), t_in, c_in, weights, 1.0 / masks.shape[0], float(student_temp), float(teacher_temp),
        1, 1, False, is_probs, compute_grad, want_sum and not is_probs, backend or "")
    if not want_sum:
        return loss
    if is_probs:
        csum = teacher.to(loss.dtype).sum(0)
    return loss, _new_center(center, csum.detach(), max(M, 1), float(center_momentum))


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""KoLeo regularizer (dinov2 ``KoLeoLoss``): ``−mean_i log(‖x̂_i − x̂_nn(i)‖ + eps)`` with
    ``x̂ = normalize(x)`` and nn(i) the other row of largest dot product. (N, D), N ≥ 2.
    Plain PyTorch (an (N, N) similarity matrix): N is a per-GPU batch, so this is cheap."""
    check_tensor("koleo_loss", "x", x, dtypes=_FLOATS, ndim=2)
    if x.shape[0] < 2:
        fail("koleo_loss", f"x expected at least 2 rows (each needs a neighbour), got {x.shape[0]}")
    xf = F.normalize(x.float() if x.dtype != torch.float64 else x, eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = xf @ xf.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: never pick oneself
        nn_idx = dots.argmax(dim=1)
    distances = F.pairwise_distance(xf, xf[nn_idx], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
