"""One command that validates a lent GPU: ``python -m sslkern.gpu_check OUT_DIR``.

Runs, within a time budget (``--budget-s``, default 570 s for a 10-minute slot on one H100 /
H200 after ``pip install -e .``), the checks a first GPU run needs, and writes
``OUT_DIR/gpu_check.md`` and ``OUT_DIR/gpu_check.json``:

* ``torch.library.opcheck`` of every ``sslkern::`` custom op on ``triton`` and ``cuda``: the
  arguments are recorded from small calls of every public op (``OP_CASES``, forward and
  backward), and an op that no call reaches is a failure, so a new op cannot be missed;
* the fp16 loss-scale case for every differentiable op (loss × 65,536: finite gradients equal
  to 65,536 × the unscaled ones; ``tests/test_loss_scale.py`` runs the same cases on CPU);
* correctness at GPU sizes against the eager backend: DINO at K = 65,536 in fp32 / bf16 /
  fp16; token gather / restore, data2vec targets + loss and EMA on tensors of more than 2^31
  elements (64-bit offsets); ALiBi attention with B·H > 65,535 (grid axis 0) and on
  sequence-first strided views; tensors on another GPU than the current one (with 2+ GPUs);
* CUDA-graph capture and replay of EMA and of the token ops (``check_indices=False``);
* bitwise repeatability under ``torch.use_deterministic_algorithms(True)``;
* ``compute-sanitizer --tool memcheck`` over ``OP_CASES`` (a child process);
* every recipe (``recipes/*.py``) for 20 steps at ViT-S/16 224 in bf16 on a generated shard set,
  with the sslkern ops and with ``--backend reference``: images/s, data-wait fraction and peak
  memory per run, and the first step's losses of the two backends compared;
* the repository's test suite on the GPU backends (``pytest tests -k "triton or cuda"``) and
  its benchmarks (``pytest bench --benchmark-only``), when the checkout is there (an
  editable install), within what is left of the budget.

``--dry`` runs the same code on CPU at small sizes (Triton through the interpreter,
CUDA-only parts reported as skipped) so CI keeps it working: it opchecks every custom op.
The exit status is 1 if any check failed or errored.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

CHECKS: list[tuple[str, object]] = []


def check(name):
    def deco(fn):
        CHECKS.append((name, fn))
        return fn
    return deco


class Skip(Exception):
    """A check that cannot run here (reason in the message)."""


class Ctx:
    def __init__(self, dry: bool, deadline: float):
        import torch

        self.dry = dry
        self.deadline = deadline
        self.device = torch.device("cpu" if dry else "cuda")
        self.gpu_backends = ["triton"] if dry else [b for b in ("triton", "cuda")]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def size(self, gpu, dry):
        return dry if self.dry else gpu


def _rel(got, want) -> float:
    import torch

    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().clamp_min(1e-30)
    return float((got - want).abs().max() / scale)


def usable(dispatch, backend, device) -> bool:
    return dispatch.usable(backend, device)[0]


def _expect(cond: bool, what: str, failures: list):
    if not cond:
        failures.append(what)


def _sync(ctx):
    import torch

    if not ctx.dry:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Small calls of every op: opcheck coverage, the fp16 loss-scale case, the sanitizer payload
# --------------------------------------------------------------------------------------------
LOSS_SCALE = 65536.0  # GradScaler's initial scale (inf in fp16)


@dataclasses.dataclass
class OpCase:
    """A small call of one public op (or, where the public function never reaches a custom op,
    of the custom op itself). ``build(device, dtype, backend)`` returns ``(leaves, run)``:
    ``run()`` makes the call and returns a scalar loss (None for ops without gradients), whose
    gradients go to ``leaves``. ``dispatches``: the op's ``Dispatch`` tables (``module:attr``),
    which say the backends it has."""
    name: str
    dispatches: tuple[str, ...]
    build: Callable
    dtypes: tuple = ("float32", "float16")

    @property
    def differentiable(self) -> bool:
        return self.name not in _NO_GRAD

    def backends(self) -> tuple[str, ...]:
        import importlib

        mod, attr = self.dispatches[0].split(":")
        return getattr(importlib.import_module(mod), attr).backends


_NO_GRAD = {"ema_update_", "layer_average_targets", "hog_targets", "sinkhorn_knopp_teacher", "render_views",
            "colorization_targets"}


def _gen(seed: int = 0):
    import torch

    return torch.Generator().manual_seed(seed)


def _randn(*shape, device, dtype, scale=1.0, seed=0, grad=False):
    import torch

    x = (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=device, dtype=dtype)
    return x.requires_grad_(grad)


def _weighted(out):
    """A scalar of ``out`` whose gradient is small fixed weights (so 65,536 × it fits fp16)."""
    import torch

    w = (torch.randn(out.shape, generator=_gen(99)) * 1e-2).to(out.device)
    return (out.float() * w).sum()


def _case_ema(device, dtype, backend):
    import torch

    import sslkern

    t = [_randn(50, device=device, dtype=torch.float32), _randn(3, 7, device=device, dtype=torch.float32, seed=1)]
    s = [_randn(50, device=device, dtype=dtype, seed=2), _randn(3, 7, device=device, dtype=dtype, seed=3)]
    m = torch.tensor(0.9, device=device)

    def run():
        sslkern.ema_update_(t, s, 0.9, backend=backend)
        sslkern.ema_update_(t, s, m, backend=backend)
    return [], run


def _dino_inputs(device, dtype, rows_s=6, rows_t=4, K=37):
    s = _randn(rows_s, K, device=device, dtype=dtype, grad=True)
    t = _randn(rows_t, K, device=device, dtype=dtype, seed=1)
    c = _randn(K, device=device, dtype=dtype, scale=0.1, seed=2)
    return s, t, c


def _case_dino(device, dtype, backend):
    import sslkern

    s, t, c = _dino_inputs(device, dtype)
    return [s], lambda: sslkern.dino_loss(s, t, c, student_temp=0.5, teacher_temp=0.5, return_teacher_sum=True,
                                          backend=backend)[0]


def _case_dino_sinkhorn(device, dtype, backend):
    import sslkern

    s, t, _ = _dino_inputs(device, dtype)
    return [s], lambda: sslkern.dino_loss(s, t, None, student_temp=0.5, teacher_temp=0.5, teacher_mode="sinkhorn",
                                          backend=backend)


def _case_sinkhorn(device, dtype, backend):
    import sslkern

    _, t, _ = _dino_inputs(device, dtype)

    def run():
        sslkern.sinkhorn_knopp_teacher(t, 0.5, backend=backend)
    return [], run


def _ibot_masks(device):
    import torch

    masks = torch.zeros(2, 9, dtype=torch.bool)
    masks[0, [1, 4, 5]] = True
    masks[1, [0, 8]] = True
    return masks.to(device)


def _case_ibot(device, dtype, backend):
    import sslkern

    masks = _ibot_masks(device)
    s, t, c = _dino_inputs(device, dtype, 5, 5)
    return [s], lambda: sslkern.ibot_patch_loss(s, t, masks, c, student_temp=0.5, teacher_temp=0.5,
                                                return_teacher_sum=True, backend=backend)[0]


def _prototype_inputs(device, dtype, rows_s, rows_t, K=37, D=16):
    import torch.nn.functional as F

    zs = F.normalize(_randn(rows_s, D, device=device, dtype=dtype, seed=4).float(), dim=1).to(dtype).requires_grad_()
    zt = F.normalize(_randn(rows_t, D, device=device, dtype=dtype, seed=5).float(), dim=1).to(dtype)
    v = _randn(K, D, device=device, dtype=dtype, seed=6, grad=True)
    g = (_randn(K, 1, device=device, dtype=dtype, seed=7, scale=0.1) + 1).detach().requires_grad_()
    vt = _randn(K, D, device=device, dtype=dtype, seed=8)
    c = _randn(K, device=device, dtype=dtype, scale=0.1, seed=9)
    return zs, zt, v, g, vt, c


def _case_prototype(device, dtype, backend):
    import sslkern

    zs, zt, v, g, vt, c = _prototype_inputs(device, dtype, 6, 4)
    return [zs, v, g], lambda: sslkern.prototype_loss(zs, zt, v, vt, c, gain=g, teacher_gain=g.detach(),
                                                      student_temp=0.5, teacher_temp=0.5, backend=backend)


def _case_prototype_ibot(device, dtype, backend):
    import sslkern

    masks = _ibot_masks(device)
    zs, zt, v, g, vt, c = _prototype_inputs(device, dtype, 5, 5)
    return [zs, v], lambda: sslkern.prototype_loss(zs, zt, v, vt, c, masks=masks, student_temp=1.0, teacher_temp=0.5,
                                                   return_teacher_sum=True, backend=backend)[0]


def _case_info_nce(device, dtype, backend):
    import torch

    import sslkern

    q = _randn(8, 16, device=device, dtype=dtype, grad=True)
    k = _randn(8, 16, device=device, dtype=dtype, seed=1, grad=True)
    pos = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6], device=device)
    excl = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1], device=device)

    def run():
        return (sslkern.info_nce_loss(q, k, 0.5, backend=backend)
                + sslkern.info_nce_loss(q, k, 0.5, pos=pos, exclude=excl, backend=backend))
    return [q, k], run


def _case_nt_xent(device, dtype, backend):
    import sslkern

    a = _randn(6, 16, device=device, dtype=dtype, grad=True)
    b = _randn(6, 16, device=device, dtype=dtype, seed=1, grad=True)
    return [a, b], lambda: sslkern.info_nce_loss(a, b, 0.5, nt_xent=True, backend=backend)


def _case_rince(device, dtype, backend):
    import torch

    import sslkern

    q = _randn(8, 16, device=device, dtype=dtype, grad=True)
    k = _randn(8, 16, device=device, dtype=dtype, seed=1, grad=True)
    excl = torch.tensor([1, 0, 3, 2, 5, 4, 7, -1], device=device)

    def run():  # the RINCE kernels (chingyaoc/RINCE's MoCo v3 and SimCLR forms)
        return (sslkern.info_nce_loss(q, k, 0.5, exclude=excl, rince=(0.6, 0.01), backend=backend)
                + sslkern.info_nce_loss(q, k, 0.5, nt_xent=True, rince=(0.1, 0.01), backend=backend))
    return [q, k], run


def _case_relation(device, dtype, backend):
    import torch

    import sslkern

    tokens = _randn(2, 1 + 16, 18, device=device, dtype=dtype, grad=True)
    wq = _randn(9, 2, 18, device=device, dtype=dtype, seed=1, scale=0.3, grad=True)
    wk = _randn(9, 2, 18, device=device, dtype=dtype, seed=2, scale=0.3, grad=True)
    perm = torch.stack([torch.randperm(16, generator=_gen(s)) for s in range(2)]).to(device)
    dist = (_randn(1, 18, 18, device=device, dtype=dtype, seed=3, scale=0.1, grad=True),
            _randn(1, 18, 18, device=device, dtype=dtype, seed=4, scale=0.1, grad=True))
    return [tokens, wq, wk], lambda: sslkern.relation_loss(tokens, wq, wk, perm, num_prefix_tokens=1, distance=dist,
                                                           backend=backend).loss


def _case_relation_op(device, dtype, backend):
    """``sslkern::relation_loss`` differentiated (the public function takes the one-pass
    ``relation_loss_with_grad`` instead), and ``relation_loss_with_grad`` on half inputs (the
    public function upcasts half projections on CPUs without native half GEMMs)."""
    import torch

    ops = torch.ops.sslkern
    q = _randn(2, 16, 18, device=device, dtype=dtype, grad=True)
    k = _randn(2, 16, 18, device=device, dtype=dtype, seed=1, grad=True)
    pos = torch.stack([torch.randperm(16, generator=_gen(s)) for s in range(2)]).to(device)

    def run():
        a = ops.relation_loss(q, k, pos, None, 4, 16, 9, 0.5, 0.1, backend)[0]
        b = ops.relation_loss_with_grad(q, k, pos, None, 4, 16, 9, 0.5, 0.1, backend)[0]
        return a + b
    return [q, k], run


def _case_alibi(device, dtype, backend):
    import sslkern

    q, k, v = (_randn(2, 2, 17, 16, device=device, dtype=dtype, seed=i, grad=True) for i in range(3))
    slopes = (_randn(2, device=device, dtype=dtype, seed=3).abs() * 0.1).requires_grad_()
    return [q, k, v, slopes], lambda: _weighted(sslkern.alibi_attention(q, k, v, slopes=slopes, num_prefix_tokens=1,
                                                                         backend=backend))


def _case_layer_average(device, dtype, backend):
    import sslkern

    layers = [_randn(2, 9, 16, device=device, dtype=dtype, seed=i) for i in range(3)]

    def run():
        sslkern.layer_average_targets(layers, backend=backend)
    return [], run


def _case_masked_regression(device, dtype, backend):
    import torch

    import sslkern

    pred = _randn(4, 9, 16, device=device, dtype=dtype, grad=True)
    target = _randn(2, 9, 16, device=device, dtype=torch.float32, seed=1)
    mask = (torch.rand(4, 9, generator=_gen(2)) < 0.5).to(device)
    ids = torch.stack([torch.randperm(9, generator=_gen(s))[:4] for s in range(4)]).to(device)
    pred_ids = _randn(4, 4, 16, device=device, dtype=dtype, seed=3, grad=True)
    cls = _randn(4, 16, device=device, dtype=dtype, seed=4, grad=True)

    def run():
        return (sslkern.masked_regression_loss(pred, target, mask, reduction="mean", backend=backend)
                + sslkern.masked_regression_loss(pred_ids, target, ids=ids, beta=1.0, reduction="mean",
                                                 backend=backend)
                + sslkern.data2vec_cls_loss(cls, target, backend=backend))
    return [pred, pred_ids, cls], run


def _case_masked_regression_weighted(device, dtype, backend):
    import torch

    import sslkern

    pred = _randn(4, 9, 16, device=device, dtype=dtype, grad=True)
    target = _randn(2, 9, 16, device=device, dtype=torch.float32, seed=1)
    mask = (torch.rand(4, 9, generator=_gen(2)) < 0.5).to(device)
    weight = (torch.rand(4, 9, 16, generator=_gen(3)) + 0.5).to(device)

    def run():
        return (sslkern.masked_regression_loss(pred, target, mask, weight=weight, l1=True, reduction="mean",
                                               backend=backend)
                + sslkern.masked_regression_loss(pred, target, mask, weight=weight, reduction="mean",
                                                 backend=backend))
    return [pred], run


def _case_colorization(device, dtype, backend):
    import torch

    import sslkern

    images = torch.rand(2, 3, 13, 17, generator=_gen(0)).to(device=device, dtype=dtype)
    prior = torch.rand(313, generator=_gen(1), dtype=torch.float64) + 0.1
    factor = sslkern.rebalance_factor(prior / prior.sum()).to(device)

    def run():
        sslkern.colorization_targets(images, factor, backend=backend)
        sslkern.colorization_targets(images, stride=1, num_neighbors=5, backend=backend)
    return [], run


def _case_tokens(device, dtype, backend):
    import torch

    import sslkern
    from sslkern import masks

    B, P, N, D = 2, 1, 16, 8
    x = _randn(B, P + N, D, device=device, dtype=dtype, grad=True)
    pos = _randn(P + N, D, device=device, dtype=dtype, seed=1, grad=True)
    clone = masks.random_mask(B, N, 0.5, num_masks=2, generator=_gen(2)).ids_keep.to(device)
    tm = masks.random_mask(B, N, 0.75, generator=_gen(3))
    mt = _randn(D, device=device, dtype=dtype, seed=4, grad=True)
    cls = _randn(1, D, device=device, dtype=dtype, seed=5, grad=True)

    def run():
        a = sslkern.gather_tokens(x, clone, pos_embed=pos, num_prefix_tokens=P, backend=backend)
        vis = sslkern.gather_tokens(x, tm.ids_keep.to(device), num_prefix_tokens=P, backend=backend)
        b = sslkern.restore_tokens(vis, tm.ids_restore.to(device), mask_token=mt, pos_embed=pos, num_prefix_tokens=P,
                                   backend=backend)
        c = sslkern.gather_tokens(x[:, P:], tm.ids_keep.to(device), pos_embed=pos, prefix_tokens=cls, backend=backend)
        return _weighted(a) + _weighted(b) + _weighted(c)
    return [x, pos, mt, cls], run


def _case_hog(device, dtype, backend):
    import torch

    import sslkern

    images = _randn(2, 3, 32, 32, device=device, dtype=dtype)
    ids = torch.tensor([[0, 3], [2, 1]], device=device)

    def run():
        sslkern.hog_targets(images, 16, backend=backend)
        sslkern.hog_targets(images, 16, ids=ids, gaussian_window=16, backend=backend)
    return [], run


def _redundancy_inputs(device, dtype, n=12, d=9):
    za = _randn(n, d, device=device, dtype=dtype, seed=10, grad=True)
    zb = _randn(n, d, device=device, dtype=dtype, seed=11, grad=True)
    return za, zb


def _case_cross_correlation(device, dtype, backend):
    import sslkern

    za, zb = _redundancy_inputs(device, dtype)

    def run():
        # scale: every gradient below 0.5 (tests/test_loss_scale.py multiplies them by 65,536 in fp16)
        return (sslkern.cross_correlation_loss(za, zb, 0.02, scale=0.2, method="gram", backend=backend)
                + sslkern.cross_correlation_loss(za, zb, 0.02, scale=0.2, groups=3, method="tiled", backend=backend))
    return [za, zb], run


def _case_vicreg(device, dtype, backend):
    import sslkern

    za, zb = _redundancy_inputs(device, dtype)

    def run():
        coeffs = dict(sim_coeff=2.0, std_coeff=2.0, cov_coeff=0.2)  # every gradient below 0.5 (fp16 loss-scale test)
        return (sslkern.vicreg_loss(za, zb, method="gram", backend=backend, **coeffs)
                + sslkern.vicreg_loss(za, zb, method="tiled", backend=backend, **coeffs))
    return [za, zb], run


def _case_swav(device, dtype, backend):
    import sslkern

    scores = _randn(4 * 3, 10, device=device, dtype=dtype, seed=12, scale=0.5, grad=True)  # 4 crops of 3 images
    queue = [_randn(6, 10, device=device, dtype=dtype, seed=13 + i, scale=0.5) for i in range(2)]
    return [scores], lambda: sslkern.swav_loss(scores, 4, queue_scores=queue, temperature=0.5, epsilon=0.5,
                                                 backend=backend)


def _case_render(device, dtype, backend):
    import torch

    import sslkern
    from sslkern import RaggedImages
    from sslkern.views import dino_multicrop, draw_view_params

    g = _gen(6)
    images = RaggedImages.from_list([torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
                                     for h, w in ((20, 17), (9, 30))])
    specs = dino_multicrop(global_size=12, local_size=6, n_local=2)
    params = []
    for i, spec in enumerate(specs):
        u = torch.rand(3, spec.num_uniforms, generator=_gen(7 + i), dtype=torch.float64)
        src = torch.randint(0, len(images), (3,), generator=g)
        params.append((spec.size, draw_view_params(spec, images.hw, u, src).to(device)))
    images = images.to(device)

    def run():
        for size, p in params:
            sslkern.render_views(images, p, size, mean=[0.5] * 3, std=[0.25] * 3, out_dtype=dtype, backend=backend)
    return [], run


_OPS = "sslkern.ops."
OP_CASES = [
    OpCase("ema_update_", (_OPS + "ema_update:dispatch",), _case_ema),
    OpCase("dino_loss", (_OPS + "dino_loss:dispatch",), _case_dino),
    OpCase("dino_loss sinkhorn", (_OPS + "dino_loss:dispatch", _OPS + "dino_loss:sinkhorn_dispatch"),
           _case_dino_sinkhorn),
    OpCase("sinkhorn_knopp_teacher", (_OPS + "dino_loss:dispatch",), _case_sinkhorn),
    OpCase("ibot_patch_loss", (_OPS + "dino_loss:dispatch",), _case_ibot),
    OpCase("prototype_loss", (_OPS + "prototype_loss:dispatch",), _case_prototype),
    OpCase("prototype_loss ibot", (_OPS + "prototype_loss:dispatch",), _case_prototype_ibot),
    OpCase("info_nce_loss", (_OPS + "info_nce_loss:dispatch",), _case_info_nce),
    OpCase("info_nce_loss nt_xent", (_OPS + "info_nce_loss:dispatch",), _case_nt_xent),
    OpCase("info_nce_loss rince", (_OPS + "info_nce_loss:dispatch",), _case_rince),
    OpCase("relation_loss", (_OPS + "relation_loss:dispatch",), _case_relation),
    OpCase("relation_loss custom ops", (_OPS + "relation_loss:dispatch",), _case_relation_op),
    OpCase("alibi_attention", (_OPS + "alibi_attention:dispatch",), _case_alibi),
    OpCase("layer_average_targets", (_OPS + "layer_average_targets:dispatch",), _case_layer_average),
    OpCase("masked_regression_loss", (_OPS + "masked_regression_loss:dispatch",), _case_masked_regression),
    OpCase("masked_regression_loss weighted l1", (_OPS + "masked_regression_loss:dispatch",),
           _case_masked_regression_weighted),
    OpCase("gather_tokens / restore_tokens", (_OPS + "tokens:gather_dispatch",), _case_tokens),
    OpCase("hog_targets", (_OPS + "hog_targets:dispatch",), _case_hog),
    OpCase("cross_correlation_loss", (_OPS + "cross_correlation_loss:dispatch",), _case_cross_correlation),
    OpCase("vicreg_loss", (_OPS + "vicreg_loss:dispatch",), _case_vicreg),
    OpCase("swav_loss", (_OPS + "dino_loss:dispatch", _OPS + "dino_loss:sinkhorn_dispatch"), _case_swav),
    OpCase("colorization_targets", (_OPS + "colorization_targets:dispatch",), _case_colorization),
    OpCase("render_views", (_OPS + "render_views:dispatch",), _case_render),
]


def custom_op_names() -> list[str]:
    """Every ``sslkern::`` custom op registered in this process."""
    import torch

    import sslkern  # noqa: F401  (registers the ops)

    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sslkern::"))


def record_custom_op_calls(fn) -> dict:
    """Run ``fn`` and return ``{op name: (op overload, args, kwargs)}`` of the first call of each
    ``sslkern::`` custom op it makes (forward and backward), seen by a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: dict = {}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if name.startswith("sslkern::"):
                seen.setdefault(name.split("::", 1)[1].split(".")[0], (func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return seen


def loss_scale_grads(case: OpCase, device, backend: str, scale: float):
    """Gradients of ``scale · loss`` of a differentiable case in fp16, w.r.t. its leaves."""
    import torch

    leaves, run = case.build(device, torch.float16, backend)
    grads = torch.autograd.grad(run() * scale, leaves)
    return grads


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
@check("environment")
def _env(ctx):
    import torch

    import sslkern
    from sslkern._backend import backend_status

    out = {"torch": torch.__version__, "sslkern": sslkern.__version__ if hasattr(sslkern, "__version__") else "?",
           "python": platform.python_version(), "dry": ctx.dry,
           "backends": {k: f"{'yes' if v[0] else 'no'}: {v[1]}" for k, v in backend_status().items()}}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpus=torch.cuda.device_count(), memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"sm_{p.major}{p.minor}", cuda=torch.version.cuda)
    return {"details": out}


@check("dino_large_k")
def _dino_large_k(ctx):
    import torch

    import sslkern
    from sslkern import reference as R
    from sslkern.ops.dino_loss import dispatch

    B, V, T, K = ctx.size((8, 10, 2, 65536), (2, 3, 2, 300))
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
    failures, rows = [], {}
    for backend in [b for b in ctx.gpu_backends if b in dispatch.backends and usable(dispatch, b, ctx.device)]:
        for dt, t in tol.items():
            g = torch.Generator(device=ctx.device).manual_seed(0)
            s = (torch.randn(V * B, K, device=ctx.device, generator=g) * 3).to(dt)
            te = (torch.randn(T * B, K, device=ctx.device, generator=g) * 3).to(dt)
            c = torch.randn(K, device=ctx.device, generator=g) * 0.3
            sr = s.detach().float().clone().requires_grad_(True)
            want = R.dino_loss(sr, te.float(), c, 0.1, 0.04, T)
            want.backward()
            sk = s.clone().requires_grad_(True)
            loss = sslkern.dino_loss(sk, te, c, n_global_crops=T, backend=backend)
            loss.backward()
            e_l, e_g = _rel(loss, want), _rel(sk.grad, sr.grad)
            rows[f"{backend} {str(dt)[6:]}"] = {"loss_rel_err": e_l, "grad_rel_err": e_g, "tol": t}
            _expect(e_l <= t and e_g <= 10 * t, f"{backend} {dt}: loss {e_l:.2e}, grad {e_g:.2e} (tol {t})",
                    failures)
    return {"failures": failures, "details": {"shape": f"B={B} V={V} T={T} K={K}", **rows}}


@check("fp16_loss_scale")
def _loss_scale(ctx):
    import torch

    failures, rows = [], {}
    for b in ctx.gpu_backends:
        for case in OP_CASES:
            if not case.differentiable or b not in case.backends():
                continue
            g1 = loss_scale_grads(case, ctx.device, b, 1.0)
            g2 = loss_scale_grads(case, ctx.device, b, LOSS_SCALE)
            finite = all(bool(torch.isfinite(g).all()) for g in g2)
            err = max(_rel(g.float() / LOSS_SCALE, h.float()) for g, h in zip(g2, g1))
            rows[f"{case.name} {b}"] = {"finite": finite, "rel_err_vs_unscaled": err}
            _expect(finite and err < 2e-3, f"{case.name} on {b}: finite={finite}, rel err {err:.1e}", failures)
    return {"failures": failures, "details": rows}


@check("device_placement")
def _placement(ctx):
    import torch

    import sslkern

    if ctx.dry:
        raise Skip("needs CUDA devices (tests/test_device_placement.py covers the dispatch wrapper on CPU)")
    n = torch.cuda.device_count()
    if n < 2:
        raise Skip(f"needs 2 GPUs, this machine has {n}")
    dev = torch.device("cuda", n - 1)
    failures = []
    with torch.cuda.device(0):
        x = torch.randn(4, 197, 64, device=dev)
        ids = torch.stack([torch.randperm(196, device=dev)[:49] for _ in range(4)])
        for b in ctx.gpu_backends:
            out = sslkern.gather_tokens(x, ids, num_prefix_tokens=1, backend=b)
            want = sslkern.gather_tokens(x, ids, num_prefix_tokens=1, backend="reference")
            _expect(out.device == dev and torch.equal(out, want), f"gather {b} on {dev}", failures)
            t, s = torch.randn(1000, device=dev), torch.randn(1000, device=dev)
            w = torch.lerp(t, s, 0.5)
            sslkern.ema_update_([t], [s], 0.5, backend=b)
            _expect(torch.allclose(t, w), f"ema {b} on {dev}", failures)
    return {"failures": failures, "details": {"device": str(dev), "current": 0}}


def _big(ctx, n_gpu: int, n_dry: int) -> int:
    return n_dry if ctx.dry else n_gpu


@check("large_tokens")
def _large_tokens(ctx):
    import torch

    import sslkern

    # > 2^31 elements in x and in the restored output: offsets need 64 bits.
    B, P, N, D = ctx.size((16500, 1, 196, 768), (6, 1, 16, 8))
    keep = N // 4
    x = torch.randn(B, P + N, D, device=ctx.device, dtype=torch.bfloat16)
    ids = torch.rand(B, N, device=ctx.device).argsort(1)
    ids_keep, ids_restore = ids[:, :keep].contiguous(), ids.argsort(1)
    mt = torch.randn(D, device=ctx.device, dtype=torch.bfloat16)
    failures, rows = [], {"x_elements": x.numel(), "over_2^31": x.numel() > 2**31}
    last = slice(B - 3, B)
    for b in ctx.gpu_backends:
        vis = sslkern.gather_tokens(x, ids_keep, num_prefix_tokens=P, backend=b)
        want = sslkern.gather_tokens(x[last], ids_keep[last], num_prefix_tokens=P, backend="reference")
        _expect(torch.equal(vis[last], want), f"gather {b}: last images differ", failures)
        del want
        out = sslkern.restore_tokens(vis, ids_restore, mask_token=mt, num_prefix_tokens=P, backend=b)
        want = sslkern.restore_tokens(vis[last], ids_restore[last], mask_token=mt, num_prefix_tokens=P,
                                      backend="reference")
        _expect(torch.equal(out[last], want), f"restore {b}: last images differ", failures)
        rows[b] = "compared the last 3 images exactly"
        del vis, out, want
        _sync(ctx)
    return {"failures": failures, "details": rows}


@check("large_targets_and_loss")
def _large_targets(ctx):
    import torch

    import sslkern

    B, T, D = ctx.size((11000, 197, 1024), (4, 9, 16))
    layers = [torch.randn(B, T, D, device=ctx.device, dtype=torch.bfloat16) for _ in range(2)]
    failures, rows = [], {"elements": layers[0].numel(), "over_2^31": layers[0].numel() > 2**31}
    last = slice(B - 2, B)
    for b in ctx.gpu_backends:
        if b == "cuda":
            continue  # no CUDA C++ kernel for these ops
        y = sslkern.layer_average_targets(layers, backend=b)
        want = sslkern.layer_average_targets([l[last] for l in layers], backend="reference")
        e = _rel(y[last], want)
        _expect(e < 1e-4, f"targets {b}: rel err {e:.2e}", failures)
        pred = layers[0][last].float() * 0.5
        mask = torch.rand(2, T, device=ctx.device) < 0.6
        loss = sslkern.masked_regression_loss(pred, y[last], mask, backend=b)
        lw = sslkern.masked_regression_loss(pred, want, mask, backend="reference")
        _expect(_rel(loss, lw) < 1e-4, f"loss {b}: {float(loss)} vs {float(lw)}", failures)
        rows[b] = {"targets_rel_err_last_images": e}
        del y
        _sync(ctx)
    return {"failures": failures, "details": rows}


@check("large_ema")
def _large_ema(ctx):
    import torch

    import sslkern

    n = _big(ctx, 2**31 + 4099, 70001)
    t = torch.randn(n, device=ctx.device)
    s = torch.randn(n, device=ctx.device).bfloat16()
    tail = slice(n - 5000, n)
    t0, s0 = t[tail].clone(), s[tail].float()
    failures = []
    m = 0.9
    for b in ctx.gpu_backends:
        sslkern.ema_update_([t], [s], m, backend=b)
        t0 = torch.lerp(t0, s0, 1 - m)
        e = _rel(t[tail], t0)
        _expect(e < 1e-6, f"ema {b}: tail rel err {e:.2e}", failures)
    return {"failures": failures, "details": {"elements": n, "over_2^31": n > 2**31}}


def _alibi_case(ctx, B, H, L, Dh, dtype, backend, layout="bhld"):
    import torch

    import sslkern

    P = 1
    if layout == "seq_first":  # (L, B, 3, H, Dh) -> q, k, v (B, H, L, Dh) strided views
        qkv = torch.randn(L, B, 3, H, Dh, device=ctx.device, dtype=dtype)
        q, k, v = (qkv[:, :, i].permute(1, 2, 0, 3) for i in range(3))
    else:
        q, k, v = (torch.randn(B, H, L, Dh, device=ctx.device, dtype=dtype) for _ in range(3))
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = sslkern.alibi_attention(q, k, v, num_prefix_tokens=P, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    qr, kr, vr = (t.detach().float().contiguous().requires_grad_(True) for t in (q, k, v))
    want = sslkern.alibi_attention(qr, kr, vr, num_prefix_tokens=P, backend="reference")
    want.backward(g.float())
    return max(_rel(out, want), _rel(q.grad, qr.grad), _rel(k.grad, kr.grad), _rel(v.grad, vr.grad))


@check("alibi_grid_and_strides")
def _alibi(ctx):
    import torch

    failures, rows = [], {}
    dtype = torch.float32 if ctx.dry else torch.float16  # bf16/fp16 tl.dot is unreliable in the interpreter
    tol = 1e-4 if ctx.dry else 2e-2
    B, H = ctx.size((8200, 8), (3, 2))
    e = _alibi_case(ctx, B, H, 17, 32, dtype, "triton")
    rows["B·H"] = B * H
    rows["bh_rel_err"] = e
    _expect(e < tol, f"B·H = {B * H}: rel err {e:.2e}", failures)
    Bs, L = ctx.size((16, 197), (2, 17))
    e = _alibi_case(ctx, Bs, 6, L, 64, dtype, "triton", layout="seq_first")
    rows["seq_first_rel_err"] = e
    _expect(e < tol, f"sequence-first views: rel err {e:.2e}", failures)
    return {"failures": failures, "details": rows}


@check("cuda_graph_capture")
def _graphs(ctx):
    import torch

    import sslkern

    if ctx.dry:
        raise Skip("needs a CUDA device (the no-sync path is tested on CPU: tests/test_tokens.py)")
    failures, rows = [], {}
    dev = ctx.device
    for b in ctx.gpu_backends:
        # EMA with a device momentum
        ts = [torch.randn(4099, device=dev), torch.randn(64, 65, device=dev)]
        ss = [torch.randn_like(t) for t in ts]
        mom = torch.tensor(0.9, device=dev, dtype=torch.float64)
        sslkern.ema_update_(ts, ss, mom, backend=b)  # warm-up: compiles, caches the table
        before = [t.clone() for t in ts]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sslkern.ema_update_(ts, ss, mom, backend=b)
        for t, t0 in zip(ts, before):
            t.copy_(t0)
        mom.fill_(0.5)
        graph.replay()
        ok = all(torch.allclose(t, torch.lerp(t0, s, 0.5)) for t, t0, s in zip(ts, before, ss))
        _expect(ok, f"ema {b}: replay differs from eager", failures)
        # token ops forward + backward, no host sync
        B, P, N, D = 8, 1, 196, 384
        x = torch.randn(B, P + N, D, device=dev, requires_grad=True)
        mt = torch.randn(D, device=dev, requires_grad=True)
        ids = torch.rand(B, N, device=dev).argsort(1)
        keep, restore = ids[:, :49].contiguous(), ids.argsort(1)

        def step():
            vis = sslkern.gather_tokens(x, keep, num_prefix_tokens=P, check_indices=False, backend=b)
            out = sslkern.restore_tokens(vis * 2, restore, mask_token=mt, num_prefix_tokens=P, check_indices=False,
                                         backend=b)
            return out, torch.autograd.grad(out.square().sum(), (x, mt))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, (g_x, g_mt) = step()
        with torch.no_grad():
            x.normal_()
        graph.replay()
        e_out, (e_x, e_mt) = step()
        ok = torch.equal(g_out, e_out) and torch.allclose(g_x, e_x) and torch.allclose(g_mt, e_mt, rtol=1e-4)
        _expect(ok, f"tokens {b}: replay differs from eager", failures)
        rows[b] = "captured and replayed: EMA; gather + restore forward and backward"
    return {"failures": failures, "details": rows}


@check("determinism")
def _determinism(ctx):
    import torch

    import sslkern

    dev = ctx.device
    failures, rows = [], {}
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        B, P, N, D, M = ctx.size((64, 1, 196, 384, 4), (2, 1, 16, 8, 3))
        K = ctx.size(65536, 300)
        for b in ctx.gpu_backends:
            runs = []
            for _ in range(2):
                g = torch.Generator(device=dev).manual_seed(1)
                x = torch.randn(B, P + N, D, device=dev, generator=g, requires_grad=True)
                ids = torch.rand(B, M, N, device=dev, generator=g).argsort(-1)[..., : N // 2].contiguous()
                y = sslkern.gather_tokens(x, ids, num_prefix_tokens=P, backend=b)
                mt = torch.randn(D, device=dev, generator=g, requires_grad=True)
                r = torch.rand(B, N, device=dev, generator=g).argsort(1)
                z = sslkern.restore_tokens(x[:, : P + N // 4].detach().clone(), r, mask_token=mt,
                                           num_prefix_tokens=P, backend=b)
                (y.square().sum() + z.square().sum()).backward()
                out = [x.grad, mt.grad]
                if b == "triton":
                    s = torch.randn(4 * 8, K, device=dev, generator=g)
                    te = torch.randn(2 * 8, K, device=dev, generator=g)
                    loss, c = sslkern.dino_loss(s, te, torch.zeros(K, device=dev), return_teacher_sum=True,
                                                backend=b)
                    out += [loss, c]
                runs.append(out)
            same = all(torch.equal(a, c) for a, c in zip(*runs))
            rows[b] = {"bitwise_equal": same, "tensors": len(runs[0])}
            _expect(same, f"{b}: two runs differ", failures)
    finally:
        torch.use_deterministic_algorithms(old)
    return {"failures": failures, "details": rows}


def _recorded_calls(device, backend: str) -> dict:
    """{custom op: (overload, args, kwargs)} recorded from every case that has ``backend``."""
    import torch

    calls: dict = {}
    for case in OP_CASES:
        if backend not in case.backends():
            continue
        leaves, run = case.build(device, torch.float32, backend)

        def call():
            out = run()
            if out is not None and leaves:
                out.backward()
        for name, rec in record_custom_op_calls(call).items():
            calls.setdefault(name, rec)
    return calls


@check("opcheck")
def _opcheck(ctx):
    import torch
    from torch.utils._pytree import tree_map

    failures, rows = [], {}
    every = custom_op_names()
    for b in ctx.gpu_backends:
        calls = _recorded_calls(ctx.device, b)
        missing = sorted(set(every) - set(calls))
        if b == "triton" and missing:  # every op has a triton backend (or falls back to the default rule)
            failures.append(f"no call in OP_CASES reaches {', '.join(missing)}: add one")
        for name, (op, args, kwargs) in sorted(calls.items()):
            if ctx.left() < 20:
                raise Skip("time budget spent")
            if name.endswith("_backward"):  # backward ops have no autograd formula (no double backward)
                args, kwargs = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, (args, kwargs))
            try:
                torch.library.opcheck(op, args, kwargs)
                rows[f"{name} {b}"] = "ok"
            except Exception as e:  # noqa: BLE001 - every failure is reported
                rows[f"{name} {b}"] = f"{type(e).__name__}: {str(e)[:300]}"
                failures.append(f"{name} on {b}")
    rows["custom ops"] = f"{len(every)}: {', '.join(every)}"
    return {"failures": failures, "details": rows}


def run_payload(dev_name: str) -> int:
    """A small call of every op on every GPU backend, forward and backward (the
    compute-sanitizer child)."""
    import torch

    dev = torch.device(dev_name)
    backends = ["triton"] + (["cuda"] if dev.type == "cuda" else [])
    for b in backends:
        _recorded_calls(dev, b)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("payload done")
    return 0


@check("compute_sanitizer")
def _sanitizer(ctx):
    if ctx.dry:  # the payload's calls are the ones opcheck records
        raise Skip("dry mode: compute-sanitizer needs a GPU")
    exe = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if exe is None:
        raise Skip("compute-sanitizer not found (CUDA toolkit bin/ not on PATH)")
    budget = max(30, min(150, ctx.left() - 60))
    cmd = [exe, "--tool", "memcheck", "--error-exitcode", "7", sys.executable, "-m", "sslkern.gpu_check",
           "--payload", "cuda"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"failures": [f"timed out after {budget:.0f} s"]}
    tail = (r.stdout + r.stderr)[-3000:]
    failures = [] if r.returncode == 0 and "ERROR SUMMARY: 0 errors" in tail else [f"exit {r.returncode}"]
    return {"failures": failures, "details": {"returncode": r.returncode, "log_tail": tail}}


# --------------------------------------------------------------------------------------------
# Training: every recipe, sslkern vs --backend reference
# --------------------------------------------------------------------------------------------
# The extra options that make a recipe tiny (dry mode, CI tests), keyed by ``Method.name``; a
# recipe without an entry runs with its own defaults at the common tiny sizes.
_HEADS = ["--hidden-dim", "32", "--out-dim", "16"]
_DISTILLATION = ["--hidden-dim", "32", "--out-dim", "64", "--bottleneck-dim", "16", "--local-crops", "2"]
TINY_RECIPE_ARGS = {
    "dino": _DISTILLATION, "ibot": _DISTILLATION,
    "byol": _HEADS, "moco": _HEADS, "simclr": _HEADS, "simsiam": _HEADS + ["--pred-dim", "16"],
    "mae": ["--decoder-dim", "16", "--decoder-depth", "1", "--decoder-heads", "2"],
    "data2vec": ["--top-k", "1"],
    "data2vec2": ["--top-k", "1", "--decoder-dim", "16", "--decoder-groups", "8", "--clones", "2"],
    "ijepa": ["--pred-dim", "16", "--pred-depth", "1", "--pred-heads", "2"],
    "beit": ["--vocab-size", "16", "--kmeans-iters", "2"],
    "pretext-jigsaw": ["--task", "jigsaw", "--head-dim", "16"],
    "pretext-rotation": ["--task", "rotation", "--head-dim", "16"],
    "cl_mim": ["--mask-patch", "8"],  # a multiple of the patch size: 8 in the dry stage
}
# Options a recipe needs at ViT-S/16 (a recipe without an entry runs with its defaults).
VIT_S_RECIPE_ARGS = {"pretext-jigsaw": ["--task", "jigsaw"], "pretext-rotation": ["--task", "rotation"],
                     "cl_mim": ["--mask-patch", "32"]}  # SimMIM's mask patch at patch 16
TRAIN_STEPS, TRAIN_BATCH, TRAIN_IMAGES = 20, 32, 256        # GPU: ViT-S/16 at 224, bf16
DRY_TRAIN_STEPS, DRY_TRAIN_BATCH, DRY_TRAIN_IMAGES = 2, 8, 24


def make_shard_set(root: Path, n: int, side: int) -> Path:
    """``n`` generated RGB JPEGs (2 classes, sizes around ``side``) written as indexed tar shards
    by ``python -m sslkern.data.shard`` (its ``main``); returns the shard folder."""
    import numpy as np
    from PIL import Image

    from sslkern.data import shard

    src, out = root / "jpegs", root / "shards"
    rng = np.random.default_rng(0)
    for i in range(n):
        d = src / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = side + 8 * (i % 5), side + 12 * (i % 3)
        blocks = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
        # texture in every cell: HOG targets of flat cells are normalised rounding noise
        img = np.kron(blocks, np.ones((16, 16, 1), np.float32))[:h, :w] + rng.normal(0, 24, (h, w, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    if shard.main([str(src), str(out), "--workers", "1"]) not in (0, None):
        raise RuntimeError("sslkern.data.shard failed")
    return out


@check("train_recipes")
def _train_recipes(ctx):
    """Every recipe (``recipes/*.py``) for a few steps at ViT-S/16 224 in bf16 on a generated
    shard set, with the sslkern ops (``--backend auto``) and with ``--backend reference``:
    images/s, data-wait fraction and peak memory per run; the first step's losses of the two
    backends must agree (same weights, views and masks)."""
    import math
    import tempfile

    import torch

    recipes_dir = _repo_dir("recipes")
    if recipes_dir is None:
        raise Skip("no recipes/ beside the package (not an editable install of the repository)")
    from sslkern.train.logging import RunLogger
    from sslkern.train.loop import run as run_recipe
    from sslkern.train.presets import recipe_methods

    steps, batch, images = ((DRY_TRAIN_STEPS, DRY_TRAIN_BATCH, DRY_TRAIN_IMAGES) if ctx.dry
                            else (TRAIN_STEPS, TRAIN_BATCH, TRAIN_IMAGES))
    root = Path(tempfile.mkdtemp(prefix="sslkern_gpu_check_train_"))
    failures, details = [], {}
    try:
        data = make_shard_set(root, images, 40 if ctx.dry else 256)
        if ctx.dry:  # CPU: a tiny ViT and bf16 autocast on the CPU
            size = ["--dim", "16", "--depth", "1", "--heads", "2", "--patch-size", "8", "--image-size", "32",
                    "--workers", "0", "--device", "cpu"]
        else:
            size = ["--model", "vit_small_patch16_224", "--image-size", "224", "--device", "cuda"]
        common = size + ["--data", str(data), "--precision", "bf16", "--batch-size", str(batch), "--steps",
                         str(steps), "--epochs", str(steps), "--eval-every", "0", "--eval-images", "16",
                         "--no-probe", "--quiet", "--threads", "1"]
        for script, cls in recipe_methods(str(recipes_dir)):
            extra = (TINY_RECIPE_ARGS if ctx.dry else VIT_S_RECIPE_ARGS).get(cls.name, [])
            row = {}
            for backend in ("auto", "reference"):
                if ctx.left() < 20:
                    row[backend] = "skipped: time budget spent"
                    failures.append(f"{cls.name} {backend}: not run (budget)")
                    continue
                out = root / f"{cls.name}_{backend}"
                try:
                    run_recipe(cls, common + extra + ["--backend", backend, "--out", str(out)])
                    summary = json.loads((out / "summary.json").read_text())
                    tp = summary["throughput"]
                    first = next(m for m in RunLogger.read_metrics(str(out / "metrics.jsonl")) if m["kind"] == "train")
                    row[backend] = {"img_per_s": tp.get("img_per_s"), "data_wait_frac": tp.get("data_wait_frac"),
                                    "peak_mem_mb": tp.get("peak_mem_mb"), "first_loss": first.get("loss")}
                except BaseException as e:  # SystemExit from a parser error included
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    row[backend] = f"{type(e).__name__}: {str(e)[:300]}"
                    failures.append(f"{cls.name} {backend}: {type(e).__name__}")
                finally:
                    if not ctx.dry:
                        torch.cuda.empty_cache()
            a, r = row.get("auto"), row.get("reference")
            if isinstance(a, dict) and isinstance(r, dict):
                la, lr = a["first_loss"], r["first_loss"]
                if not (math.isfinite(la) and math.isfinite(lr)) or abs(la - lr) > 0.05 * max(abs(lr), 1e-3):
                    failures.append(f"{cls.name}: first-step loss {la:.5g} (sslkern) vs {lr:.5g} (reference)")
                if a["img_per_s"] and r["img_per_s"]:
                    row["speedup"] = round(a["img_per_s"] / r["img_per_s"], 2)
            details[cls.name] = row
    finally:
        shutil.rmtree(root, ignore_errors=True)
    details["settings"] = " ".join(common)
    return {"failures": failures, "details": details}


def _repo_dir(name: str) -> Path | None:
    """The checkout's ``tests`` / ``bench`` directory beside the package (editable install), or None."""
    import sslkern

    d = Path(sslkern.__file__).resolve().parent.parent / name
    return d if d.is_dir() else None


def _pytest(ctx, root: Path, args: list[str], reserve_s: float) -> dict:
    timeout = ctx.left() - reserve_s
    if timeout < 30:
        raise Skip("time budget spent")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + args
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"failures": [f"stopped after {timeout:.0f} s (budget)"], "details": {"log_tail": out[-3000:]}}
    out = r.stdout + r.stderr
    return {"failures": [] if r.returncode in (0, 5) else [f"pytest exit {r.returncode}"],
            "details": {"command": " ".join(cmd[2:]), "log_tail": out[-6000:]}}


def _repo_dir_or_skip(ctx, name: str, cpu_hint: str):
    """The repository folder ``name`` beside the package; a dry run or an installed package skips."""
    if ctx.dry:
        raise Skip(cpu_hint)
    folder = _repo_dir(name)
    if folder is None:
        raise Skip(f"no {name}/ beside the package (not an editable install of the repository)")
    return folder


@check("test_suite")
def _test_suite(ctx):
    tests = _repo_dir_or_skip(ctx, "tests", "the CPU run of the test suite is `pytest tests` (Triton in the interpreter)")
    slow = ("test_recipe_", "test_train_loop", "test_gpu_check", "test_gpu_compile", "test_fsdp",
            "test_integration_examples")
    files = sorted(str(p.relative_to(tests.parent)) for p in tests.glob("test_*.py")
                   if not p.name.startswith(slow))
    return _pytest(ctx, tests.parent, files + ["-k", "triton or cuda"], reserve_s=90)


@check("bench")
def _bench(ctx):
    bench = _repo_dir_or_skip(ctx, "bench", "on CPU the benchmarks are `pytest bench --benchmark-only`")
    res = _pytest(ctx, bench.parent, ["bench", "--benchmark-only", "--bench-no-write"], reserve_s=10)
    tail = res["details"].get("log_tail", "")
    if "sslkern benchmark summary" in tail:
        res["details"]["summary"] = tail[tail.index("sslkern benchmark summary"):]
    return res


# --------------------------------------------------------------------------------------------
# Driver and report
# --------------------------------------------------------------------------------------------
def run(out_dir: str, dry: bool, budget_s: float = 570.0, only: list[str] | None = None) -> dict:
    import torch

    if not dry and not torch.cuda.is_available():
        raise SystemExit("sslkern.gpu_check: no CUDA device visible; use --dry for the CPU dry run")
    t_start = time.monotonic()
    ctx = Ctx(dry, t_start + budget_s)
    results = []
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        t0 = time.monotonic()
        res = {"name": name}
        if ctx.left() <= 0:
            res.update(status="skip", message="time budget spent")
        else:
            try:
                out = fn(ctx) or {}
                fails = out.get("failures", [])
                res.update(status="fail" if fails else "pass", message="; ".join(fails), details=out.get("details"))
            except Skip as e:
                res.update(status="skip", message=str(e))
            except Exception as e:  # noqa: BLE001 - a crash is a result too
                res.update(status="error", message=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc(limit=6))
            finally:
                with contextlib.suppress(Exception):
                    if not dry:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
        res["seconds"] = round(time.monotonic() - t0, 2)
        results.append(res)
        print(f"[{res['status']:5}] {name} ({res['seconds']} s) {res.get('message', '')}", flush=True)
    report = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "mode": "dry (CPU, interpreter, small sizes)" if dry else "gpu", "budget_s": budget_s,
              "seconds": round(time.monotonic() - t_start, 1), "results": results}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    lines = [f"# sslkern gpu_check ({report['mode']})", "",
             f"{report['when']}, {report['seconds']} s of a {report['budget_s']:.0f} s budget.", ""]
    env = next((r for r in report["results"] if r["name"] == "environment"), None)
    if env and env.get("details"):
        d = env["details"]
        lines += [f"torch {d.get('torch')}, triton {d.get('triton')}, GPU: {d.get('gpu', 'none')}"
                  f" ({d.get('capability', '-')}, {d.get('memory_gib', '-')} GiB, CUDA {d.get('cuda', '-')})", ""]
    lines += ["| check | status | s | notes |", "|---|---|---:|---|"]
    for r in report["results"]:
        msg = (r.get("message") or "").replace("|", "\\|")[:300]
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {msg} |")
    bench = next((r for r in report["results"] if r["name"] == "bench" and r.get("details")), None)
    if bench and bench["details"].get("summary"):
        lines += ["", "## Benchmarks (`pytest bench --benchmark-only` on this GPU)", "", "```",
                  bench["details"]["summary"].rstrip(), "```"]
    train = next((r for r in report["results"] if r["name"] == "train_recipes" and r.get("details")), None)
    if train:
        lines += ["", "## Training (`train_recipes`): images/s, data wait, peak memory", "",
                  f"`{train['details'].get('settings', '')}`", "",
                  "| recipe | sslkern img/s | reference img/s | speed-up | data wait (sslkern) | peak MiB (sslkern) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, row in train["details"].items():
            if name == "settings":
                continue
            a, r = row.get("auto"), row.get("reference")
            def cell(x, k, f):
                return f.format(x[k]) if isinstance(x, dict) and x.get(k) is not None else str(x)[:60]

            lines.append(f"| {name} | {cell(a, 'img_per_s', '{:.1f}')} | {cell(r, 'img_per_s', '{:.1f}')} | "
                         f"{row.get('speedup', '–')} | {cell(a, 'data_wait_frac', '{:.1%}')} | "
                         f"{cell(a, 'peak_mem_mb', '{:.0f}')} |")
    for r in report["results"]:
        if r["status"] in ("fail", "error") and r.get("traceback"):
            lines += ["", f"## {r['name']}: traceback", "", "```", r["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sslkern.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", help="directory for gpu_check.md and gpu_check.json")
    ap.add_argument("--dry", action="store_true", help="CPU dry run: interpreter, small sizes (CI)")
    ap.add_argument("--budget-s", type=float, default=570.0, help="time budget; later checks are skipped")
    ap.add_argument("--only", default=None, help="comma-separated check names")
    ap.add_argument("--payload", default=None, help=argparse.SUPPRESS)  # compute-sanitizer child
    args = ap.parse_args(argv)
    if args.dry:
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
    if args.payload:
        return run_payload(args.payload)
    if not args.out_dir:
        ap.error("out_dir is required")
    report = run(args.out_dir, args.dry, args.budget_s, args.only.split(",") if args.only else None)
    bad = [r for r in report["results"] if r["status"] in ("fail", "error")]
    print(f"report: {Path(args.out_dir) / 'gpu_check.md'} ({len(bad)} failed or errored)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
