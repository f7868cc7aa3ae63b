"""Every recipe in bf16 and fp16 (CPU autocast) against fp32, and with ``--compile`` against eager.

    python bench/recipe_precision.py                       # every recipe, sizes below, table on stdout
    python bench/recipe_precision.py --only dino,mae --json runs.json
    SSLKERN_BENCH_FULL=1 python bench/recipe_precision.py  # the digits defaults (dim 96, depth 4, batch 128)

Per recipe (discovered from ``recipes/*.py``), one fresh process with an empty
``TORCHINDUCTOR_CACHE_DIR`` (so the compile time is a first compile) runs, on sklearn digits with
the same seed: ``--precision fp32`` for ``--steps`` steps, ``bf16`` and ``fp16`` for as many, and
``fp32 --compile`` for ``--compile-steps``. Loss differences are ``|loss - fp32 loss|`` at the
same step over the mean ``|fp32 loss|`` of the run (SimSiam's loss, a negative cosine, crosses
zero, where a relative error means nothing). Reported per recipe:

* bf16: the largest difference over the steps and the last one, and the step-time ratio to fp32;
* fp16: the difference at step 1 (the same weights: the rounding of the forward alone), the
  largest after step ``--settle`` (a step the GradScaler skips leaves the weights where they
  were while fp32 moves them, so the runs part for a while), the last; the skipped steps and
  the last step skipped; the step-time ratio;
* ``--compile``: the largest difference from eager over its steps; the compile overhead (the
  compiled run's summed step times minus the eager run's over the same steps: tracing,
  inductor's C++ builds and any recompilation) and the ratio of median step times from step 6.

The bars (exit status 1 if one is missed): no NaN; bf16 within ``--bf16-tol`` at every step;
fp16 within ``--fp16-first-tol`` at step 1 and ``--fp16-tol`` after step ``--settle``, no step
skipped after it; compile within ``--compile-tol``. The model size is the one given by
``--dim/--depth/--heads/--batch-size`` (each recipe's own head and decoder sizes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.environ.get("SSLKERN_BENCH_FULL") == "1"


def _rows(out: str) -> list[dict]:
    from sslkern.train.logging import RunLogger

    return [r for r in RunLogger.read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"]


def _rel(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b)]


def one_recipe(name: str, a) -> dict:
    """Runs of one recipe in this process (the driver gives it a fresh inductor cache)."""
    from sslkern.train.loop import run
    from sslkern.train.presets import recipe_methods

    cls = {c.name: c for _, c in recipe_methods()}[name]
    size = [] if FULL else ["--dim", str(a.dim), "--depth", str(a.depth), "--heads", str(a.heads),
                            "--batch-size", str(a.batch_size)]
    base = size + ["--seed", "0", "--epochs", "1", "--eval-every", "0", "--eval-images", "32", "--no-probe",
                   "--quiet", "--threads", "1"] + RECIPE_ARGS.get(name, [])
    res: dict = {"recipe": name}
    with tempfile.TemporaryDirectory() as tmp:
        def go(tag, *extra, steps):
            out = os.path.join(tmp, tag)
            run(cls, base + ["--steps", str(steps), "--out", out, *extra])
            return _rows(out)

        runs = {p: go(p, "--precision", p, steps=a.steps) for p in ("fp32", "bf16", "fp16")}
        runs["compile"] = go("compile", "--precision", "fp32", "--compile", steps=a.compile_steps)
    loss = {k: [r["loss"] for r in v] for k, v in runs.items()}
    step_s = {k: [r["step_s"] for r in v] for k, v in runs.items()}

    def steady(k, n=None):
        return statistics.median(step_s[k][5:n])

    scale = statistics.mean(abs(v) for v in loss["fp32"])  # losses that cross 0 (SimSiam) have no relative error
    diff = {k: [abs(x - y) / scale for x, y in zip(loss[k], loss["fp32"])] for k in ("bf16", "fp16", "compile")}
    skipped = [r.get("skipped_steps", 0) for r in runs["fp16"]]
    res["bf16"] = {"max": max(diff["bf16"]), "last": diff["bf16"][-1], "step_ratio": steady("bf16") / steady("fp32")}
    res["fp16"] = {"first": diff["fp16"][0], "max_settled": max(diff["fp16"][a.settle:]), "last": diff["fp16"][-1],
                   "step_ratio": steady("fp16") / steady("fp32"), "skipped": skipped[-1],
                   "last_skipped": max((i + 1 for i in range(len(skipped)) if skipped[i] > (skipped[i - 1] if i else 0)),
                                       default=0)}
    for p in ("bf16", "fp16"):
        res[p]["finite"] = all(map(math.isfinite, loss[p]))
    n = a.compile_steps
    res["compile"] = {"max": max(diff["compile"]), "overhead_s": sum(step_s["compile"]) - sum(step_s["fp32"][:n]),
                      "step_ratio": steady("compile") / steady("fp32", n)}
    res["fp32_step_s"] = steady("fp32")
    res["losses"] = loss
    return res


# options a recipe needs at the sizes above (a recipe without an entry runs with its defaults)
RECIPE_ARGS = {"pretext-jigsaw": ["--task", "jigsaw"], "pretext-rotation": ["--task", "rotation"],
               "data2vec": ["--top-k", "2"], "data2vec2": ["--top-k", "2"]}


def table(results: list[dict], a) -> str:
    lines = ["| recipe | fp32 step | bf16 loss diff: max / last | bf16 step × | fp16 loss diff: step 1 / max after "
             f"step {a.settle} / last | fp16 step × | fp16 skipped (last at step) | compile loss diff: max | "
             "compile overhead | compiled step × |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['recipe']} | error: {r['error'][-120:]} |||||||||")
            continue
        b, h, c = r["bf16"], r["fp16"], r["compile"]
        lines.append(f"| {r['recipe']} | {1e3 * r['fp32_step_s']:.0f} ms | {100 * b['max']:.2f} % / "
                     f"{100 * b['last']:.2f} % | {b['step_ratio']:.2f} | {100 * h['first']:.3f} % / "
                     f"{100 * h['max_settled']:.2f} % / {100 * h['last']:.2f} % | {h['step_ratio']:.1f} | "
                     f"{h['skipped']} ({h['last_skipped'] or '–'}) | {c['max']:.1e} | {c['overhead_s']:.1f} s | "
                     f"{c['step_ratio']:.2f} |")
    return "\n".join(lines)


def misses(r: dict, a) -> list[str]:
    if "error" in r:
        return [f"{r['recipe']}: {r['error'][-300:]}"]
    out, b, h = [], r["bf16"], r["fp16"]
    out += [f"{r['recipe']} {p}: non-finite loss" for p in ("bf16", "fp16") if not r[p]["finite"]]
    if b["max"] > a.bf16_tol:
        out.append(f"{r['recipe']} bf16: loss differs from fp32 by {100 * b['max']:.2f} % > {100 * a.bf16_tol:g} %")
    if h["first"] > a.fp16_first_tol:
        out.append(f"{r['recipe']} fp16: step-1 loss differs by {100 * h['first']:.3f} % > {100 * a.fp16_first_tol:g} %")
    if h["max_settled"] > a.fp16_tol:
        out.append(f"{r['recipe']} fp16: loss differs by {100 * h['max_settled']:.2f} % > {100 * a.fp16_tol:g} % "
                   f"after step {a.settle}")
    if h["last_skipped"] > a.settle:
        out.append(f"{r['recipe']} fp16: a step was skipped at step {h['last_skipped']} > {a.settle}")
    if r["compile"]["max"] > a.compile_tol:
        out.append(f"{r['recipe']} compile: loss differs from eager by {r['compile']['max']:.1e} > {a.compile_tol:g}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated recipe names (Method.name)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile-steps", type=int, default=20)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bf16-tol", type=float, default=0.05, help="bf16 vs fp32, every step")
    p.add_argument("--fp16-first-tol", type=float, default=0.01, help="fp16 vs fp32 at step 1 (same weights)")
    p.add_argument("--fp16-tol", type=float, default=0.05, help="fp16 vs fp32 after step --settle")
    p.add_argument("--compile-tol", type=float, default=1e-3, help="compiled vs eager, every step")
    p.add_argument("--settle", type=int, default=5, help="fp16: no step may be skipped after this one")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one recipe, JSON on stdout
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one_recipe(a.one, a)))
        return 0
    from sslkern.train.presets import recipe_methods

    names = [c.name for _, c in recipe_methods()]
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    results = []
    forward = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("only", "json", "one")]
    for name in names:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "PYTHONPATH": ROOT, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name, *forward],
                               env=env, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"recipe": name, "error": (r.stderr or r.stdout)[-400:]}
        results.append(res)
        print(f"{name}: {'error' if 'error' in res else 'done'}", file=sys.stderr, flush=True)
    print(table(results, a))
    bad = [m for r in results for m in misses(r, a)]
    for m in bad:
        print("MISSED:", m)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": vars(a), "full": FULL, "results": results}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
