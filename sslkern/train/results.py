"""The results table, generated from run directories' ``summary.json`` — never typed by hand.

    python -m sslkern.train.results runs/*                     # print the markdown table
    python -m sslkern.train.results runs/* --readme README.md  # replace the table in README.md

Runs of the same method, dataset, steps and backend are one row; their seeds are listed
and each figure is the mean over seeds with the per-seed values in brackets. The README
section between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is replaced.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load_summaries(paths: list[str]) -> list[dict]:
    found = []
    for p in paths:
        for f in ([p] if p.endswith(".json") else [os.path.join(p, "summary.json")] + glob.glob(os.path.join(p, "*", "summary.json"))):
            if os.path.isfile(f):
                with open(f) as fh:
                    s = json.load(fh)
                s["_path"] = os.path.dirname(f)
                found.append(s)
    return found


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({' / '.join(f'{v:.{digits}f}' for v in values)})"


def _health(s: dict) -> str:
    parts = [f"{k} {v['final']:.2f}" for k, v in s.get("health", {}).items()]
    return ", ".join(parts) or "–"


def table(summaries: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for s in sorted(summaries, key=lambda s: (s["method"], s["dataset"], s["steps"], s["backend"], s["seed"])):
        key = (s["method"], s["dataset"], s["steps"], s["backend"], s["world_size"], s.get("precision", "fp32"))
        groups.setdefault(key, []).append(s)
    head = ("| method | data | steps | seeds | train time (s) | images/s | kNN teacher | kNN student | kNN random init "
            "| kNN gain | probe best / random | health (final) | verdict |")
    lines = [head, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for (method, dataset, steps, backend, world, _), runs in groups.items():
        ev = lambda enc, m="knn": [r["eval"][enc][m] for r in runs if enc in r["eval"] and m in r["eval"][enc]]  # noqa: E731
        best_probe = [max(v.get("probe", float("nan")) for k, v in r["eval"].items() if k != "random") for r in runs
                      if any("probe" in v for v in r["eval"].values())]
        probe = f"{_fmt(best_probe)} / {_fmt(ev('random', 'probe'))}" if best_probe else "–"
        verdicts = sorted({("collapsed" if r["collapsed"] else "ok") for r in runs})
        name = runs[0].get("title", method) + ("" if backend == "auto" else f" ({backend})") + ("" if world == 1 else f" ×{world}")
        if runs[0].get("precision", "fp32") != "fp32":
            name += f" [{runs[0]['precision']}]"
        lines.append(" | ".join([
            f"| {name}", dataset, str(steps), ", ".join(str(r["seed"]) for r in runs),
            _fmt([r["train_s"] for r in runs], 0),
            _fmt([r["throughput"]["img_per_s"] for r in runs if r.get("throughput", {}).get("img_per_s")], 0),
            _fmt(ev("teacher")), _fmt(ev("student") or ev("encoder")),
            _fmt(ev("random")), _fmt([r["knn_gain"] for r in runs]), probe, _health(runs[-1]), "/".join(verdicts) + " |"]))
    return "\n".join(lines)


def replace_in_readme(readme: str, text: str) -> None:
    with open(readme) as f:
        content = f.read()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme}: no '{BEGIN}' ... '{END}' section to replace")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or summary.json files, or parents of run directories)")
    p.add_argument("--readme", help="replace the results section of this markdown file")
    a = p.parse_args(argv)
    summaries = load_summaries(a.runs)
    if not summaries:
        p.error(f"no summary.json found under {' '.join(a.runs)}")
    text = table(summaries)
    if a.readme:
        replace_in_readme(a.readme, text)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
