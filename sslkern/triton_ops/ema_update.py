"""``ema_update_`` — multi-tensor EMA, Triton kernel: one launch over a chunk table.

Each program owns one chunk (``CHUNK`` elements) of one (teacher, student) pair and reads
the pair's addresses from a table of rows ``(teacher_ptr, student_ptr, begin, end)``, so a
ViT's ~150 parameter tensors take one launch per dtype combination. The table is cached
by tensor addresses (parameters do not move between steps), so a step costs no host work
beyond the lookup, and a call under CUDA-graph capture after a warm-up call uploads nothing
(the pinned host copy of each table is kept alive too). ``m`` is read on the device (no
host sync). The launcher checks that every data pointer is 16-byte aligned and then tells
the kernel so (``tl.multiple_of``: loads and stores vectorise, which addresses read from a
table otherwise prevent); an unaligned tensor (an offset view) takes the ``ALIGNED=False``
variant.
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
                      T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                      ALIGNED: tl.constexpr):
    row = table_ptr + tl.program_id(0) * 4
    t_ptr = tl.load(row).to(tl.pointer_type(T_DTYPE))
    s_ptr = tl.load(row + 1).to(tl.pointer_type(S_DTYPE))
    begin = tl.load(row + 2)
    end = tl.load(row + 3)
    if ALIGNED:
        # Addresses read from a table carry no alignment facts: state what the launcher checked
        # (16-byte aligned bases; chunk starts are multiples of CHUNK), so loads vectorise.
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
        begin = tl.multiple_of(begin, BLOCK)
    m64 = tl.load(momentum_ptr)  # fp64 scalar
    w = (1.0 - m64).to(COMPUTE)
    m = m64.to(COMPUTE)
    # Whole blocks without a mask (a mask against an arbitrary end also blocks vector
    # accesses), then one masked tail block.
    full_end = begin + (end - begin) // BLOCK * BLOCK
    for start in range(begin, full_end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        t = tl.load(t_ptr + offs).to(COMPUTE)
        s = tl.load(s_ptr + offs).to(COMPUTE)
        # torch.lerp's two forms: exact at m = 1 (teacher kept) and m = 0 (student copied).
        new = tl.where(w < 0.5, t + w * (s - t), s - m * (s - t))
        tl.store(t_ptr + offs, new.to(T_DTYPE))
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        mask = offs < end
        t = tl.load(t_ptr + offs, mask=mask).to(COMPUTE)
        s = tl.load(s_ptr + offs, mask=mask).to(COMPUTE)
        new = tl.where(w < 0.5, t + w * (s - t), s - m * (s - t))
        tl.store(t_ptr + offs, new.to(T_DTYPE), mask=mask)


_tables: OrderedDict = OrderedDict()
_CAPTURED: list = []


def upload_table(rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(host, device) copies of an int64 table. The pinned host copy is kept alive with the
    device copy: an upload recorded during CUDA-graph capture replays from that buffer, which
    must therefore outlive the graph (a temporary would be freed and reused)."""
    if device.type != "cuda":
        return rows, rows
    host = rows.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED.append(host)  # a graph replays this copy: never free the buffer (cache eviction)
    return host, host.to(device, non_blocking=True)


def _aligned(pairs) -> bool:
    # The chunk starts are multiples of CHUNK elements, so aligned bases keep every chunk aligned.
    return all(t.data_ptr() % 16 == 0 and s.data_ptr() % 16 == 0 for t, s in pairs)


def _chunk_table(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
                 ) -> tuple[torch.Tensor, bool]:
    """(device table, whether every base address is 16-byte aligned), cached by addresses."""
    key = tuple((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in pairs) + (str(device),)
    entry = _tables.get(key)
    if entry is None:
        rows = []
        for t, s in pairs:
            n = t.numel()
            rows += [(t.data_ptr(), s.data_ptr(), b, min(b + CHUNK, n)) for b in range(0, n, CHUNK)]
        entry = _tables[key] = upload_table(torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), device) + (
            _aligned(pairs),)
        while len(_tables) > 16:
            _tables.popitem(last=False)
    _tables.move_to_end(key)
    return entry[1], entry[2]


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
        table, aligned = _chunk_table(pairs, device)
        ema_update_kernel[(table.shape[0],)](
            table, momentum, T_DTYPE=_TL_DTYPE[tdt], S_DTYPE=_TL_DTYPE[sdt],
            COMPUTE=tl.float64 if tdt == torch.float64 else tl.float32, BLOCK=BLOCK, ALIGNED=aligned,
            num_warps=NUM_WARPS,
        )


# Every configuration the launcher can pick, for the GPU report (compiled ahead of time).
AOT_CONFIGS = [
    dict(name=f"ema_update_kernel T={tn} S={sn}" + ("" if al else " unaligned"), kernel=ema_update_kernel,
         signature={"table_ptr": "*i64", "momentum_ptr": "*fp64"},
         constexprs={"T_DTYPE": tt, "S_DTYPE": st, "COMPUTE": tl.float64 if tt == tl.float64 else tl.float32,
                     "BLOCK": BLOCK, "ALIGNED": al},
         num_warps=NUM_WARPS, num_stages=3)
    for al in (True, False)  # False: a tensor whose data pointer is not 16-byte aligned (an offset view)
    for tn, tt, sn, st in [
        ("fp32", tl.float32, "fp32", tl.float32), ("fp32", tl.float32, "bf16", tl.bfloat16),
        ("fp32", tl.float32, "fp16", tl.float16), ("bf16", tl.bfloat16, "bf16", tl.bfloat16),
        ("fp16", tl.float16, "fp16", tl.float16), ("fp64", tl.float64, "fp64", tl.float64),
        ("fp64", tl.float64, "fp32", tl.float32),
    ]
]
