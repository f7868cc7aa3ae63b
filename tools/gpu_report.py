"""GPU readiness without a GPU: compile every kernel for real targets and report its resources.

    python tools/gpu_report.py [--targets sm_80,sm_90a] [--only OP] [--markdown PATH] [--jobs 2]

* Triton: every module in ``sslkern/triton_ops/`` lists the configurations its launchers
  use in ``AOT_CONFIGS`` (docs/design.md). Each is compiled ahead of time with
  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` down to a cubin,
  with the specialisation a real launch gets (``launch_attrs``: ``tt.divisibility = 16`` on
  every pointer argument and on the integer arguments a config or its module lists in
  ``divisible`` / ``AOT_DIVISIBLE``, the sizes and strides that are multiples of 16 at the
  benchmark sizes), so the figures are those of the binaries that run;
  registers, spills, stack frame and barriers come from the ``ptxas -v`` log of that very
  cubin (``triton.knobs.nvidia.dump_ptxas_log``); shared memory is
  ``compiled.metadata.shared``.
* CUDA C++: every ``csrc/cuda/*.cu`` is compiled device-side (``nvcc -fatbin``, one
  ``-gencode`` per target, torch's include paths, ``-Xptxas -v``); the "ptxas info" lines
  are parsed per entry function and demangled with ``c++filt``. Threads per block come from
  a ``// gpu_report: threads=N`` comment (optionally ``// gpu_report: <name part> threads=N
  dyn_smem=BYTES`` per kernel) or else the file's ``constexpr int kThreads = N``.
* Occupancy follows the CUDA occupancy calculator (see ``OCCUPANCY_MODEL``).

Compilation runs in ``--jobs`` child processes (``python tools/gpu_report.py --worker``)
with ``TRITON_INTERPRET`` unset and Triton's cache in a temporary directory, so the
report works from a test session that uses the interpreter and leaves nothing behind.
A configuration that fails to compile is reported (with the error) and makes the exit
status 1. The bytes-and-flops model of ``tools/gpu_model.py`` is appended to the markdown.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root (holds sslkern/, csrc/, docs/)
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this tree's sslkern
    sys.path.insert(1, str(ROOT))
TARGETS = {"sm_80": 80, "sm_90a": 90}


# --------------------------------------------------------------------------------------------
# Occupancy model
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SMLimits:
    gpu: str
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256         # registers are given to a warp in units of 256 (8 per thread)
    max_threads_per_sm: int = 2048    # = 64 warps
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 0              # bytes usable by CTAs on one SM
    smem_per_cta_max: int = 0
    smem_reserved_per_cta: int = 1024  # the driver reserves 1 KB per CTA (sm_80 and later)
    smem_alloc_unit: int = 128


SM_LIMITS = {
    "sm_80": SMLimits("A100", smem_per_sm=164 * 1024, smem_per_cta_max=163 * 1024),
    "sm_90a": SMLimits("H100", smem_per_sm=228 * 1024, smem_per_cta_max=227 * 1024),
}

OCCUPANCY_MODEL = """\
Occupancy model (CUDA occupancy calculator rules, A100 = sm_80, H100 = sm_90a): a CTA of
`w` warps using `r` registers per thread and `s` bytes of shared memory fits
`min(floor(64 / w), 32, floor(65536 / (w * ceil(32 r / 256) * 256)), floor(S / (ceil((s + 1024) / 128) * 128)))`
times on one SM, where 64 warps = 2048 threads/SM, 32 CTAs/SM, 65536 registers/SM allocated
per warp in units of 256 (8 per thread), S = 164 KB (A100) or 228 KB (H100) of shared
memory per SM with 1 KB reserved per CTA (max 163 / 227 KB per CTA). Warps/SM = CTAs × w;
occupancy = warps/SM ÷ 64; the limiter lists the terms that bind (ties joined by +). Shared memory is the
dynamic amount Triton requests (`metadata.shared`) plus any static `smem` ptxas reports.
This is residency only: it says nothing about latency hiding or achieved bandwidth."""


def occupancy(regs: int, smem: int, threads: int, target: str) -> dict:
    lim = SM_LIMITS[target]
    warps = max(1, -(-threads // 32))
    bounds = {"threads": lim.max_threads_per_sm // (warps * 32), "ctas": lim.max_ctas_per_sm}
    regs_per_warp = -(-max(regs, 1) * 32 // lim.reg_alloc_unit) * lim.reg_alloc_unit
    bounds["regs"] = lim.regs_per_sm // (regs_per_warp * warps)
    smem_per_cta = -(-(smem + lim.smem_reserved_per_cta) // lim.smem_alloc_unit) * lim.smem_alloc_unit
    bounds["smem"] = lim.smem_per_sm // smem_per_cta if smem <= lim.smem_per_cta_max else 0
    ctas = min(bounds.values())
    limiter = "+".join(k for k in ("regs", "smem", "threads", "ctas") if bounds[k] == ctas)
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps,
            "occupancy": ctas * warps * 32 / lim.max_threads_per_sm, "limiter": limiter}


# --------------------------------------------------------------------------------------------
# ptxas log parsing
# --------------------------------------------------------------------------------------------
_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_BAR = re.compile(r"used (\d+) barriers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> list[dict]:
    """Entries of a ``ptxas -v`` log: name, arch, registers, stack, spills, barriers, static smem."""
    out: list[dict] = []
    cur = None
    for line in log.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "regs": None, "stack": 0,
                   "spill_stores": 0, "spill_loads": 0, "barriers": 0, "static_smem": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _RE_FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _RE_USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            b = _RE_BAR.search(line)
            s = _RE_SMEM.search(line)
            cur["barriers"] = int(b.group(1)) if b else 0
            cur["static_smem"] = int(s.group(1)) if s else 0
            cur = None  # the "Used" line closes an entry
    return out


def demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return list(names)
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    lines = r.stdout.splitlines()
    return lines if len(lines) == len(names) else list(names)


def short_kernel_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::k<c10::Half, float>(long const*, ...)`` -> ``k<Half, float>``."""
    name = re.sub(r"^void ", "", demangled)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list (the last top-level parenthesis)
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
    name = name[:cut]
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"\b(?:sslkern|c10|at)::", "", name)
    return name


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------
def triton_modules() -> list[str]:
    pkg_dir = ROOT / "sslkern" / "triton_ops"
    return sorted(m.name for m in pkgutil.iter_modules([str(pkg_dir)]) if not m.name.startswith("_"))


def discover_triton(only: str | None = None) -> tuple[list[dict], list[dict]]:
    """(configs, errors): one dict per AOT config (module, index, name, kernel, num_warps, ...)."""
    configs, errors = [], []
    for mod in triton_modules():
        if only and only not in mod:
            continue
        try:
            module = importlib.import_module(f"sslkern.triton_ops.{mod}")
            aot = getattr(module, "AOT_CONFIGS", None)
            if aot is None:
                raise AttributeError(f"sslkern.triton_ops.{mod} defines no AOT_CONFIGS (see docs/design.md)")
            for i, c in enumerate(aot):
                missing = {"name", "kernel", "signature", "constexprs"} - set(c)
                if missing:
                    raise KeyError(f"AOT_CONFIGS[{i}] lacks {sorted(missing)}")
                fn = c["kernel"]
                kname = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "?")
                configs.append({"module": mod, "index": i, "name": c["name"], "kernel": kname,
                                "num_warps": int(c.get("num_warps", 4)), "num_stages": int(c.get("num_stages", 3))})
        except Exception as e:  # a broken module is reported, not fatal
            errors.append({"module": mod, "error": f"{type(e).__name__}: {e}"})
    return configs, errors


def cuda_sources(only: str | None = None) -> list[str]:
    files = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
    return [f for f in files if not only or only in Path(f).stem]


def cuda_toolchain() -> tuple[bool, str]:
    """Whether .cu files can be compiled here (nvcc and a CUDA build of torch), and why not."""
    if shutil.which("nvcc") is None:
        return False, "nvcc not found on PATH"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    return True, ""


# --------------------------------------------------------------------------------------------
# Compilation (runs inside worker processes)
# --------------------------------------------------------------------------------------------
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


DIVISIBILITY = [["tt.divisibility", 16]]  # what Triton's launcher attaches to a 16-divisible argument


def _jit_fn(fn):
    import triton

    while not isinstance(fn, triton.runtime.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn  # @triton.autotune / @triton.heuristics wrappers: compile the kernel inside
    return fn


def launch_attrs(fn, signature: dict, divisible=()) -> dict:
    """The ``attrs`` a real launch passes to the compiler: ``{(arg index,): tt.divisibility 16}``
    for each pointer argument (torch allocations are 256-byte aligned; a launch with an
    unaligned pointer compiles a separate variant) and each integer argument named in
    ``divisible``. (Integer arguments equal to 1, which a launch turns into constants, are not
    modelled: configs list flags as they are declared.)"""
    fn = _jit_fn(fn)
    names = getattr(fn, "arg_names", None) or list(inspect.signature(fn).parameters)  # interpreter: plain fn
    attrs = {}
    for i, name in enumerate(names):
        ty = signature.get(name)
        if ty is None or ty == "constexpr":
            continue
        if ty.startswith("*") or (name in divisible and ty in ("i32", "i64", "u32", "u64")):
            attrs[(i,)] = DIVISIBILITY
    return attrs


def _compile_config(cfg: dict, target: str, module_obj=None):
    """``triton.compile`` of one AOT config for ``target`` (sm_80 / sm_90a), specialised like a
    real launch; returns (compiled, ptxas log)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = TARGETS[target]
    signature = dict(cfg["signature"])
    signature.update({k: "constexpr" for k in cfg["constexprs"]})
    fn = _jit_fn(cfg["kernel"])
    divisible = cfg.get("divisible", getattr(module_obj, "AOT_DIVISIBLE", ()))
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(cfg["constexprs"]),
                    attrs=launch_attrs(fn, signature, divisible))
    options = {k: cfg[k] for k in _OPTION_KEYS if k in cfg}
    options.setdefault("num_warps", 4)
    options.setdefault("num_stages", 3)
    # Triton runs ptxas -v itself when building the cubin; with this knob it prints the log,
    # so the figures are exactly those of the cubin (no second ptxas run).
    knobs = getattr(triton, "knobs", None)
    log = io.StringIO()
    if knobs is not None:
        knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    return compiled, log


def compile_triton_asm(module: str, index: int, target: str) -> dict:
    """The PTX (and TTGIR) of one AOT config, specialised like a real launch (for tests)."""
    mod = importlib.import_module(f"sslkern.triton_ops.{module}")
    compiled, _ = _compile_config(mod.AOT_CONFIGS[index], target, mod)
    return {"ptx": compiled.asm["ptx"], "ttgir": compiled.asm.get("ttgir", "")}


def compile_triton(module: str, index: int, target: str, import_name: str | None = None) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    # ``module`` names a file in sslkern/triton_ops; ``import_name`` overrides (tests compile their own kernels).
    mod = importlib.import_module(import_name or f"sslkern.triton_ops.{module}")
    cfg = mod.AOT_CONFIGS[index]
    cc = TARGETS[target]
    compiled, log = _compile_config(cfg, target, mod)
    if not compiled.asm.get("cubin"):
        raise RuntimeError("triton.compile produced no cubin")
    entries = parse_ptxas_log(log.getvalue())
    if not entries:  # an older Triton: run its ptxas on the PTX with the flags its make_cubin uses
        ptxas = get_ptxas(cc).path
        with tempfile.TemporaryDirectory(prefix="sslkern_ptx_") as d:
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            r = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", ptx,
                                "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ptxas failed: {r.stderr.strip()[-2000:]}")
        entries = parse_ptxas_log(r.stderr + r.stdout)
    if len(entries) != 1 or entries[0]["regs"] is None:
        raise RuntimeError(f"could not parse the ptxas log:\n{log.getvalue()[-2000:]}")
    e = entries[0]
    md = compiled.metadata
    return {"regs": e["regs"], "stack": e["stack"], "spill_stores": e["spill_stores"],
            "spill_loads": e["spill_loads"], "barriers": e["barriers"],
            "smem": int(md.shared) + e["static_smem"], "threads": int(md.num_warps) * 32,
            "num_warps": int(md.num_warps), "num_stages": int(md.num_stages), "ptx_lines": compiled.asm["ptx"].count("\n")}


def _thread_hints(text: str) -> tuple[int | None, list[tuple[str, int, int]]]:
    default, per_kernel = None, []
    for m in re.finditer(r"//\s*gpu_report:\s*(.*)", text):
        words = m.group(1).split()
        kv = dict(w.split("=", 1) for w in words if "=" in w)
        names = [w for w in words if "=" not in w]
        threads = int(kv["threads"]) if "threads" in kv else None
        dyn = int(kv.get("dyn_smem", 0))
        if names:
            per_kernel.append((names[0], threads, dyn))
        elif threads:
            default = threads
    if default is None:
        m = re.search(r"constexpr\s+(?:int|int64_t|unsigned)\s+kThreads\s*=\s*(\d+)", text)
        default = int(m.group(1)) if m else None
    return default, per_kernel


def nvcc_command(source: str, targets: list[str], out: str) -> list[str]:
    from torch.utils import cpp_extension as ce

    cuda_home = None
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
              os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc") or "/x/x")))):
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            cuda_home = c
            break
    includes = [str(ROOT / "csrc")] + list(ce.include_paths(device_type="cuda"))
    if cuda_home:
        includes.append(os.path.join(cuda_home, "include"))
    try:  # headers of the pip CUDA wheels torch depends on (as setup.py)
        import nvidia
        for base in nvidia.__path__:
            includes += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    gencode = []
    for t in targets:
        cc = t[3:]
        gencode += ["-gencode", f"arch=compute_{cc},code={t}"]
    # Same device flags as setup.py's nvcc line; -fatbin skips the (slow) host compile.
    return (["nvcc", "-fatbin", source, "-o", out, "-std=c++20", "-O3", "--use_fast_math", "-DSSLKERN_WITH_CUDA",
             *ce.COMMON_NVCC_FLAGS, "-Xptxas", "-v", *gencode]
            + [f"-I{d}" for d in dict.fromkeys(includes) if os.path.isdir(d)])


def compile_cuda(source: str, targets: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="sslkern_nvcc_") as d:
        cmd = nvcc_command(source, targets, os.path.join(d, "k.fatbin"))
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed ({r.returncode}):\n{(r.stderr + r.stdout).strip()[-3000:]}")
    entries = parse_ptxas_log(r.stderr + r.stdout)
    if not entries:
        raise RuntimeError(f"no ptxas info in nvcc output:\n{r.stderr[-2000:]}")
    default, per_kernel = _thread_hints(Path(source).read_text())
    names = demangle([e["mangled"] for e in entries])
    rows = []
    for e, full in zip(entries, names):
        short = short_kernel_name(full)
        threads, dyn = default, 0
        for part, t, s in per_kernel:
            if part in short:
                threads, dyn = t or threads, s
        rows.append({"kernel": short, "demangled": full, "target": e["arch"], "regs": e["regs"], "stack": e["stack"],
                     "spill_stores": e["spill_stores"], "spill_loads": e["spill_loads"], "barriers": e["barriers"],
                     "smem": e["static_smem"] + dyn, "threads": threads})
    return rows


def _run_job(job: dict) -> dict:
    if job.get("sys_path") and job["sys_path"] not in sys.path:
        sys.path.insert(0, job["sys_path"])
    try:
        if job["kind"] == "triton":
            return {**job, "ok": True, **compile_triton(job["module"], job["index"], job["target"],
                                                            job.get("import_name"))}
        if job["kind"] == "asm":  # PTX / TTGIR of one config (tests of what the compiler made of it)
            return {**job, "ok": True, **compile_triton_asm(job["module"], job["index"], job["target"])}
        return {**job, "ok": True, "kernels": compile_cuda(job["source"], job["targets"])}
    except Exception as e:
        tb = traceback.format_exc(limit=3)
        return {**job, "ok": False, "error": f"{type(e).__name__}: {e}", "traceback": tb}


def _worker_main(inp: str, outp: str) -> None:
    with open(inp) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        results.append(_run_job(job))
        with open(outp, "w") as f:  # rewritten after each job: a crash keeps what was done
            json.dump(results, f)


def run_jobs(jobs: list[dict], workers: int = 2, timeout: float = 1800) -> list[dict]:
    """Run compile jobs in ``workers`` child processes with a clean Triton environment."""
    if not jobs:
        return []
    workers = max(1, min(workers, len(jobs)))
    # Balance by rough cost: a .cu file (~20 s) weighs like 15 Triton configs (~1-2 s each).
    shards: list[list[dict]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for job in sorted(jobs, key=lambda j: -(15.0 if j["kind"] == "cuda" else 1.0)):
        i = load.index(min(load))
        shards[i].append(job)
        load[i] += 15.0 if job["kind"] == "cuda" else 1.0
    with tempfile.TemporaryDirectory(prefix="sslkern_gpu_report_") as tmp:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton_cache")
        env["TRITON_HOME"] = tmp
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        procs = []
        for i, shard in enumerate(shards):
            inp, outp = os.path.join(tmp, f"jobs{i}.json"), os.path.join(tmp, f"results{i}.json")
            with open(inp, "w") as f:
                json.dump(shard, f)
            log = open(os.path.join(tmp, f"log{i}.txt"), "w")
            p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", inp, outp],
                                 env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
            procs.append((p, shard, outp, log))
        results = []
        for p, shard, outp, log in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()
            done = []
            if os.path.exists(outp):
                with open(outp) as f:
                    done = json.load(f)
            results += done
            if len(done) < len(shard):
                tail = Path(log.name).read_text()[-2000:]
                for job in shard[len(done):]:
                    results.append({**job, "ok": False, "error": f"worker exited with {p.returncode}: {tail}"})
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def collect(targets: list[str] | None = None, only: str | None = None, workers: int = 2,
            cuda: bool = True) -> dict:
    """Compile everything; return {"triton": rows, "cuda": rows, "errors": [...], "cuda_skipped": reason}."""
    targets = targets or list(TARGETS)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"sslkern.gpu_report: targets expected some of {sorted(TARGETS)}, got {t!r}")
    configs, errors = discover_triton(only)
    jobs = [{"kind": "triton", "module": c["module"], "index": c["index"], "target": t} for c in configs for t in targets]
    cuda_skipped = ""
    if cuda:
        ok, why = cuda_toolchain()
        if ok:
            jobs += [{"kind": "cuda", "source": s, "targets": targets} for s in cuda_sources(only)]
        else:
            cuda_skipped = why
    else:
        cuda_skipped = "--no-cuda"
    by_cfg = {(c["module"], c["index"]): c for c in configs}
    triton_rows, cuda_rows = [], []
    for r in run_jobs(jobs, workers):
        if r["kind"] == "triton":
            c = by_cfg[(r["module"], r["index"])]
            row = {**c, "target": r["target"], "ok": r["ok"]}
            if r["ok"]:
                row.update({k: r[k] for k in ("regs", "stack", "spill_stores", "spill_loads", "barriers", "smem",
                                              "threads", "num_warps", "num_stages")})
                row.update(occupancy(r["regs"], r["smem"], r["threads"], r["target"]))
            else:
                row["error"] = r["error"]
            triton_rows.append(row)
        else:
            src = os.path.relpath(r["source"], ROOT)
            if not r["ok"]:
                cuda_rows.append({"source": src, "kernel": "(file)", "target": ",".join(r["targets"]), "ok": False,
                                  "error": r["error"]})
                continue
            for k in r["kernels"]:
                row = {"source": src, "ok": True, **k}
                if k["threads"]:
                    row.update(occupancy(k["regs"], k["smem"], k["threads"], k["target"]))
                cuda_rows.append(row)
    order = {t: i for i, t in enumerate(targets)}
    triton_rows.sort(key=lambda r: (r["module"], r["index"], order.get(r["target"], 9)))
    cuda_rows.sort(key=lambda r: (r["source"], r["kernel"], r["target"]))
    return {"triton": triton_rows, "cuda": cuda_rows, "errors": errors, "cuda_skipped": cuda_skipped,
            "targets": targets}


def _fmt_occ(r: dict) -> list[str]:
    if "occupancy" not in r:
        return ["?", "?", "?", "block size unknown"]
    return [str(r["ctas_per_sm"]), str(r["warps_per_sm"]), f"{100 * r['occupancy']:.0f}%", r["limiter"]]


TRITON_HEADER = ["op module", "kernel", "config", "target", "warps", "stages", "regs/thread", "smem (B)",
                 "spill st/ld (B)", "stack (B)", "CTAs/SM", "warps/SM", "occupancy", "limiter"]
CUDA_HEADER = ["source", "kernel", "target", "threads/CTA", "regs/thread", "smem (B)", "spill st/ld (B)",
               "stack (B)", "CTAs/SM", "warps/SM", "occupancy", "limiter"]


def table_rows(report: dict) -> tuple[list[list[str]], list[list[str]]]:
    tri = []
    for r in report["triton"]:
        gpu = SM_LIMITS[r["target"]].gpu
        if not r["ok"]:
            tri.append([r["module"], r["kernel"], r["name"], f"{r['target']} ({gpu})", str(r["num_warps"]),
                        str(r["num_stages"]), "FAILED", "", "", "", "", "", "", r["error"].splitlines()[0][:120]])
            continue
        tri.append([r["module"], r["kernel"], r["name"], f"{r['target']} ({gpu})", str(r["num_warps"]),
                    str(r["num_stages"]), str(r["regs"]), str(r["smem"]), f"{r['spill_stores']}/{r['spill_loads']}",
                    str(r["stack"]), *_fmt_occ(r)])
    cu = []
    for r in report["cuda"]:
        if not r["ok"]:
            cu.append([r["source"], "(file)", r["target"], "", "FAILED", "", "", "", "", "", "",
                       r["error"].splitlines()[0][:120]])
            continue
        cu.append([r["source"], r["kernel"], f"{r['target']} ({SM_LIMITS[r['target']].gpu})",
                   str(r["threads"] or "?"), str(r["regs"]), str(r["smem"]), f"{r['spill_stores']}/{r['spill_loads']}",
                   str(r["stack"]), *_fmt_occ(r)])
    return tri, cu


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _versions() -> str:
    parts = []
    try:
        import triton
        from triton.backends.nvidia.compiler import get_ptxas
        v = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout.strip()
        m = re.search(r"release ([\d.]+)", v)
        parts.append(f"triton {triton.__version__} (its ptxas {m.group(1) if m else '?'})")
    except Exception as e:  # pragma: no cover - reported, not fatal
        parts.append(f"triton unavailable ({e})")
    try:
        import torch
        parts.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    if shutil.which("nvcc"):
        m = re.search(r"release ([\d.]+)", subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout)
        parts.append(f"nvcc {m.group(1) if m else '?'}")
    return ", ".join(parts)


def _findings(report: dict) -> list[str]:
    """Spills and low occupancy, the rows worth a look."""
    ok = [r for r in report["triton"] + report["cuda"] if r["ok"]]
    label = lambda r: f"`{r.get('module', r.get('source'))}` {r.get('name', r.get('kernel'))} [{r['target']}]"
    spills = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
    low = [r for r in ok if "occupancy" in r and r["occupancy"] < 0.25]
    out = ["### Findings", ""]
    if not spills and not low:
        return out + ["No spills; every kernel reaches at least 25 % occupancy.", ""]
    out += [f"- spills: {label(r)}: {r['spill_stores']} B stored / {r['spill_loads']} B loaded at {r['regs']} "
            f"registers, stack {r['stack']} B" for r in spills]
    groups: dict = {}
    for r in low:
        groups.setdefault((r.get("module", r.get("source")), r["kernel"], r["target"]), []).append(r)
    for (where, kernel, target), rs in groups.items():
        regs = sorted(r["regs"] for r in rs)
        occ = sorted(100 * r["occupancy"] for r in rs)
        out.append(f"- occupancy below 25 %: `{where}` {kernel} [{target}], {len(rs)} config(s): "
                   f"{regs[0]}–{regs[-1]} registers × {rs[0]['threads']} threads → {occ[0]:.0f}–{occ[-1]:.0f} % "
                   f"(limiter: {', '.join(sorted({r['limiter'] for r in rs}))})")
    return out + [""]


def render_markdown(report: dict, command: str, elapsed: float) -> str:
    import gpu_model

    tri, cu = table_rows(report)
    n_ok = sum(r["ok"] for r in report["triton"])
    spills = [r for r in report["triton"] + report["cuda"] if r["ok"] and (r["spill_stores"] or r["spill_loads"])]
    lines = [
        "# GPU report: kernels compiled for real targets (no GPU used)",
        "",
        f"Generated by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC in "
        f"{elapsed:.0f} s; {_versions()}.",
        "Nothing here ran on a GPU: the kernels were compiled ahead of time for sm_80 (A100) and sm_90a "
        "(H100) and the figures are what ptxas reports. Regenerate with `python tools/gpu_report.py`.",
        "",
        f"Triton: {n_ok}/{len(report['triton'])} (config, target) compilations succeeded; "
        f"CUDA C++: {sum(r['ok'] for r in report['cuda'])} kernel entries"
        + (f" (skipped: {report['cuda_skipped']})" if report["cuda_skipped"] else "")
        + f"; {len(spills)} with register spills.",
        "",
        OCCUPANCY_MODEL,
        "",
        "## Triton kernels (one row per AOT config and target)",
        "",
        _md_table(TRITON_HEADER, tri) if tri else "(no Triton configurations found)",
        "",
    ]
    if report["errors"]:
        lines += ["### Modules that could not be read", ""]
        lines += [f"- `sslkern.triton_ops.{e['module']}`: {e['error']}" for e in report["errors"]] + [""]
    failed = [r for r in report["triton"] + report["cuda"] if not r["ok"]]
    if failed:
        lines += ["### Compile failures", ""]
        lines += [f"- {r.get('name', r.get('source'))} [{r['target']}]: `{r['error'].splitlines()[0][:300]}`"
                  for r in failed] + [""]
    lines += _findings(report)
    lines += ["## CUDA C++ kernels (`csrc/cuda/*.cu`, `nvcc -Xptxas -v`)", ""]
    if report["cuda_skipped"]:
        lines += [f"Skipped: {report['cuda_skipped']}.", ""]
    else:
        lines += ["Threads per CTA from the file's `// gpu_report: threads=N` comment or its `kThreads` constant.", "",
                  _md_table(CUDA_HEADER, cu) if cu else "(no .cu files)", ""]
    lines += [gpu_model.render_markdown()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker_main(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(prog="python tools/gpu_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from: " + ", ".join(TARGETS))
    p.add_argument("--only", default=None, help="only op modules / .cu files whose name contains this")
    p.add_argument("--markdown", default=str(ROOT / "docs" / "gpu_report.md"),
                   help="also write the report as markdown here (default: docs/gpu_report.md)")
    p.add_argument("--no-markdown", action="store_true", help="print only")
    p.add_argument("--no-cuda", action="store_true", help="skip the csrc/cuda/*.cu files")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    args = p.parse_args(argv)
    import time

    t0 = time.perf_counter()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        p.error(f"--targets expected a comma-separated subset of {','.join(TARGETS)}, got {args.targets!r}")
    report = collect(targets, args.only, args.jobs, cuda=not args.no_cuda)
    elapsed = time.perf_counter() - t0
    tri, cu = table_rows(report)
    print(OCCUPANCY_MODEL, end="\n\n")
    print("Triton kernels:")
    print(_text_table(TRITON_HEADER, tri))
    print()
    if report["cuda_skipped"]:
        print(f"CUDA C++ kernels: skipped ({report['cuda_skipped']})")
    else:
        print("CUDA C++ kernels:")
        print(_text_table(CUDA_HEADER, cu))
    for e in report["errors"]:
        print(f"\nERROR sslkern.triton_ops.{e['module']}: {e['error']}")
    failed = [r for r in report["triton"] + report["cuda"] if not r["ok"]]
    for r in failed:
        print(f"\nFAILED {r.get('name', r.get('source'))} [{r['target']}]:\n{r['error']}")
    print(f"\n{len(report['triton'])} Triton compilations, {len(report['cuda'])} CUDA kernel entries, "
          f"{len(failed)} failures, {elapsed:.0f} s")
    if not args.no_markdown:
        cmd = "python tools/gpu_report.py" + ("" if not argv else " " + " ".join(argv))
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render_markdown(report, cmd, elapsed))
        print(f"wrote {args.markdown}")
    return 1 if (failed or report["errors"]) else 0


if __name__ == "__main__":
    sys.exit(main())
