"""``summary.json``: the machine-readable result of a run (one per run directory).

Fields: method, title, dataset, seed, steps, epochs, world_size, backend, threads,
train_s / total_s, ``eval`` = {encoder: {"knn", "probe"}} for every evaluated encoder and
``random`` (the same architecture at its random init), ``knn_gain`` (best encoder kNN −
random kNN), ``health`` = {metric: {"final", "worst", "bad"}} and the verdict
(``collapsed``, ``verdict``), ``precision`` and ``skipped_steps`` (fp16: steps the loss scaler
skipped on overflowing gradients; 0 otherwise), and ``throughput`` = medians over the run's steps of
images/s (global and this rank's), the data-wait fraction, the step phases, the peak memory
and the time to the first step. The README results table is generated from these files by
``python -m sslkern.train.results`` (see :mod:`sslkern.train.results`).
"""
from __future__ import annotations

import json
import os
import time

import torch

import sslkern


def health_summary(rows: list[dict], declared: dict[str, str], step: int, *, final_steps: int = 20) -> dict:
    """Final (mean of the last ``final_steps`` logged steps) and worst (over the second half
    of the run, past the warm-up transient) value of each declared health metric."""
    train = [r for r in rows if r["kind"] == "train"]
    out = {}
    for name, bad in declared.items():
        series = [(r["step"], r[name]) for r in train if name in r]
        if not series:
            continue
        tail = [v for _, v in series[-final_steps:]]
        late = [v for s, v in series if s > step // 2] or [v for _, v in series]
        worst = max(late) if bad == "high" else min(late)
        out[name] = {"final": sum(tail) / len(tail), "worst": worst, "bad": bad}
    return out


def throughput_summary(rows: list[dict]) -> dict:
    """Medians of the per-step timing figures (the first step, which starts workers and warms
    caches, is left out of the medians), the peak memory, and the time to the first step."""
    import statistics

    train = [r for r in rows if r["kind"] == "train"]
    steady = train[1:] or train
    out = {}
    for k in ("img_per_s", "rank_img_per_s", "data_wait_frac", "step_s", "forward_s", "backward_s", "optimizer_s"):
        vals = [r[k] for r in steady if k in r]
        if vals:
            out[k] = round(statistics.median(vals), 4)
    mem = [r["peak_mem_mb"] for r in train if "peak_mem_mb" in r]
    if mem:
        out["peak_mem_mb"] = round(max(mem), 1)
    first = [r["first_step_s"] for r in train if "first_step_s" in r]
    if first:
        out["first_step_s"] = round(first[-1], 2)
    return out


def write_summary(a, method_cls, data, info, results: dict) -> dict:
    evals = {k: v for k, v in results.items() if isinstance(v, dict) and "knn" in v}
    best = max(v["knn"] for k, v in evals.items() if k != "random")
    summary = {
        "method": method_cls.name, "title": method_cls.title, "dataset": data.name, "seed": a.seed,
        "steps": results["step"], "epochs": a.epochs, "batch_size": a.batch_size, "world_size": info.world_size,
        "backend": a.backend, "threads": a.threads, "device": str(info.device),
        "train_s": round(results["train_s"], 1), "total_s": round(results["total_s"], 1),
        "eval": evals, "knn_gain": round(best - evals["random"]["knn"], 2),
        "health": results.get("health", {}), "collapsed": results.get("collapsed", False),
        "verdict": results.get("verdict", ""), "teacher_replica_max_diff": results.get("teacher_replica_max_diff", 0.0),
        "precision": getattr(a, "precision", "fp32"), "skipped_steps": results.get("skipped_steps", 0),
        "model": getattr(a, "model", None) or
        f"vit dim {a.dim} depth {a.depth} heads {a.heads} patch {a.patch_size}", "image_size": a.image_size,
        "throughput": results.get("throughput", {}),
        "torch": torch.__version__, "sslkern": sslkern.__version__, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
