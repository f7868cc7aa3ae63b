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
