"""One command that validates a lent GPU: ``python -m sslkern.gpu_check OUT_DIR``.

Runs, within a time budget (default 280 s, for a 5-minute slot on one H100 / H200 after
``pip install -e .``), the checks a first GPU run needs and writes ``OUT_DIR/gpu_check.md``
and ``OUT_DIR/gpu_check.json``:

* correctness at GPU sizes, every GPU backend (``triton``, ``cuda``) against the eager
  reference: DINO at K = 65,536 in fp32 / bf16 / fp16; token gather / restore, data2vec
  targets + loss and EMA on tensors of more than 2^31 elements (64-bit offsets); ALiBi
  attention with B·H > 65,535 (grid axis 0) and on sequence-first strided views;
* the fp16 GradScaler case (loss scaled by 65,536: finite gradients, exactly 65,536 × the
  unscaled ones); tensors on another GPU than the current one (with 2+ GPUs);
* CUDA-graph capture and replay of EMA and of the token ops (``check_indices=False``);
* bitwise repeatability under ``torch.use_deterministic_algorithms(True)``;
* ``torch.library.opcheck`` of every op on ``triton`` and ``cuda``;
* ``compute-sanitizer --tool memcheck`` over a small call of every kernel (a child process);
* ``triton.testing.do_bench`` timings of every op against eager, ``torch.compile`` and the
  peers that exist on the GPU (FlexAttention with an ALiBi ``score_mod``, SDPA with a
  materialised bias, xformers where it imports), with % of the measured copy bandwidth.

``--dry`` runs the same code on CPU at small sizes (Triton through the interpreter,
CUDA-only parts reported as skipped) so CI keeps it working; its timings are not
measurements. The exit status is 1 if any check failed or errored.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

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


@check("fp16_grad_scaler")
def _grad_scaler(ctx):
    import torch

    import sslkern

    B, V, T, K = ctx.size((32, 8, 2, 65536), (8, 4, 2, 197))
    failures, rows = [], {}
    for backend in ["triton"] + ([] if ctx.dry else ["reference"]):
        s = (torch.randn(V * B, K, device=ctx.device) * 3).half()
        te = (torch.randn(T * B, K, device=ctx.device) * 3).half()
        c = torch.zeros(K, device=ctx.device)
        grads = []
        for factor in (1.0, 65536.0):
            x = s.clone().requires_grad_(True)
            (sslkern.dino_loss(x, te, c, n_global_crops=T, backend=backend) * factor).backward()
            grads.append(x.grad)
        finite = bool(torch.isfinite(grads[1]).all())
        exact = bool(torch.equal(grads[1], grads[0] * 65536))
        rows[backend] = {"finite": finite, "equal_to_unscaled_x65536": exact,
                         "max_abs_grad": float(grads[0].abs().max())}
        _expect(finite and exact, f"{backend}: finite={finite} exact={exact}", failures)
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
                    loss, c = sslkern.dino_loss(s, te, torch.zeros(K, device=dev), center_momentum=0.9, backend=b)
                    out += [loss, c]
                runs.append(out)
            same = all(torch.equal(a, c) for a, c in zip(*runs))
            rows[b] = {"bitwise_equal": same, "tensors": len(runs[0])}
            _expect(same, f"{b}: two runs differ", failures)
    finally:
        torch.use_deterministic_algorithms(old)
    return {"failures": failures, "details": rows}


def _op_samples(dev):
    """(op name, op, args without backend) small inputs for every custom op."""
    import torch

    from sslkern import masks

    B, P, N, D = 2, 1, 16, 8
    x = torch.randn(B, P + N, D, device=dev, requires_grad=True)
    pos = torch.randn(P + N, D, device=dev, requires_grad=True)
    ids = masks.random_mask(B, N, 0.5, num_masks=2, device=dev).ids_keep.to(dev)
    tm = masks.random_mask(B, N, 0.5, device=dev)
    xv = torch.randn(B, P + tm.ids_keep.shape[1], D, device=dev, requires_grad=True)
    mt = torch.randn(D, device=dev, requires_grad=True)
    ops = torch.ops.sslkern
    q, k, v = (torch.randn(2, 2, 1 + 16, 16, device=dev, requires_grad=True) for _ in range(3))
    slopes = torch.rand(2, 2, device=dev, requires_grad=True)
    coords = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(1, 16, 2)
    coords = coords.expand(2, 16, 2).contiguous().to(dev)
    layers = [torch.randn(2, 9, 16, device=dev) for _ in range(3)]
    pred = torch.randn(4, 9, 16, device=dev, requires_grad=True)
    tgt = torch.randn(2, 9, 16, device=dev)
    mask = torch.rand(4, 9, device=dev) < 0.5
    s = torch.randn(3 * 2, 37, device=dev, requires_grad=True)
    t = torch.randn(2 * 2, 37, device=dev)
    return [
        ("ema_update_", ops.ema_update_.default,
         ([torch.randn(50, device=dev)], [torch.randn(50, device=dev)], None, 0.9)),
        ("dino_loss", ops.dino_loss.default,
         (s, t, torch.zeros(37, device=dev), None, 0.1, 0.1, 0.04, 3, 2, True, False, True, True)),
        ("gather_tokens", ops.gather_tokens.default, (x, ids, pos, P, False, False)),
        ("gather_tokens_backward", ops.gather_tokens_backward.default,
         (torch.randn(B * 2, P + ids.shape[2], D, device=dev), ids, P + N, P, False, True, False)),
        ("restore_tokens", ops.restore_tokens.default, (xv, tm.ids_restore.to(dev), mt, None, pos, P)),
        ("restore_tokens_backward", ops.restore_tokens_backward.default,
         (torch.randn(B, P + N, D, device=dev), tm.ids_restore.to(dev), tm.ids_keep.shape[1], P, True, False, True)),
        ("alibi_attention", ops.alibi_attention.default, (q, k, v, slopes, coords, 1, 1, 0.25)),
        ("layer_average_targets", ops.layer_average_targets.default, (layers, "instance", "layer", 1e-5)),
        ("masked_regression_loss", ops.masked_regression_loss.default, (pred, tgt, mask, None, 0.0, 0.25, False)),
    ]


_OP_DISPATCH = {
    "ema_update_": ("sslkern.ops.ema_update", "dispatch"), "dino_loss": ("sslkern.ops.dino_loss", "dispatch"),
    "gather_tokens": ("sslkern.ops.tokens", "gather_dispatch"),
    "gather_tokens_backward": ("sslkern.ops.tokens", "gather_backward_dispatch"),
    "restore_tokens": ("sslkern.ops.tokens", "restore_dispatch"),
    "restore_tokens_backward": ("sslkern.ops.tokens", "restore_backward_dispatch"),
    "alibi_attention": ("sslkern.ops.alibi_attention", "dispatch"),
    "layer_average_targets": ("sslkern.ops.layer_average_targets", "dispatch"),
    "masked_regression_loss": ("sslkern.ops.masked_regression_loss", "dispatch"),
}


def _backends_of(name, device):
    import importlib

    mod, attr = _OP_DISPATCH[name]
    d = getattr(importlib.import_module(mod), attr)
    return [b for b in ("triton", "cuda") if b in d.backends and d.usable(b, device)[0]]


@check("opcheck")
def _opcheck(ctx):
    import torch

    failures, rows = [], {}
    for name, op, args in _op_samples(ctx.device):
        for b in _backends_of(name, ctx.device):
            if ctx.left() < 20:
                raise Skip("time budget spent")
            try:
                # dry mode: schema and fake-tensor checks only (the interpreter is slow; the test
                # suite runs the full opcheck on CPU)
                utils = ("test_schema", "test_faketensor") if ctx.dry else None
                if utils:
                    torch.library.opcheck(op, args + (b,), test_utils=utils)
                else:
                    torch.library.opcheck(op, args + (b,))
                rows[f"{name} {b}"] = "ok"
            except Exception as e:  # noqa: BLE001 - every failure is reported
                rows[f"{name} {b}"] = f"{type(e).__name__}: {str(e)[:300]}"
                failures.append(f"{name} on {b}")
    return {"failures": failures, "details": rows}


def run_payload(dev_name: str) -> int:
    """A small call of every op on every GPU backend (the compute-sanitizer child)."""
    import torch

    dev = torch.device(dev_name)
    for name, op, args in _op_samples(dev):
        for b in _backends_of(name, dev):
            op(*args, b)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("payload done")
    return 0


@check("compute_sanitizer")
def _sanitizer(ctx):
    if ctx.dry:
        rc = run_payload("cpu")  # keeps the payload working; the sanitizer needs a GPU
        if rc:
            return {"failures": ["payload failed"]}
        raise Skip("dry mode: the payload ran on CPU; compute-sanitizer needs a GPU")
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


def _timer(ctx):
    """ms per call: triton.testing.do_bench on a GPU, a wall clock median in dry mode."""
    if not ctx.dry:
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=10, rep=40)

    def wall(fn, n=3):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]
    return wall


def _bench_cases(ctx):
    """(case, bytes a fused kernel must move, {provider: fn})."""
    import torch
    import torch.nn.functional as F

    import sslkern
    from sslkern import reference as R

    dev = ctx.device
    cases = []
    # EMA, ViT-B sized (86M fp32 params in ~150 tensors)
    n = ctx.size(86_000_000, 100_000)
    sizes = [n // 150] * 150
    ts = [torch.randn(k, device=dev) for k in sizes]
    ss = [torch.randn(k, device=dev) for k in sizes]
    cases.append(("ema_update_ fp32", 3 * 4 * sum(sizes), {
        "sslkern": lambda: sslkern.ema_update_(ts, ss, 0.996),
        "eager": lambda: torch._foreach_lerp_(ts, ss, 0.004)}))
    # DINO B=32 K=65,536, 2 + 6 crops, fwd + bwd
    B, K = ctx.size((32, 65536), (4, 300))
    s = torch.randn(8 * B, K, device=dev, requires_grad=True)
    t = torch.randn(2 * B, K, device=dev)
    c = torch.zeros(K, device=dev)

    def dino_ref():
        R.dino_loss(s, t, c, 0.1, 0.04, 2).backward()
    cases.append((f"dino_loss B={B} K={K} fwd+bwd", 4 * K * (8 * B * 2 + 2 * B), {
        "sslkern": lambda: sslkern.dino_loss(s, t, c).backward(), "eager": dino_ref}))
    # MAE gather + restore, ViT-B tokens, fwd + bwd
    B, N, D = ctx.size((128, 196, 768), (2, 16, 16))
    x = torch.randn(B, 1 + N, D, device=dev, requires_grad=True)
    ids = torch.rand(B, N, device=dev).argsort(1)
    keep, restore = ids[:, : N // 4].contiguous(), ids.argsort(1)
    mt = torch.randn(D, device=dev, requires_grad=True)

    def tokens(backend):
        def fn():
            v = sslkern.gather_tokens(x, keep, num_prefix_tokens=1, check_indices=False, backend=backend)
            sslkern.restore_tokens(v, restore, mask_token=mt, num_prefix_tokens=1, check_indices=False,
                                   backend=backend).sum().backward()
        return fn
    nk = N // 4
    cases.append((f"gather+restore B={B} N={N} D={D} fwd+bwd", 4 * D * B * (2 * (1 + nk) + 2 * (1 + N)),
                  {"sslkern": tokens(None), "eager": tokens("reference")}))
    # ALiBi attention ViT-S: B=64, H=6, L=197, Dh=64, fp16 (fp32 in dry mode)
    dt = torch.float32 if ctx.dry else torch.float16
    B, H, L, Dh = ctx.size((64, 6, 197, 64), (2, 2, 17, 16))
    q, k, v = (torch.randn(B, H, L, Dh, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    slopes = sslkern.alibi_slopes(H).to(dev)
    from sslkern.reference.alibi_attention import alibi_bias, grid_coords
    bias = alibi_bias(slopes.expand(1, H), grid_coords(L - 1, dev)[None], "2d", 1).to(dt)  # materialised
    provs = {
        "sslkern": lambda: sslkern.alibi_attention(q, k, v, num_prefix_tokens=1).sum().backward(),
        "sdpa+bias": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward(),
    }
    if not ctx.dry:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            r = grid_coords(L - 1, dev)
            rr = torch.cat([torch.zeros(1, device=dev), r[:, 0]])
            cc = torch.cat([torch.zeros(1, device=dev), r[:, 1]])

            def score_mod(score, b, h, qi, ki):
                d = (rr[qi] - rr[ki]).abs() + (cc[qi] - cc[ki]).abs()
                return score - torch.where((qi > 0) & (ki > 0), slopes[h] * d, 0.0)
            flex = torch.compile(flex_attention)
            provs["flex_attention"] = lambda: flex(q, k, v, score_mod=score_mod).sum().backward()
        except Exception as e:  # noqa: BLE001
            provs["flex_attention"] = f"unavailable: {type(e).__name__}: {e}"
        try:
            import xformers.ops as xops

            xb = bias.expand(B, H, L, L)
            provs["xformers+bias"] = lambda: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=xb).sum().backward()
        except Exception as e:  # noqa: BLE001
            provs["xformers+bias"] = f"unavailable: {type(e).__name__}"
    cases.append((f"alibi_attention B={B} H={H} L={L} Dh={Dh} {str(dt)[6:]} fwd+bwd",
                  q.element_size() * B * H * L * Dh * 8, provs))
    # data2vec targets K=8 layers + masked loss
    B, T, D, Kl = ctx.size((256, 197, 768, 8), (2, 9, 16, 3))
    layers = [torch.randn(B, T, D, device=dev, dtype=dt) for _ in range(Kl)]
    pred = torch.randn(B, T, D, device=dev, requires_grad=True)
    mask = torch.rand(B, T, device=dev) < 0.6

    def d2v(backend):
        def fn():
            y = sslkern.layer_average_targets(layers, backend=backend)
            sslkern.masked_regression_loss(pred, y, mask, backend=backend).backward()
        return fn
    cases.append((f"data2vec targets K={Kl} + loss B={B} T={T} D={D}", layers[0].element_size() * Kl * B * T * D
                  + 4 * B * T * D * 4, {"sslkern": d2v(None), "eager": d2v("reference")}))
    return cases


@check("bench")
def _bench(ctx):
    import torch

    if ctx.left() < 30:
        raise Skip("time budget spent")
    timer = _timer(ctx)
    rows, failures = [], []
    copy_gbs = None
    if not ctx.dry:
        a = torch.empty(2**28, device=ctx.device)
        b = torch.empty_like(a)
        ms = timer(lambda: b.copy_(a))
        copy_gbs = 2 * a.numel() * 4 / (ms * 1e-3) / 1e9
    for case, nbytes, provs in _bench_cases(ctx):
        row = {"case": case, "bytes": nbytes, "ms": {}, "notes": {}}
        for name, fn in list(provs.items()):
            if isinstance(fn, str):
                row["notes"][name] = fn
                continue
            if ctx.left() < 15:
                row["notes"][name] = "skipped: time budget"
                continue
            try:
                row["ms"][name] = timer(fn)
            except Exception as e:  # noqa: BLE001
                row["notes"][name] = f"{type(e).__name__}: {str(e)[:200]}"
        if "eager" in provs and not isinstance(provs["eager"], str) and ctx.left() > 60 and not ctx.dry:
            try:
                comp = torch.compile(provs["eager"])
                row["ms"]["compiled"] = timer(comp)
            except Exception as e:  # noqa: BLE001
                row["notes"]["compiled"] = f"{type(e).__name__}: {str(e)[:200]}"
        ms = row["ms"].get("sslkern")
        if ms and copy_gbs:
            row["pct_of_copy_bandwidth"] = 100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs
        if ms:
            row["speedup"] = {k: v / ms for k, v in row["ms"].items() if k != "sslkern"}
        rows.append(row)
    return {"failures": failures, "details": {"copy_GB_per_s": copy_gbs, "cases": rows,
                                              "note": "dry mode: interpreter / CPU wall clock, not a measurement"
                                              if ctx.dry else "triton.testing.do_bench medians (ms)"}}


# --------------------------------------------------------------------------------------------
# Driver and report
# --------------------------------------------------------------------------------------------
def run(out_dir: str, dry: bool, budget_s: float = 280.0, only: list[str] | None = None) -> dict:
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
    if bench:
        d = bench["details"]
        lines += ["", f"## Timings ({d['note']})", ""]
        if d.get("copy_GB_per_s"):
            lines += [f"Measured device copy bandwidth: {d['copy_GB_per_s']:.0f} GB/s.", ""]
        lines += ["| case | sslkern ms | % of copy bandwidth | others (ms, × = sslkern's speed-up) |",
                  "|---|---:|---:|---|"]
        for c in d["cases"]:
            ms = c["ms"].get("sslkern")
            others = ", ".join(f"{k} {v:.3g} ({c.get('speedup', {}).get(k, 0):.2f}×)" for k, v in c["ms"].items()
                               if k != "sslkern")
            others += "".join(f"; {k}: {v}" for k, v in c["notes"].items())
            pct = c.get("pct_of_copy_bandwidth")
            lines.append(f"| {c['case']} | {ms:.3g} | {pct:.0f} % |" if ms and pct else
                         f"| {c['case']} | {ms if ms is None else f'{ms:.3g}'} | - |")
            lines[-1] += f" {others} |"
    for r in report["results"]:
        if r["status"] in ("fail", "error") and r.get("traceback"):
            lines += ["", f"## {r['name']}: traceback", "", "```", r["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sslkern.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", help="directory for gpu_check.md and gpu_check.json")
    ap.add_argument("--dry", action="store_true", help="CPU dry run: interpreter, small sizes (CI)")
    ap.add_argument("--budget-s", type=float, default=280.0, help="time budget; later checks are skipped")
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
