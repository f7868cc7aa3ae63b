"""Helpers shared by the recipe tests: load a recipe script, read a run directory, kill a run."""
import importlib.util
import os
import signal
import subprocess
import sys
import time

from sslkern.train import checkpoint as ckpt
from sslkern.train.logging import TIMING_KEYS, RunLogger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def deterministic_rows(out):
    """metrics.jsonl without the wall-clock keys."""
    rows = RunLogger.read_metrics(os.path.join(out, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def final_state(out):
    """(checkpoint tensors without RNG states, step)."""
    tensors, meta = ckpt.load_tensors(os.path.join(out, "checkpoint.safetensors"))
    return {k: v for k, v in tensors.items() if not k.startswith("rng/")}, meta["step"]


def kill_at_first_checkpoint(name, args, out, timeout=180):
    """Run ``recipes/<name>.py args --out out`` in a subprocess and SIGKILL it as soon as its first
    checkpoint exists; returns the checkpointed step."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "recipes", f"{name}.py"), *args, "--out", out], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = os.path.join(out, "checkpoint.safetensors")
    deadline = time.time() + timeout
    while not os.path.exists(ck) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return ckpt.checkpoint_step(ck)


# ---------------------------------------------------------------------------------------
# A recipe's step outside the loop: ragged uint8 images and a step context
# ---------------------------------------------------------------------------------------
def digits_like(channels=1, in_memory=True):
    """What a recipe's constructor reads of a dataset (the digits' layout by default)."""
    from types import SimpleNamespace

    return SimpleNamespace(channels=channels, in_memory=in_memory, mean=(0.3,) * channels, std=(0.4,) * channels,
                           name="digits", eval_crop=1.0)


def ragged(batch, size=8, channels=1, seed=0):
    """``batch`` random uint8 images of ``size``x``size`` as the loader hands them to a recipe."""
    import torch

    from sslkern.data.loader import pack

    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (size, size, channels), generator=g, dtype=torch.uint8).numpy()
              for _ in range(batch)]
    return pack(images, [0] * batch, channels).images()


def step_ctx(model, seed, batch, *, step=3, epoch=0, total_steps=8, steps_per_epoch=4, mean=(0.3,), std=(0.4,)):
    """The loop's context for one step of one process: both generators seeded with ``seed``
    (views draw from the host generator, masks and noise from ``ctx.generator``)."""
    import torch

    from sslkern.train.context import StepContext

    ctx = StepContext(step, epoch, total_steps, steps_per_epoch, torch.Generator().manual_seed(seed), batch,
                      host_generator=torch.Generator().manual_seed(seed), mean=mean, std=std)
    ctx.values = model.schedule(ctx)
    return ctx


def tiny_dataset(n=40, size=16, channels=1, seed=0):
    """A real in-memory :class:`sslkern.data.Dataset` of ``n`` random uint8 images (+ as many test)."""
    import numpy as np

    from sslkern.data.datasets import _in_memory

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(2 * n, size, size, channels), dtype=np.uint8)
    labels = np.arange(2 * n) % 4
    return _in_memory("fake", images[:n], labels[:n], ["a", "b", "c", "d"], images[n:], labels[n:])


def source_batch(source, n):
    """The first ``n`` images of a :class:`sslkern.data.Source` as a recipe receives them."""
    from sslkern.data.loader import pack

    return pack([source.load(i) for i in range(n)], source.labels[:n], source.channels).images()


def torchrun_recipe(name, args, out, nproc=2, timeout=300):
    """Run ``recipes/<name>.py args --out out`` under ``torchrun --nproc_per_node=nproc`` (gloo on
    CPU, a free loopback port); asserts it succeeded."""
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           os.path.join(ROOT, "recipes", f"{name}.py"), *args, "--out", out]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r
