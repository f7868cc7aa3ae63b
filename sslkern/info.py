"""``python -m sslkern.info``: versions, available backends (and why not), each op's backends, and
what the recipes' ``--precision auto`` resolves to here (and why)."""
from __future__ import annotations

import importlib
import platform
import sys

import torch

from . import __version__
from ._backend import backend_status, extension


def _ops():
    """(public name, Dispatch) for every op module in sslkern.ops."""
    import pkgutil

    from . import ops

    found = []
    for mod in pkgutil.iter_modules(ops.__path__):
        m = importlib.import_module(f"{ops.__name__}.{mod.name}")
        for value in vars(m).values():
            if type(value).__name__ == "Dispatch" and value not in [d for _, d in found]:
                found.append((value.op, value))
    return sorted(found, key=lambda x: x[0])


def precision_report() -> list[str]:
    """What ``--precision auto`` picks for the recipes on this machine's devices, and why
    (:func:`sslkern.train.precision.resolve_precision`)."""
    from ._backend import cpu_native_half
    from .train.loop import COMMON_DEFAULTS
    from .train.precision import CPU_BF16_MIN_DIM, cpu_native_bf16, resolve_precision

    native = cpu_native_bf16()
    lines = ["--precision auto (the recipes' mixed precision):",
             f"  cpu: native bf16 matmul {'yes' if native else 'no'}, native fp16 matmul "
             f"{'yes' if cpu_native_half(torch.float16) else 'no'} (oneDNN's checks; AVX512-BF16 / AMX)"]
    small = COMMON_DEFAULTS["dim"]
    for dim, what in ((small, f"the digits default, dim {small}"), (CPU_BF16_MIN_DIM, f"ViT-S, dim {CPU_BF16_MIN_DIM}")):
        precision, why = resolve_precision("auto", torch.device("cpu"), dim)
        lines.append(f"  cpu, {what}: {precision} — {why.removeprefix('auto: ')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            precision, why = resolve_precision("auto", torch.device("cuda", i), CPU_BF16_MIN_DIM)
            lines.append(f"  cuda:{i} ({torch.cuda.get_device_name(i)}): {precision} — {why.removeprefix('auto: ')}")
    else:
        lines.append("  cuda: no device visible (on a CUDA device with bf16, auto picks bf16)")
    return lines


def report() -> str:
    lines = [f"sslkern {__version__}", f"python {platform.python_version()} on {platform.machine()} ({platform.system()})"]
    lines.append(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
                 f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
                 f"threads: {torch.get_num_threads()})")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    ext = extension()
    if ext is not None:
        lines.append(f"sslkern._C: {ext.__file__} (CUDA kernels built: {ext.cuda_built()})")
        limit = ext.output_cache_info()[0]
        lines.append(f"CPU output cache: {f'up to {limit >> 20} MiB of free blocks' if limit else 'off'} "
                     "(SSLKERN_CPU_CACHE_MB)")
    lines.append("")
    lines += precision_report()
    lines.append("")
    lines.append("backends:")
    for name, (ok, why) in backend_status().items():
        lines.append(f"  {name:<10} {'yes' if ok else 'no ':<4} {why}")
    lines.append("")
    lines.append("ops (backends implemented; default on CPU / on CUDA):")
    for name, d in _ops():
        cpu_default = d.resolve(torch.device("cpu"))
        gpu = next((b for b in d.gpu_order if b in d.backends), "reference")
        lines.append(f"  {name:<26} {', '.join(d.backends):<32} cpu -> {cpu_default}; cuda -> {gpu}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
