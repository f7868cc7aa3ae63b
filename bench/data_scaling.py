"""Memory and time to the first step do not grow with the dataset: DINO on 3,000 vs 30,000 JPEGs.

    python bench/data_scaling.py                # makes the two folders once (~1.3 GB in $TMPDIR), runs both
    python bench/data_scaling.py --images 3000 30000 --steps 20

For each folder size, ``recipes/dino.py --data FOLDER`` runs in a fresh process with ``--workers 2``;
a monitor samples the proportional set size (PSS) of the whole process tree (training process
and loader workers) every 50 ms. Reported: the peak PSS, the time from launch to the first
logged training step, and their ratios (bars: memory <= 1.15x, time <= 1.2x). Results are
appended to docs/bench/data_scaling.md with the machine and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def make_folder(path: str, n: int, classes: int = 10) -> str:
    """``n`` JPEGs of ~400x350: crops, flips and tints of scikit-learn's two sample photos."""
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        return path
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(n)
    for i in range(n):
        p = photos[i % 2]
        h, w = int(rng.integers(330, 380)), int(rng.integers(380, 430))
        y, x = int(rng.integers(0, p.shape[0] - h)), int(rng.integers(0, p.shape[1] - w))
        crop = np.clip(p[y:y + h, x:x + w].astype(np.float32) * rng.uniform(0.8, 1.2, size=3), 0, 255).astype(np.uint8)
        d = os.path.join(path, f"class{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(crop).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)
    open(done, "w").close()
    return path


def tree_pss_mb(pid: int) -> float:
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def run(folder: str, out: str, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "dino.py"), "--data", folder, "--out", out, "--steps",
           str(steps), "--workers", "2", "--quiet", "--no-probe", "--eval-every", "0", "--eval-images", "1000", *extra]
    env = {**os.environ, "PYTHONPATH": ROOT}
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, first = 0.0, None
    stop = threading.Event()

    def monitor():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_pss_mb(proc.pid))
            time.sleep(0.05)

    th = threading.Thread(target=monitor, daemon=True)
    th.start()
    while proc.poll() is None:
        if first is None and os.path.exists(metrics) and '"train"' in open(metrics).read():
            first = time.perf_counter() - t0
        time.sleep(0.02)
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return {"peak_pss_mb": peak, "first_step_s": first, "total_s": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[3000, 30000])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "sslkern_scaling"))
    p.add_argument("--repeats", type=int, default=2, help="runs per size (the median is reported)")
    p.add_argument("extra", nargs="*", help="more recipe options (after --)")
    a = p.parse_args(argv)
    extra = a.extra or ["--image-size", "32", "--batch-size", "64", "--local-size", "16", "--local-crops", "4"]
    from harness import machine

    rows = {}
    for n in a.images:
        folder = make_folder(os.path.join(a.root, f"jpeg{n}"), n)
        res = [run(folder, os.path.join(a.root, f"run{n}"), a.steps, extra) for _ in range(a.repeats)]
        rows[n] = {k: float(np.median([r[k] for r in res])) for k in res[0]}
        print(n, json.dumps(rows[n]))
    small, big = rows[min(rows)], rows[max(rows)]
    mem, t = big["peak_pss_mb"] / small["peak_pss_mb"], big["first_step_s"] / small["first_step_s"]
    lines = [f"\n### {datetime.date.today().isoformat()} — {machine()}\n",
             f"`python bench/data_scaling.py --steps {a.steps}` (recipe options: `{' '.join(extra)}`, `--workers 2`), "
             f"median of {a.repeats} runs per size:\n",
             "| images | peak PSS, process tree (MiB) | launch to first step (s) | whole run (s) |", "|---:|---:|---:|---:|"]
    lines += [f"| {n:,} | {r['peak_pss_mb']:.0f} | {r['first_step_s']:.2f} | {r['total_s']:.1f} |" for n, r in rows.items()]
    lines.append(f"\nRatio {max(rows):,} / {min(rows):,} images: memory **{mem:.3f}x** (bar 1.15x: "
                 f"{'met' if mem <= 1.15 else 'missed'}), time to the first step **{t:.3f}x** (bar 1.2x: "
                 f"{'met' if t <= 1.2 else 'missed'}).\n")
    doc = os.path.join(ROOT, "docs", "bench", "data_scaling.md")
    if not os.path.exists(doc):
        with open(doc, "w") as f:
            f.write("# Memory and time to the first step against dataset size\n\nWritten by `bench/data_scaling.py`; "
                    "newest run last.\n")
    with open(doc, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
