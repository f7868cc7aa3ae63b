"""Benchmark harness shared by every ``bench/bench_*.py``.

``measure`` times one (case, provider) with pytest-benchmark and records the median, peak
extra memory and achieved bandwidth; ``bench/conftest.py`` turns the records of a session
into ratios (each provider's median over sslkern's, same run), a markdown table, a CSV and
a PNG under ``docs/bench/``.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler quiet

import pytest  # noqa: E402
import torch  # noqa: E402

import sslkern  # noqa: E402

RESULTS: list["Result"] = []

# The default run (``pytest bench --benchmark-only``) times one representative case per op
# against its main providers, with few rounds, so the whole suite stays short on a small CPU;
# ``SSLKERN_BENCH_FULL=1`` adds every case of the sweeps (input scales, dtypes, the output
# cache off, round-robin timings) and raises the rounds: on a shared VM the first calls of a
# process run at a fraction of steady-state speed and 3 rounds left single runs 2-3x apart.
FULL = os.environ.get("SSLKERN_BENCH_FULL", "0") not in ("", "0")
MIN_ROUNDS = int(os.environ.get("SSLKERN_BENCH_ROUNDS", "10" if FULL else "3"))
MAX_ROUNDS = None if FULL else int(os.environ.get("SSLKERN_BENCH_ROUNDS", "5"))
MIN_WARMUP = 2 if FULL else 1
full_sweep_only = pytest.mark.skipif(not FULL, reason="part of the full sweep (SSLKERN_BENCH_FULL=1)")


def sweep(values, default, *, unpack: bool = True) -> list:
    """``values`` for ``pytest.mark.parametrize``, those not in ``default`` run only with
    ``SSLKERN_BENCH_FULL=1`` (reported as skipped otherwise). Tuples are the values of several
    argument names unless ``unpack=False`` (one argument that takes a tuple)."""
    out = []
    for v in values:
        if v in default:
            out.append(v)
        else:
            out.append(pytest.param(*(v if unpack and isinstance(v, tuple) else (v,)), marks=full_sweep_only))
    return out


def _rounds(rounds: int) -> int:
    rounds = max(rounds, MIN_ROUNDS)
    return rounds if MAX_ROUNDS is None else min(rounds, max(MAX_ROUNDS, MIN_ROUNDS))


@dataclass
class Result:
    op: str
    case: str
    provider: str
    median_ms: float
    iqr_ms: float
    min_ms: float
    rounds: int
    peak_extra_mb: float | None
    bytes_moved: float | None
    gbps: float | None
    target: float | None  # the speed-up sslkern should reach over this provider, if any
    machine: str
    torch_version: str
    date: str
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def machine() -> str:
    """One line naming the hardware the figures were taken on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


_copy_gbps: float | None = None


def copy_bandwidth_gbps() -> float:
    """The machine's measured copy bandwidth (read + write bytes per second), once per run."""
    global _copy_gbps
    if _copy_gbps is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        n = 64 * 2**20  # 256 MiB of fp32
        src = torch.randn(n, device=dev)
        dst = torch.empty_like(src)
        times = []
        for _ in range(7):
            _sync()
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync()
            times.append(time.perf_counter() - t0)
        _copy_gbps = 2 * n * 4 / statistics.median(times) / 1e9
    return _copy_gbps


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by one call of ``fn`` beyond what was live before it.

    Replays the profiler's allocation events in time order (CPU allocator, with sslkern's
    output cache off; the CUDA caching allocator's stats on a GPU).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    # sslkern's CPU output cache would serve this call from blocks kept since the warm-up
    # calls, which the profiler does not see as allocations: measure with it off, so the
    # figure counts every byte the call needs (what a first call, or a cache-less run, uses)
    with sslkern.cpu_cache_disabled(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(
    benchmark,
    *,
    op: str,
    case: str,
    provider: str,
    fn: Callable[[], object],
    setup: Callable[[], object] | None = None,
    bytes_moved: float | None = None,
    target: float | None = None,
    rounds: int = 10,
    warmup: int = 2,
) -> None:
    """Time ``fn`` (after ``warmup`` calls, which also compile ``torch.compile`` providers).

    Args:
        op, case: the op and the sizes (the table groups by ``op: case``).
        provider: "sslkern", "reference", "compiled" or a peer's name; "sslkern_nocache" is
            sslkern with its CPU output cache off (fresh output memory every call).
        fn: zero-argument callable doing the timed work.
        setup: optional untimed call before every timed call (e.g. to reset state).
        bytes_moved: the fewest bytes the op must read + write, for GB/s.
        target: the speed-up sslkern should reach over this provider (shown met/missed).
    """

    rounds, warmup = _rounds(rounds), max(warmup, MIN_WARMUP) if FULL else MIN_WARMUP

    if provider == "sslkern_nocache":
        inner = fn

        def fn():
            with sslkern.cpu_cache_disabled():
                inner()

    def call():
        fn()
        _sync()

    for _ in range(warmup):
        if setup is not None:
            setup()
        call()
    if setup is not None:
        setup()
    peak = peak_extra_bytes(fn)

    benchmark.group = f"{op}: {case}"
    benchmark.extra_info.update(op=op, case=case, provider=provider)
    if setup is None:
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(call, setup=lambda: (setup(), None)[1], rounds=rounds, iterations=1, warmup_rounds=0)

    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing to record
        return
    median = stats.median
    RESULTS.append(Result(
        op=op, case=case, provider=provider,
        median_ms=median * 1e3, iqr_ms=stats.iqr * 1e3, min_ms=stats.min * 1e3, rounds=stats.rounds,
        peak_extra_mb=peak / 2**20,
        bytes_moved=bytes_moved,
        gbps=(bytes_moved / median / 1e9) if bytes_moved else None,
        target=target,
        machine=machine(), torch_version=torch.__version__,
        date=datetime.date.today().isoformat(),
    ))


def measure_interleaved(benchmark, *, op: str, case: str, fns: dict, rounds: int = 25, warmup: int = 2,
                        setup: dict | None = None, targets: dict | None = None) -> dict:
    """Time several callables round-robin (one call of each per round) and record each as a
    provider of one case; the first key is the baseline the ratios are taken against (name it
    "sslkern"). For sweeps of one op over its inputs: on a shared VM whose speed drifts by
    10-30 % over minutes, timing each variant in its own block measures the drift, not the op.
    ``targets``: {name: the speed-up sslkern should reach over it} (as ``measure``'s ``target``).
    Returns {name: median seconds}."""
    rounds = _rounds(rounds) if FULL else min(rounds, 10)
    setup = setup or {}
    times: dict = {k: [] for k in fns}
    for k, fn in fns.items():
        for _ in range(max(warmup, MIN_WARMUP) if FULL else MIN_WARMUP):
            if k in setup:
                setup[k]()
            fn()
            _sync()

    def one_round():
        for k, fn in fns.items():
            if k in setup:
                setup[k]()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - t0)

    peaks = {}
    for k, fn in fns.items():
        if k in setup:
            setup[k]()
        peaks[k] = peak_extra_bytes(fn)
    benchmark.group = f"{op}: {case}"
    benchmark.extra_info.update(op=op, case=case, provider="interleaved")
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    if getattr(getattr(benchmark, "stats", None), "stats", None) is None:  # --benchmark-disable
        return {}
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[k] = statistics.median(ts)
        RESULTS.append(Result(
            op=op, case=case, provider=k, median_ms=out[k] * 1e3, iqr_ms=(q[2] - q[0]) * 1e3,
            min_ms=min(ts) * 1e3, rounds=len(ts), peak_extra_mb=peaks[k] / 2**20, bytes_moved=None, gbps=None,
            target=(targets or {}).get(k), machine=machine(), torch_version=torch.__version__,
            date=datetime.date.today().isoformat()))
    return out
