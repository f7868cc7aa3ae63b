"""ema_update_: every backend against the eager reference."""
import copy

import pytest
import torch

import sslkern
from sslkern.ops.ema_update import dispatch
from sslkern.reference import ema_update_ as ref_ema_update_

from conftest import backend_params

BACKENDS = backend_params(dispatch)

# Shapes: many small tensors (a ViT's biases and norms), odd sizes, empty, a few large.
SHAPES = [(384,), (1,), (0,), (3, 5), (197, 384), (7, 11, 13), (1153,), (65537,), (384, 1536), (0, 4)]
# Tolerances: fp32 results differ from lerp_ only by FMA contraction (~1 ulp of |t|+|s|);
# low-precision teachers round once from fp32, so they may differ by one unit in the last place.
TOL = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12), torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3)}


def make(shapes, tdtype, sdtype, device):
    teachers = [torch.randn(s, device=device).to(tdtype) for s in shapes]
    students = [torch.randn(s, device=device).to(sdtype) for s in shapes]
    return teachers, students


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tdtype,sdtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float64, torch.float64),
    (torch.float64, torch.float32),
])
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_matches_reference(backend, tdtype, sdtype, momentum_kind):
    name, device = backend
    if name == "cuda" and tdtype == torch.float64:
        pytest.skip("the CUDA C++ kernel takes fp32/fp16/bf16 teachers (fp64 runs on Triton)")
    shapes = SHAPES if name != "triton" else SHAPES[:6]  # the interpreter is slow
    teachers, students = make(shapes, tdtype, sdtype, device)
    expected = [t.clone() for t in teachers]
    m = 0.9 + 0.09 * torch.rand(()).item()
    momentum = m if momentum_kind == "float" else torch.tensor(m, device=device)
    ref_ema_update_(expected, students, momentum)
    sslkern.ema_update_(teachers, students, momentum, backend=name)
    atol, rtol = TOL[tdtype]
    for got, want in zip(teachers, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_edges_and_channels_last(backend):
    name, device = backend
    t = torch.randn(2, 3, 5, 4, device=device).to(memory_format=torch.channels_last)
    s = torch.randn(2, 3, 5, 4, device=device).to(memory_format=torch.channels_last)
    t0 = t.clone()
    sslkern.ema_update_([t], [s], 1.0, backend=name)
    torch.testing.assert_close(t, t0, atol=0, rtol=0)       # m = 1: teacher unchanged
    sslkern.ema_update_([t], [s], 0.0, backend=name)
    torch.testing.assert_close(t, s, atol=0, rtol=0)        # m = 0: copy of the student


def test_many_tensors_vit_like():
    timm = pytest.importorskip("timm")
    student = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    tp, sp = list(teacher.parameters()), list(student.parameters())
    expected = [p.detach().clone() for p in tp]
    ref_ema_update_(expected, sp, 0.996)
    sslkern.ema_update_(tp, sp, 0.996)
    for got, want in zip(tp, expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-6)


def test_matches_foreach_lerp_and_peers():
    lightly_utils = pytest.importorskip("lightly.models.utils")
    teachers, students = make(SHAPES, torch.float32, torch.float32, "cpu")
    a = [t.clone() for t in teachers]
    torch._foreach_lerp_(a, students, 1 - 0.99)
    sslkern.ema_update_(teachers, students, 0.99)
    for x, y in zip(teachers, a):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    # lightly.update_momentum works on modules: model_ema <- m * model_ema + (1 - m) * model
    net_s = torch.nn.Linear(17, 9)
    net_t = copy.deepcopy(net_s)
    with torch.no_grad():
        for p in net_s.parameters():
            p.add_(1.0)
    mine = copy.deepcopy(net_t)
    lightly_utils.update_momentum(net_s, net_t, m=0.9)
    sslkern.ema_update_(list(mine.parameters()), list(net_s.parameters()), 0.9)
    for x, y in zip(mine.parameters(), net_t.parameters()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_eager_cpu_fast_path_bumps_versions_and_takes_parameters():
    """The eager CPU call goes straight to the kernel: teachers' versions still move (autograd sees
    the in-place write), nn.Parameters and uneven element counts per thread are handled, and the
    result equals the reference."""
    g = torch.Generator().manual_seed(5)
    sizes = [384, 7, 1152 * 384, 3, 16385, 1, 65536 + 17] * 3  # tiny and chunk-crossing tensors mixed
    teachers = [torch.nn.Parameter(torch.randn(n, generator=g), requires_grad=i % 2 == 0) for i, n in enumerate(sizes)]
    students = [torch.randn(n, generator=g) for n in sizes]
    want = [t.detach().clone() for t in teachers]
    ref_ema_update_(want, students, 0.99)
    before = [t._version for t in teachers]
    sslkern.ema_update_(teachers, students, 0.99)
    assert all(t._version > v for t, v in zip(teachers, before))
    for t, w in zip(teachers, want):
        torch.testing.assert_close(t.detach(), w, rtol=1e-6, atol=1e-7)
    # a view into the teacher's storage at another offset is still refused
    buf = torch.randn(20)
    with pytest.raises(ValueError, match="share memory"):
        sslkern.ema_update_([buf[:10]], [buf[10:]], 0.5)


def test_opcheck():
    teachers, students = make([(5, 3), (7,)], torch.float32, torch.float32, "cpu")
    for mt, mv in [(None, 0.9), (torch.tensor(0.9), 0.0)]:
        torch.library.opcheck(torch.ops.sslkern.ema_update_.default, (teachers, students, mt, mv, ""))


def test_compile_fullgraph_equals_eager():
    teachers, students = make([(33, 7), (5,), (1000,)], torch.float32, torch.float32, "cpu")
    expected = [t.clone() for t in teachers]
    sslkern.ema_update_(expected, students, torch.tensor(0.97))

    @torch.compile(fullgraph=True, backend="inductor")
    def step(ts, ss, m):
        sslkern.ema_update_(ts, ss, m)

    step(teachers, students, torch.tensor(0.97))
    for got, want in zip(teachers, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("call,match", [
    (lambda t, s: sslkern.ema_update_(t, s[:1], 0.9), "same length"),
    (lambda t, s: sslkern.ema_update_(t, [s[0], torch.randn(4)], 0.9), r"students\[1\] expected shape \(3,\)"),
    (lambda t, s: sslkern.ema_update_(t, [s[0], s[1].long()], 0.9), r"students\[1\] expected dtype"),
    (lambda t, s: sslkern.ema_update_([t[0], t[1].int()], s, 0.9), r"teachers\[1\] expected dtype"),
    (lambda t, s: sslkern.ema_update_(t, [s[0], t[1]], 0.9), "share memory"),
    (lambda t, s: sslkern.ema_update_(t, [s[0], t[1][:]], 0.9), "share memory"),
    (lambda t, s: sslkern.ema_update_(t, s, 1.5), r"momentum must be in \[0.0, 1.0\]"),
    (lambda t, s: sslkern.ema_update_(t, s, torch.ones(2)), "momentum expected one element"),
    (lambda t, s: sslkern.ema_update_(t, [s[0].t(), s[1]], 0.9), "dense with equal strides"),
    (lambda t, s: sslkern.ema_update_(t, s, 0.9, backend="nope"), "backend must be one of"),
    (lambda t, s: sslkern.ema_update_(t, s, 0.9, backend="cuda"), "cannot run here"),
])
def test_bad_input(call, match):
    t = [torch.randn(4, 4), torch.randn(3)]
    s = [torch.randn(4, 4), torch.randn(3)]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(t, s)


def test_forced_backend_context():
    t, s = [torch.randn(10)], [torch.randn(10)]
    with sslkern.use_backend("reference"):
        assert dispatch.resolve(torch.device("cpu")) == "reference"
        sslkern.ema_update_(t, s, 0.5)
    assert dispatch.resolve(torch.device("cpu")) == "cpu"


@pytest.mark.skipif(not (sslkern._backend.backend_status()["triton"][0] and not torch.cuda.is_available()),
                    reason="needs the Triton interpreter on CPU tensors")
def test_triton_alignment_variant_and_cached_table(monkeypatch):
    """Aligned tensors take the ALIGNED kernel (tl.multiple_of hints), an offset view (4 bytes off
    16) the plain one; sizes off the block (tails) are exact either way; a second call with the
    same tensors uploads no table."""
    from sslkern.triton_ops import ema_update as te
    flags, uploads = [], []
    real_kernel, real_upload = te.ema_update_kernel, te.upload_table

    class Rec:
        def __getitem__(self, grid):
            return lambda *a, **k: (flags.append(k["ALIGNED"]), real_kernel[grid](*a, **k))

    monkeypatch.setattr(te, "ema_update_kernel", Rec())
    monkeypatch.setattr(te, "upload_table", lambda rows, dev: (uploads.append(1), real_upload(rows, dev))[1])
    te._tables.clear()
    n = te.BLOCK * 3 + 77
    for offset in (0, 1):
        base_t, base_s = torch.randn(n + 1), torch.randn(n + 1)
        t, s = base_t[offset:offset + n], base_s[offset:offset + n]
        want = torch.lerp(t.clone(), s, 1 - 0.9)
        sslkern.ema_update_([t], [s], 0.9, backend="triton")
        torch.testing.assert_close(t, want, atol=1e-6, rtol=1e-6)
        sslkern.ema_update_([t], [s], 0.9, backend="triton")
    assert flags == [True, True, False, False]
    assert len(uploads) == 2  # one table per tensor set, reused by the second call
