"""Schedules used by the SSL methods (momentum, temperatures, learning rate).

Pure functions of the step, so a resumed run recomputes the same value.
"""
from __future__ import annotations

import math


def cosine_schedule(step: int, total_steps: int, start: float, end: float, *, lightly: bool = False) -> float:
    r"""``end + ½(start − end)(1 + cos(π·step/n))``, constant ``end`` once ``step ≥ n``.

    DINO / iBOT / BYOL teacher momentum (0.996 → 1). ``n = total_steps`` follows dino
    ``utils.cosine_scheduler`` (which reaches ``end`` only after the last step);
    ``lightly=True`` uses ``n = total_steps − 1`` like ``lightly.utils.scheduler.cosine_schedule``
    (``end`` exactly at the last step).
    """
    n = total_steps - 1 if lightly else total_steps
    if n <= 0 or step >= n:
        return float(end)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / n))


def linear_anneal(step: int, total_steps: int, start: float, end: float) -> float:
    """fairseq ``get_annealed_rate``: ``end − (end − start)·(1 − step/T)``, ``end`` after T.

    data2vec 2.0 EMA (0.9998 → 0.99999); I-JEPA momentum (0.996 → 1 over all iterations).
    """
    if total_steps <= 0 or step >= total_steps:
        return float(end)
    return end - (end - start) * (1.0 - step / total_steps)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base: float, final: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    return cosine_schedule(step - warmup_steps, max(total_steps - warmup_steps, 1), base, final)
