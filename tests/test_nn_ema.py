"""sslkern.nn.EMATeacher and the momentum schedules."""
import copy
import math

import pytest
import torch
from torch import nn

import sslkern
from sslkern import schedules


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.decoder = nn.Linear(4, 8)


def perturb(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net.enc[1].running_mean.add_(1.0)
        net.enc[1].num_batches_tracked.add_(5)


def test_update_semantics():
    student = Net()
    ema = sslkern.nn.EMATeacher(student)
    before = copy.deepcopy(ema.module)
    perturb(student)
    ema.update(student, 0.9)
    for (name, t), (_, t0), (_, s) in zip(ema.module.named_parameters(), before.named_parameters(),
                                          student.named_parameters()):
        if name == "frozen":  # requires_grad=False: copied
            torch.testing.assert_close(t, s)
        else:
            torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s, atol=1e-6, rtol=1e-6)
    bn_t, bn_s = ema.module.enc[1], student.enc[1]
    torch.testing.assert_close(bn_t.running_mean, bn_s.running_mean)       # float buffer: copied
    assert bn_t.num_batches_tracked.item() == bn_s.num_batches_tracked.item()  # integer buffer: copied
    assert not any(p.requires_grad for p in ema.parameters())


def test_teacher_subset_skips_student_extras_and_mixed_dtype():
    student = Net().to(torch.bfloat16)
    teacher_enc = copy.deepcopy(student.enc).float()

    class Wrap(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

    ema = sslkern.nn.EMATeacher(student, teacher=Wrap(teacher_enc))
    t0 = [p.clone() for p in ema.module.parameters()]
    perturb(student)
    ema.update(student, torch.tensor(0.5))
    for t, a, (_, s) in zip(ema.module.parameters(), t0, student.enc.named_parameters()):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, 0.5 * a + 0.5 * s.float(), atol=1e-6, rtol=1e-6)


def test_teacher_param_missing_in_student_is_an_error():
    student = nn.Linear(3, 3)
    teacher = nn.Sequential(nn.Linear(3, 3))
    ema = sslkern.nn.EMATeacher(student, teacher=teacher)
    with pytest.raises(ValueError, match="no counterpart in the student"):
        ema.update(student, 0.9)


def test_timm_vit_teacher_matches_foreach_lerp():
    timm = pytest.importorskip("timm")
    student = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    ema = sslkern.nn.EMATeacher(student)
    ref = copy.deepcopy(ema.module)
    perturb_vit = [p for p in student.parameters()]
    with torch.no_grad():
        for p in perturb_vit:
            p.add_(torch.randn_like(p))
    for _ in range(3):
        ema.update(student, 0.99)
        torch._foreach_lerp_(list(ref.parameters()), [p.detach() for p in student.parameters()], 0.01)
    for a, b in zip(ema.module.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_cosine_schedule_matches_dino_and_lightly():
    np = pytest.importorskip("numpy")
    n, base, final = 50, 0.996, 1.0
    # dino utils.cosine_scheduler (no warm-up): final + 0.5 (base - final)(1 + cos(pi * i / len(iters)))
    iters = np.arange(n)
    dino = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    ours = [schedules.cosine_schedule(i, n, base, final) for i in range(n)]
    np.testing.assert_allclose(ours, dino, rtol=0, atol=1e-12)
    lightly_sched = pytest.importorskip("lightly.utils.scheduler")
    for i in range(n):
        want = lightly_sched.cosine_schedule(i, n, base, final)
        assert math.isclose(schedules.cosine_schedule(i, n, base, final, lightly=True), want, abs_tol=1e-12)


def test_linear_anneal_matches_fairseq():
    # fairseq get_annealed_rate(start, end, curr_step, total_steps)
    def get_annealed_rate(start, end, curr_step, total_steps):
        if curr_step >= total_steps:
            return end
        r = end - start
        pct_remaining = 1 - curr_step / total_steps
        return end - r * pct_remaining

    for step in [0, 1, 17, 99, 100, 250]:
        assert math.isclose(schedules.linear_anneal(step, 100, 0.9998, 0.99999),
                            get_annealed_rate(0.9998, 0.99999, step, 100), abs_tol=1e-15)
    assert schedules.linear_anneal(0, 100, 0.996, 1.0) == pytest.approx(0.996)
