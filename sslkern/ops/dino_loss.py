"""``dino_loss``, ``ibot_patch_loss`` — fused teacher softmax + sharpened cross-entropy
over multi-crop pairs (dino ``main_dino.py: DINOLoss``, dinov2 ``iBOTPatchLoss``);
``sinkhorn_knopp_teacher`` and ``koleo_loss``.

Both losses run the one custom op ``torch.ops.sslkern.dino_loss``, which for ``B`` groups
(images, or masked tokens for iBOT), ``V`` student rows and ``T`` teacher rows per group computes

    loss = scale · Σ_b w_b Σ_v Σ_{q paired with v} ( logsumexp(s_v/τs) − Σ_k p_q[k] s_v[k]/τs )

with ``p_q = softmax((t_q − c)/τt)`` (or ``t_q`` itself when the teacher is passed as
probabilities, e.g. Sinkhorn-Knopp), and — in the same pass, without materializing any
probability — the gradient w.r.t. the student logits
``scale·w_b/τs · (n_v softmax(s_v/τs) − Σ_{q paired with v} p_q)`` and the column sum of
the raw teacher logits for the center update. Backward only rescales the stored gradient
(``register_saved_gradients``, Liger cross-entropy style), so the extra memory is
O((V+T)·B) row statistics.

The functions are local to the process: the teacher column sum they return with
``return_teacher_sum=True`` covers this process's rows; ``sslkern.nn.DINOLoss`` /
``IBOTPatchLoss`` all-reduce it for the center update. The Sinkhorn-Knopp teacher is the one
global step (its batch normalisation spans all ranks by definition).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._backend import Dispatch, ext_op, standard_impls
from .._checks import FLOAT_DTYPES, check_choice, check_float, check_int, check_tensor, fail
from ._common import acc_dtype, needs_grad, register_saved_gradients, world_size

OP = "dino_loss"


def crop_layout(op: str, teacher_rows: int, student_rows: int, n_global_crops) -> tuple[int, int, int, int]:
    """DINO's multi-crop layout from the row counts: (T, B, V, n_pairs) for T = n_global_crops
    teacher views and V student views of B images, rows view-major; n_pairs = T·V − min(T, V)
    (same-view pairs skipped). Raises naming the argument when the rows do not fit."""
    T = check_int(op, "n_global_crops", n_global_crops, 1)
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


def ibot_weights(op: str, masks, n_rows: int, check_masks: bool, acc: torch.dtype, device) -> torch.Tensor:
    """iBOT's per-token weights ``1/n_masked(image)`` for the ``n_rows`` masked tokens of
    ``masks`` (B_g, ...) bool, in ``masks.nonzero()`` order; with ``check_masks`` (eager
    only) the count of set entries is checked against ``n_rows`` (one host sync)."""
    check_tensor(op, "masks", masks, dtypes=(torch.bool,), device=device)
    if masks.dim() < 2:
        fail(op, f"masks expected (B_g, L) or (B_g, H, W), got shape {tuple(masks.shape)}")
    check_choice(op, "check_masks", check_masks, (True, False))
    n_masked = masks.flatten(1).sum(-1)
    if check_masks and not torch.compiler.is_compiling() and int(n_masked.sum()) != n_rows:
        fail(op, f"masks expected {n_rows} set entries (one per masked token row), got {int(n_masked.sum())}")
    return torch.repeat_interleave(1.0 / n_masked.clamp(min=1).to(acc), n_masked, output_size=n_rows)


def dino_loss_eager(student, teacher, center, weights, scale, student_temp, teacher_temp, n_student_views,
                    n_teacher_views, skip_same_view, teacher_is_probs, compute_grad, center_sum):
    """The custom op's contract in eager PyTorch (the ``reference`` backend; materializes the
    probabilities)."""
    acc = acc_dtype(student, teacher)
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


dispatch = Dispatch(OP, standard_impls(OP, dino_loss_eager))


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
    return dispatch(student.device, backend)(student, teacher, center, weights, scale, student_temp, teacher_temp,
                                             n_student_views, n_teacher_views, skip_same_view, teacher_is_probs,
                                             compute_grad, center_sum)


@_dino_loss_op.register_fake
def _(student, teacher, center, weights, scale, student_temp, teacher_temp, n_student_views, n_teacher_views,
      skip_same_view, teacher_is_probs, compute_grad, center_sum, backend):
    acc = acc_dtype(student, teacher)
    loss = student.new_empty((), dtype=acc)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    csum = student.new_empty((student.shape[1],) if center_sum else (0,), dtype=acc)
    return loss, grad, csum


# the student (input 0) gets the gradient written in the forward (output 1), when compute_grad
register_saved_gradients(_dino_loss_op, OP, lambda inputs: {0: 1} if inputs[11] else {})


# ---------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------
def _logsumexp_over_batch(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0, across ranks when torch.distributed is initialized."""
    if world_size() == 1:
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


# no Triton / CUDA Sinkhorn: a forced triton / cuda backend (e.g. passed on by dino_loss) takes
# the default rule, which runs the eager iterations on CUDA tensors
sinkhorn_dispatch = Dispatch(
    "sinkhorn_knopp_teacher",
    {"reference": lambda: _sinkhorn_log_domain, "cpu": ext_op("sinkhorn_teacher_cpu")},
    forced_missing="default",
)


@torch.library.custom_op("sslkern::sinkhorn_teacher", mutates_args=())
def _sinkhorn_op(teacher: torch.Tensor, teacher_temp: float, n_iterations: int, keep_last: int,
                 backend: str) -> torch.Tensor:
    return sinkhorn_dispatch(teacher.device, backend)(teacher, teacher_temp, n_iterations, keep_last)


@_sinkhorn_op.register_fake
def _(teacher, teacher_temp, n_iterations, keep_last, backend):
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
    float32 subnormals, whose cost made torch's logsumexp depend on the logit scale);
    elsewhere, and with torch.distributed initialized, the eager log-domain version. The
    batch normalisation then runs over all ranks, as dinov2 does: the one collective in
    sslkern's functional ops, since the Sinkhorn-Knopp assignment is a global one.

    ``keep_last``: return only the last ``keep_last`` rows' probabilities, the equipartition
    still running over every row (swav ``main_swav.py``: the codes of the batch, whose
    Sinkhorn also sees the queue's scores; no (queue, K) output).
    """
    op = "sinkhorn_knopp_teacher"
    check_tensor(op, "teacher", teacher, dtypes=FLOAT_DTYPES, ndim=2)
    teacher_temp = check_float(op, "teacher_temp", teacher_temp, 0.0, None, lo_open=True)
    n_iterations = check_int(op, "n_iterations", n_iterations, 0)
    keep = 0
    if keep_last is not None:
        n = teacher.shape[0]
        keep = check_int(op, "keep_last", keep_last, 1, n)
        keep = 0 if keep == n else keep
    if world_size() > 1:
        return _sinkhorn_log_domain(teacher, teacher_temp, n_iterations, keep)
    return _sinkhorn_op(teacher, teacher_temp, n_iterations, keep, backend or "")


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def _check_common(op, student, teacher, center, student_temp, teacher_temp, teacher_mode, sinkhorn_iterations,
                  return_teacher_sum):
    check_tensor(op, "student", student, dtypes=FLOAT_DTYPES, ndim=2)
    device = student.device
    check_tensor(op, "teacher", teacher, dtypes=FLOAT_DTYPES, ndim=2, device=device)
    K = student.shape[1]
    if teacher.shape[1] != K:
        fail(op, f"teacher expected {K} columns (the student's K), got shape {tuple(teacher.shape)}")
    check_choice(op, "teacher_mode", teacher_mode, ("center", "sinkhorn"))
    if center is not None:
        check_center(op, center, K, device)
    elif teacher_mode == "center":
        fail(op, "center expected a tensor of shape (K,) when teacher_mode='center', got None")
    check_choice(op, "return_teacher_sum", return_teacher_sum, (True, False))
    check_int(op, "sinkhorn_iterations", sinkhorn_iterations, 0)
    return (check_float(op, "student_temp", student_temp, 0.0, None, lo_open=True),
            check_float(op, "teacher_temp", teacher_temp, 0.0, None, lo_open=True))


def check_center(op: str, center, K: int, device) -> None:
    """A (K,) center, or dino's (1, K) / dinov2's (1, 1, K)."""
    check_tensor(op, "center", center, dtypes=FLOAT_DTYPES, device=device)
    if center.numel() != K or center.dim() == 0 or any(d != 1 for d in center.shape[:-1]):
        fail(op, f"center expected shape ({K},) (or (1, {K})), got {tuple(center.shape)}")


def _teacher_input(teacher, center, teacher_temp, teacher_mode, sinkhorn_iterations, backend=None):
    if teacher_mode == "sinkhorn":
        return sinkhorn_knopp_teacher(teacher, teacher_temp, sinkhorn_iterations, backend=backend), None, True
    return teacher.contiguous(), center.reshape(-1).contiguous(), False


def _loss_and_sum(op, student, teacher, center, weights, scale, student_temp, teacher_temp, V, T, skip_same_view,
                  teacher_mode, sinkhorn_iterations, return_teacher_sum, backend):
    t_in, c_in, is_probs = _teacher_input(teacher, center, teacher_temp, teacher_mode, sinkhorn_iterations, backend)
    loss, _, teacher_sum = torch.ops.sslkern.dino_loss(
        student.contiguous(), t_in, c_in, weights, scale, student_temp, teacher_temp, V, T, skip_same_view, is_probs,
        needs_grad(student), return_teacher_sum and not is_probs, backend or "")
    if not return_teacher_sum:
        return loss
    if is_probs:  # the fused sum runs over the raw logits; the Sinkhorn path passes probabilities
        teacher_sum = teacher.detach().to(loss.dtype).sum(0)
    return loss, teacher_sum


def dino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: Optional[torch.Tensor],
    *,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    n_global_crops: int = 2,
    teacher_mode: str = "center",
    sinkhorn_iterations: int = 3,
    return_teacher_sum: bool = False,
    backend: Optional[str] = None,
):
    r"""DINO loss over multi-crop pairs (dino ``main_dino.py: DINOLoss``), fused.

    ``L = 1/P Σ_{q<T} Σ_{v<V, v≠q} mean_b(−Σ_k p_q[b,k] log_softmax(s_v[b]/τs)[k])`` with
    ``p_q = softmax((t_q − c)/τt)`` (``teacher_mode="center"``) or the DINOv2 Sinkhorn-Knopp
    teacher (``"sinkhorn"``, ``sinkhorn_iterations``; ``center`` is then unused and may be
    None), and P = T·V − T the number of pairs with v ≠ q.

    Args:
        student: (V·B, K) logits, crop-major (crop 0's B rows first); fp32, bf16, fp16, fp64.
        teacher: (T·B, K) logits of the T = ``n_global_crops`` global crops; no gradient.
        center: (K,) (or DINO's (1, K)) teacher center; no gradient.
        student_temp, teacher_temp: τs, τt, finite and > 0.
        return_teacher_sum: also return ``Σ_rows teacher`` (K,), the column sum of this
            process's raw teacher logits, computed in the loss pass: DINO's center update is
            ``c ← m·c + (1−m)·all_reduce(Σ)/(T·B·world)`` (``sslkern.nn.DINOLoss`` does it).
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Returns:
        the loss, a 0-dim fp32 tensor (fp64 for fp64 inputs); ``(loss, teacher_sum)`` with
        ``return_teacher_sum`` (fp32 / fp64, detached). Differentiable w.r.t. ``student``
        only: the gradient is computed in the forward pass when ``student`` requires grad
        (stored in its dtype), backward rescales it. Arithmetic is fp32 (fp64 for fp64 inputs).

    NaN: a NaN in a student row gives a NaN loss and a NaN gradient for that row; a NaN in
    a teacher row gives a NaN loss and NaN gradients for the student rows paired with it
    (the same rows as the eager reference). With ``"sinkhorn"`` a NaN spreads over the batch.
    """
    student_temp, teacher_temp = _check_common(OP, student, teacher, center, student_temp, teacher_temp,
                                               teacher_mode, sinkhorn_iterations, return_teacher_sum)
    T, B, V, n_pairs = crop_layout(OP, teacher.shape[0], student.shape[0], n_global_crops)
    return _loss_and_sum(OP, student, teacher, center, None, 1.0 / (n_pairs * B), student_temp, teacher_temp, V, T,
                         True, teacher_mode, sinkhorn_iterations, return_teacher_sum, backend)


def ibot_patch_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    masks: torch.Tensor,
    center: Optional[torch.Tensor],
    *,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    teacher_mode: str = "center",
    sinkhorn_iterations: int = 3,
    return_teacher_sum: bool = False,
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
        return_teacher_sum: also return the column sum of this process's M teacher rows
            (dinov2's patch center is ``m·c + (1−m)·mean over ranks of (Σ/M)``;
            ``sslkern.nn.IBOTPatchLoss`` does it).
    Returns: the loss (0-dim fp32; fp64 for fp64 inputs), or ``(loss, teacher_sum)``.
    """
    op = "ibot_patch_loss"
    student_temp, teacher_temp = _check_common(op, student, teacher, center, student_temp, teacher_temp,
                                               teacher_mode, sinkhorn_iterations, return_teacher_sum)
    M = student.shape[0]
    if teacher.shape[0] != M:
        fail(op, f"teacher expected {M} rows (the student's masked tokens), got {teacher.shape[0]}")
    weights = ibot_weights(op, masks, M, check_masks, acc_dtype(student, teacher), student.device)
    return _loss_and_sum(op, student, teacher, center, weights, 1.0 / masks.shape[0], student_temp, teacher_temp, 1,
                         1, False, teacher_mode, sinkhorn_iterations, return_teacher_sum, backend)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""KoLeo regularizer (dinov2 ``KoLeoLoss``): ``−mean_i log(‖x̂_i − x̂_nn(i)‖ + eps)`` with
    ``x̂ = normalize(x)`` and nn(i) the other row of largest dot product. (N, D), N ≥ 2.
    Plain PyTorch (an (N, N) similarity matrix): N is a per-GPU batch, so this is cheap."""
    check_tensor("koleo_loss", "x", x, dtypes=FLOAT_DTYPES, ndim=2)
    eps = check_float("koleo_loss", "eps", eps, 0.0, None)
    if x.shape[0] < 2:
        fail("koleo_loss", f"x expected at least 2 rows (each needs a neighbour), got {x.shape[0]}")
    xf = F.normalize(x.float() if x.dtype != torch.float64 else x, eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = xf @ xf.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: never pick oneself
        nn_idx = dots.argmax(dim=1)
    distances = F.pairwise_distance(xf, xf[nn_idx], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
