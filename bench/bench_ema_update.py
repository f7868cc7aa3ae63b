"""ema_update_ on the parameter lists of timm ViT-S/16 and ViT-B/16.

Providers: sslkern (C++ kernel on CPU), reference (sslkern.reference: per-tensor lerp_),
compiled (torch.compile of the reference), loop (per-parameter mul_/add_, dino style),
foreach_lerp (torch._foreach_lerp_, timm ModelEmaV3), lightly (update_momentum),
flat_lerp (one lerp_ over pre-flattened buffers: the bandwidth floor, read 2N write N).
Default run: ViT-B fp32 and ViT-S with a bf16 student against the reference, foreach_lerp,
lightly and flat_lerp; SSLKERN_BENCH_FULL=1 adds ViT-S fp32, the other providers and the
round-robin timings.
"""
import copy

import pytest
import torch

import sslkern
from harness import full_sweep_only, measure, measure_interleaved, sweep

timm = pytest.importorskip("timm")
M = 0.996

_models = {}


def params(arch: str, student_dtype: torch.dtype):
    key = (arch, student_dtype)
    if key not in _models:
        student = timm.create_model(arch, pretrained=False, num_classes=0)
        teacher = copy.deepcopy(student)
        student = student.to(student_dtype)
        _models[key] = (teacher, student)
    teacher, student = _models[key]
    return teacher, student, [p.data for p in teacher.parameters()], [p.data for p in student.parameters()]


def providers(mixed: bool):
    names = ["sslkern", "reference", "compiled", "foreach_lerp", "loop", "lightly", "flat_lerp"]
    return names


def make_fn(provider, teacher, student, tp, sp):
    mixed = sp[0].dtype != tp[0].dtype
    if provider == "sslkern":
        return lambda: sslkern.ema_update_(tp, sp, M)
    if provider == "reference":
        return lambda: sslkern.reference.ema_update_(tp, sp, M)
    if provider == "compiled":
        compiled = torch.compile(sslkern.reference.ema_update_)
        return lambda: compiled(tp, sp, M)
    if provider == "foreach_lerp":
        if mixed:  # ModelEmaV3 with a lower-precision model: upcast each tensor, then one foreach
            return lambda: torch._foreach_lerp_(tp, [s.float() for s in sp], 1 - M)
        return lambda: torch._foreach_lerp_(tp, sp, 1 - M)

    if provider == "loop":
        def loop():
            for t, s in zip(tp, sp):
                t.mul_(M).add_(s.to(t.dtype), alpha=1 - M)
        return loop
    if provider == "lightly":
        from lightly.models.utils import update_momentum

        return lambda: update_momentum(student, teacher, M)
    if provider == "flat_lerp":
        flat_t = torch.cat([t.reshape(-1) for t in tp])
        flat_s = torch.cat([s.reshape(-1) for s in sp])
        if mixed:
            return lambda: flat_t.lerp_(flat_s.float(), 1 - M)
        return lambda: flat_t.lerp_(flat_s, 1 - M)
    raise ValueError(provider)


CASES = [
    ("vit_small_patch16_224", torch.float32, {"foreach_lerp": 1.0, "flat_lerp": 1 / 1.1}),
    ("vit_base_patch16_224", torch.float32, {"foreach_lerp": 1.0, "flat_lerp": 1 / 1.1}),
    ("vit_small_patch16_224", torch.bfloat16, {"foreach_lerp": 2.0}),
]


@pytest.mark.parametrize("provider", sweep(providers(False), ["sslkern", "reference", "foreach_lerp", "lightly",
                                                              "flat_lerp"]))
@pytest.mark.parametrize("arch,sdtype,targets", sweep(CASES, CASES[1:]),
                         ids=["vit_s-fp32", "vit_b-fp32", "vit_s-fp32_teacher_bf16_student"])
def test_ema_update(benchmark, provider, arch, sdtype, targets):
    teacher, student, tp, sp = params(arch, sdtype)
    n = sum(t.numel() for t in tp)
    bytes_moved = n * (4 + sp[0].element_size() + 4)  # read teacher + student, write teacher
    case = (f"{arch.split('_patch')[0].replace('vit_small', 'ViT-S').replace('vit_base', 'ViT-B')} "
            f"({n / 1e6:.1f}M params, {len(tp)} tensors), teacher fp32, student {str(sdtype).split('.')[-1]}")
    measure(benchmark, op="ema_update_", case=case, provider=provider,
            fn=make_fn(provider, teacher, student, tp, sp), bytes_moved=bytes_moved,
            target=targets.get(provider), rounds=15, warmup=2)


@full_sweep_only
@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "vit_base_patch16_224"], ids=["vit_s", "vit_b"])
def test_ema_update_interleaved(benchmark, arch):
    """sslkern, _foreach_lerp_ and one lerp_ over pre-flattened buffers, timed round-robin (one
    call of each per round): their ratios (targets 1.0x and 1/1.1) are within the VM's drift
    when each is timed in its own block."""
    teacher, student, tp, sp = params(arch, torch.float32)
    fns = {p: make_fn(p, teacher, student, tp, sp) for p in ("sslkern", "foreach_lerp", "flat_lerp")}
    name = arch.split("_patch")[0].replace("vit_small", "ViT-S").replace("vit_base", "ViT-B")
    measure_interleaved(benchmark, op="ema_update_", case=f"{name} ({len(tp)} tensors) fp32, interleaved",
                        fns=fns, rounds=30)
