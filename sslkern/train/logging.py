"""Run directory, metrics, plots, progress bar and the end-of-run summary (rank 0 writes).

Run directory layout::

    config.json        resolved configuration (every argument, dataset, world size)
    metrics.jsonl      one JSON object per line: {"kind": "train"|"eval"|"final", "step", "epoch", ...}
    checkpoint.safetensors   last training state (see checkpoint.py)
    encoder_teacher.safetensors / encoder_student.safetensors   timm-loadable encoders
    loss.png, eval.png, health.png   plots (matplotlib, Agg backend)
    summary.txt        the summary printed at the end
    summary.json       machine-readable result (see summary.py); the README table is made from these
"""
from __future__ import annotations

import json
import os
import sys
import time

# Keys that depend on wall-clock time; everything else in metrics.jsonl is deterministic.
TIMING_KEYS = ("time", "img_per_s", "elapsed_s", "data_wait_s", "rank_img_per_s", "step_s", "data_wait_frac",
               "forward_s", "backward_s", "optimizer_s", "peak_mem_mb", "first_step_s")


class RunLogger:
    def __init__(self, out_dir: str, config: dict, *, is_main: bool = True, quiet: bool = False,
                 resume_step: int | None = None):
        self.out_dir = out_dir
        self.is_main = is_main
        self.quiet = quiet
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.bar = None
        if not is_main:
            return
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        rows = []
        if resume_step is not None and os.path.exists(self.metrics_path):
            # Rows written after the checkpoint we resume from are replayed by the resumed run;
            # a "final" evaluation of a run stopped early (--steps) is superseded.
            rows = [r for r in self.read_metrics(self.metrics_path) if r["step"] <= resume_step and r["kind"] != "final"]
        with open(self.metrics_path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    @staticmethod
    def read_metrics(path: str) -> list[dict]:
        rows = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rows.append(json.loads(line))
        return rows

    def log(self, kind: str, step: int, epoch: int, **values) -> None:
        if not self.is_main:
            return
        row = {"kind": kind, "step": step, "epoch": epoch, **values}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # -- progress -------------------------------------------------------------------------
    def progress(self, total: int, initial: int = 0, desc: str = "train"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=self.quiet or not self.is_main,
                        dynamic_ncols=True, file=sys.stderr)
        return self.bar

    def update_bar(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def print(self, *args) -> None:
        if self.is_main and not self.quiet:
            print(*args, flush=True)

    # -- plots and summary ----------------------------------------------------------------
    def plot(self, health: list[str] | tuple = ()) -> None:
        if not self.is_main or not os.path.exists(self.metrics_path):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics(self.metrics_path)
        train = [r for r in rows if r["kind"] == "train"]
        if train:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
            ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title("training loss")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(os.path.join(self.out_dir, "loss.png"), dpi=100)
            plt.close(fig)
        series = [k for k in health if any(k in r for r in train)]
        if series:  # collapse signals, one panel each
            fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
            for ax, k in zip(axes[0], series):
                pts = [(r["step"], r[k]) for r in train if k in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
                ax.set_xlabel("step"), ax.set_title(k, fontsize=9), ax.grid(alpha=0.3)
            fig.suptitle("health (collapse signals)", fontsize=10)
            fig.tight_layout()
            fig.savefig(os.path.join(self.out_dir, "health.png"), dpi=100)
            plt.close(fig)
        evals = [r for r in rows if r["kind"] in ("eval", "final")]
        if evals:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            keys = sorted({k for r in evals for k in r if k.endswith(("knn", "probe"))})
            for k in keys:
                pts = [(r["step"], r[k]) for r in evals if k in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
            ax.set_xlabel("step"), ax.set_ylabel("top-1 accuracy (%)"), ax.set_title("frozen-encoder evaluation")
            ax.legend(fontsize=8), ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(os.path.join(self.out_dir, "eval.png"), dpi=100)
            plt.close(fig)

    def summary(self, title: str, lines: list[tuple[str, str]], table: list[list[str]] | None = None) -> str:
        """A one-screen summary (printed unless quiet, always written to summary.txt)."""
        width = max([len(title)] + [len(k) + len(v) + 3 for k, v in lines]) + 4
        out = ["=" * width, title, "-" * width]
        out += [f"{k:<{width - len(v) - 1}}{v}" for k, v in lines]
        if table:
            cols = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            out.append("-" * width)
            out += ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, cols))) for r in table]
        out.append("=" * width)
        text = "\n".join(out)
        if self.is_main:
            with open(os.path.join(self.out_dir, "summary.txt"), "w") as f:
                f.write(text + "\n")
            self.print(text)
        return text


class Throughput:
    """Seconds since the previous tick (a whole step: data wait, compute, logging)."""

    def __init__(self):
        self.t = time.perf_counter()

    def tick(self) -> float:
        now = time.perf_counter()
        dt = max(now - self.t, 1e-9)
        self.t = now
        return dt
