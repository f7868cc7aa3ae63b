"""Mixed precision for the loop: which precision ``auto`` means, autocast, and fp16 loss scaling.

``--precision auto`` resolves to
  * ``bf16`` on a CUDA device that supports it (``torch.cuda.is_bf16_supported()``), else ``fp32``
    (fp16 needs a loss scaler: ask for it);
  * on a CPU, ``bf16`` when the CPU multiplies bf16 matrices natively (oneDNN's check: AVX512-BF16
    or AMX) AND the model is at least ViT-S wide (embed dim >= 384), else ``fp32``: on such a CPU
    (AMD EPYC Zen 4, AVX512-BF16) ViT-S/16 at 224 trains faster in bf16 while the digits
    defaults' dim-96 ViT runs slower (the per-op casts outweigh the matmuls; figures in
    docs/recipes/README.md), and keeping those defaults in fp32 keeps their results the same on
    every machine.

What runs in which precision: the method's forward (student and teacher) under
``torch.autocast``; parameters, gradients, AdamW state and the EMA teachers stay fp32 (the EMA
reads the fp32 student); the sslkern ops take their half-precision paths where autocast hands
them half inputs. ``fp16`` scales the loss with a ``GradScaler`` (initial scale 65,536): a step
whose gradients overflow is skipped and counted (``skipped_steps`` in the metrics); ``bf16``
needs no scaler.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_MIN_DIM = 384


def cpu_native_bf16() -> bool:
    from sslkern._backend import cpu_native_half

    return cpu_native_half(torch.bfloat16)


def resolve_precision(requested: str, device: torch.device, embed_dim: int) -> tuple[str, str]:
    """(precision, why) for ``--precision requested`` on ``device`` with a model of ``embed_dim``."""
    if requested != "auto":
        return requested, "asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the CUDA device supports bf16"
        return "fp32", "auto: the CUDA device has no bf16 (ask for fp16 to use a loss scaler)"
    if not cpu_native_bf16():
        return "fp32", "auto: this CPU has no native bf16 matmul (oneDNN: no AVX512-BF16 / AMX)"
    if embed_dim < CPU_BF16_MIN_DIM:
        return "fp32", f"auto: native bf16 CPU, but a model narrower than {CPU_BF16_MIN_DIM} runs faster in fp32"
    return "bf16", "auto: this CPU multiplies bf16 natively (oneDNN: AVX512-BF16 / AMX)"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


class LossScaler:
    """fp16's ``GradScaler``; a pass-through for fp32 and bf16."""

    def __init__(self, device: torch.device, precision: str):
        self.scaler = torch.amp.GradScaler(device.type, init_scale=65536.0) if precision == "fp16" else None
        self.skipped = 0

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale_(self, opt) -> None:
        if self.scaler:
            self.scaler.unscale_(opt)

    def step(self, opt) -> None:
        if not self.scaler:
            opt.step()
            return
        before = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        if self.scaler.get_scale() < before:  # the gradients held inf / NaN: no update was made
            self.skipped += 1

    def metrics(self) -> dict:
        if not self.scaler:
            return {}
        return {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped}

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler else None, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = state.get("skipped", 0)
