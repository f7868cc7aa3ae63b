"""``ema_update_`` — multi-tensor EMA, Triton kernel: one launch over a chunk table.

Each program owns one chunk (``CHUNK`` elements) of one (teacher, student) pair and reads
the pair's addresses from a table of rows ``(teacher_ptr, student_ptr, begin, end)``, so a
ViT's ~150 parameter tensors take one launch per dtype combination. The table is cached
by tensor addresses (parameters do not move between steps), so a step costs no host work
beyond the lookup. ``m`` is read on the device (no host sync).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

CHUNK = 1 << 14
BLOCK = 1024
NUM_WARPS = 4

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


@triton.jit
def ema_update_kernel(table_ptr, momentum_ptr,
                      T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    row = table_ptr + tl.program_id(0) * 4
    t_ptr = tl.load(row).to(tl.pointer_type(T_DTYPE))
    s_ptr = tl.load(row + 1).to(tl.pointer_type(S_DTYPE))
    begin = tl.load(row + 2)
    end = tl.load(row + 3)
    m64 = tl.load(momentum_ptr)  # fp64 scalar
    w = (1.0 - m64).to(COMPUTE)
    m = m64.to(COMPUTE)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        t = tl.load(t_ptr + offs, mask=mask).to(COMPUTE)
        s = tl.load(s_ptr + offs, mask=mask).to(COMPUTE)
        # torch.lerp's two forms: exact at m = 1 (teacher kept) and m = 0 (student copied).
        new = tl.where(w < 0.5, t + w * (s - t), s - m * (s - t))
        tl.store(t_ptr + offs, new.to(T_DTYPE), mask=mask)


_tables: OrderedDict = OrderedDict()


def _chunk_table(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
    key = tuple((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in pairs) + (str(device),)
    table = _tables.get(key)
    if table is None:
        rows = []
        for t, s in pairs:
            n = t.numel()
            rows += [(t.data_ptr(), s.data_ptr(), b, min(b + CHUNK, n)) for b in range(0, n, CHUNK)]
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table
        _tables[key] = table
        while len(_tables) > 16:
            _tables.popitem(last=False)
    _tables.move_to_end(key)
    return table


def ema_update_triton(teachers, students, momentum, momentum_value):
    if not teachers:
        return
    device = teachers[0].device
    groups: dict = {}
    for t, s in zip(teachers, students):
        if t.numel():
            groups.setdefault((t.dtype, s.dtype), []).append((t, s))
    # Momentum always travels as a device scalar (a fill, not a copy: no host sync).
    if momentum is None:
        momentum = torch.full((), momentum_value, dtype=torch.float64, device=device)
    else:
        momentum = momentum.to(device=device, dtype=torch.float64).reshape(())
    for (tdt, sdt), pairs in groups.items():
        table = _chunk_table(pairs, device)
        ema_update_kernel[(table.shape[0],)](
            table, momentum, T_DTYPE=_TL_DTYPE[tdt], S_DTYPE=_TL_DTYPE[sdt],
            COMPUTE=tl.float64 if tdt == torch.float64 else tl.float32, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )


# Every configuration the launcher can pick, for the GPU report (compiled ahead of time).
AOT_CONFIGS = [
    dict(name=f"ema_update_kernel T={tn} S={sn}", kernel=ema_update_kernel,
         signature={"table_ptr": "*i64", "momentum_ptr": "*fp64"},
         constexprs={"T_DTYPE": tt, "S_DTYPE": st, "COMPUTE": tl.float64 if tt == tl.float64 else tl.float32,
                     "BLOCK": BLOCK},
         num_warps=NUM_WARPS, num_stages=3)
    for tn, tt, sn, st in [
        ("fp32", tl.float32, "fp32", tl.float32), ("fp32", tl.float32, "bf16", tl.bfloat16),
        ("fp32", tl.float32, "fp16", tl.float16), ("bf16", tl.bfloat16, "bf16", tl.bfloat16),
        ("fp16", tl.float16, "fp16", tl.float16), ("fp64", tl.float64, "fp64", tl.float64),
        ("fp64", tl.float64, "fp32", tl.float32),
    ]
]
