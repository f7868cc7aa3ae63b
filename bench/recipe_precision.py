"""Every recipe in bf16 and fp16 (CPU autocast) against fp32, and with ``--compile`` against eager.

    python bench/recipe_precision.py                       # every recipe, sizes below, table on stdout
    python bench/recipe_precision.py --only dino,mae --json runs.json
    SSLKERN_BENCH_FULL=1 python bench/recipe_precision.py  # the digits defaults (dim 96, depth 4, batch 128)

Per recipe (discovered from ``recipes/*.py``), one fresh process with an empty
``TORCHINDUCTOR_CACHE_DIR`` (so the compile time is a first compile) runs, on sklearn digits with
the same seed: ``--precision fp32`` for ``--steps`` steps, ``bf16`` and ``fp16`` for as many, and
``fp32 --compile`` for ``--compile-steps``. Reported per recipe:

* the largest relative loss difference of bf16 / fp16 against fp32 over the steps, and at the
  last step; fp16's skipped steps (GradScaler overflow) and the last step that was skipped;
* the largest relative loss difference of the compiled run against eager over its steps;
* the compile overhead (the compiled run's summed step times minus the eager run's over the
  same steps: tracing, inductor's C++ builds and any recompilation) and the ratio of median
  step times from step 6 on (compiled / eager), and bf16 / fp32's step-time ratio.

Tolerances (the bars this script checks; the exit status is 1 if one is missed): bf16 within
``--bf16-rtol`` of fp32 at every step, fp16 within ``--fp16-rtol``, no NaN, no fp16 step skipped
after step ``--settle``; compile within ``--compile-rtol`` of eager. The model size is the one
given by ``--dim/--depth/--heads/--batch-size`` (each recipe's own head and decoder sizes).
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

    for p in ("bf16", "fp16"):
        rel = _rel(loss[p], loss["fp32"])
        res[p] = {"max_rel": max(rel), "last_rel": rel[-1], "finite": all(map(math.isfinite, loss[p])),
                  "step_ratio": steady(p) / steady("fp32")}
    skipped = [r.get("skipped_steps", 0) for r in runs["fp16"]]
    res["fp16"].update(skipped=skipped[-1], last_skipped=max((i + 1 for i in range(len(skipped))
                                                              if skipped[i] > (skipped[i - 1] if i else 0)), default=0))
    n = a.compile_steps
    res["compile"] = {"max_rel": max(_rel(loss["compile"], loss["fp32"][:n])),
                      "overhead_s": sum(step_s["compile"]) - sum(step_s["fp32"][:n]),
                      "step_ratio": steady("compile") / steady("fp32", n)}
    res["fp32_step_s"] = steady("fp32")
    res["final_loss_fp32"] = loss["fp32"][-1]
    return res


# options a recipe needs at the sizes above (a recipe without an entry runs with its defaults)
RECIPE_ARGS = {"pretext-jigsaw": ["--task", "jigsaw"], "pretext-rotation": ["--task", "rotation"],
               "data2vec": ["--top-k", "2"], "data2vec2": ["--top-k", "2"]}


def table(results: list[dict], a) -> str:
    lines = ["| recipe | fp32 step | bf16 max / last rel. loss diff | bf16 step × | fp16 max / last rel. diff | "
             "fp16 skipped (last at step) | compile max rel. diff | compile overhead | compiled step × |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['recipe']} | error: {r['error'][:120]} |||||||| ")
            continue
        b, h, c = r["bf16"], r["fp16"], r["compile"]
        lines.append(f"| {r['recipe']} | {1e3 * r['fp32_step_s']:.0f} ms | {100 * b['max_rel']:.2f} % / "
                     f"{100 * b['last_rel']:.2f} % | {b['step_ratio']:.2f} | {100 * h['max_rel']:.3f} % / "
                     f"{100 * h['last_rel']:.3f} % | {h['skipped']} ({h['last_skipped'] or '–'}) | "
                     f"{c['max_rel']:.1e} | {c['overhead_s']:.1f} s | {c['step_ratio']:.2f} |")
    return "\n".join(lines)


def misses(r: dict, a) -> list[str]:
    if "error" in r:
        return [f"{r['recipe']}: {r['error']}"]
    out = []
    for p, tol in (("bf16", a.bf16_rtol), ("fp16", a.fp16_rtol)):
        if not r[p]["finite"]:
            out.append(f"{r['recipe']} {p}: non-finite loss")
        if r[p]["max_rel"] > tol:
            out.append(f"{r['recipe']} {p}: loss differs from fp32 by {100 * r[p]['max_rel']:.2f} % > {100 * tol:g} %")
    if r["fp16"]["last_skipped"] > a.settle:
        out.append(f"{r['recipe']} fp16: a step was skipped at step {r['fp16']['last_skipped']} > {a.settle}")
    if r["compile"]["max_rel"] > a.compile_rtol:
        out.append(f"{r['recipe']} compile: loss differs from eager by {r['compile']['max_rel']:.1e} "
                   f"> {a.compile_rtol:g}")
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
    p.add_argument("--bf16-rtol", type=float, default=0.05)
    p.add_argument("--fp16-rtol", type=float, default=0.01)
    p.add_argument("--compile-rtol", type=float, default=1e-3)
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
