"""data2vec targets and masked regression: every backend against fairseq's
math (make_targets, d2v_loss with the clone repeat), the v1 layer-norm path and I-JEPA."""
import math

import pytest
import torch
import torch.nn.functional as F

import sslkern
from sslkern.ops.layer_average_targets import dispatch as targets_dispatch
from sslkern.ops.masked_regression_loss import dispatch as loss_dispatch

from conftest import backend_params

TARGET_BACKENDS = backend_params(targets_dispatch, include_reference=True)
LOSS_BACKENDS = backend_params(loss_dispatch, include_reference=True)


# ----------------------------------------------------------------------------------------
# Oracles written from the public code (fairseq data2vec2.py, data2vec_vision, I-JEPA)
# ----------------------------------------------------------------------------------------
def fairseq_make_targets(y, num_layers, instance_norm_target_layer=True, layer_norm_target_layer=False,
                         layer_norm_targets=True, instance_norm_targets=False):
    target_layer_results = y[-num_layers:]
    if instance_norm_target_layer:
        target_layer_results = [F.instance_norm(t.transpose(1, 2).float()).transpose(1, 2)
                                for t in target_layer_results]
    if layer_norm_target_layer:
        target_layer_results = [F.layer_norm(t.float(), t.shape[-1:]) for t in target_layer_results]
    out = target_layer_results[0].float().clone()
    for t in target_layer_results[1:]:
        out.add_(t.float())
    out = out.div_(len(target_layer_results))
    if layer_norm_targets:
        out = F.layer_norm(out, out.shape[-1:])
    if instance_norm_targets:
        out = F.instance_norm(out.transpose(1, 2)).transpose(1, 2)
    return out


def fairseq_d2v_loss(x, y, loss_beta=0.0, loss_scale=None):
    x = x.reshape(-1, x.size(-1)).float()
    y = y.reshape(-1, x.size(-1))
    loss = F.mse_loss(x, y, reduction="none") if loss_beta == 0 else F.smooth_l1_loss(x, y, reduction="none",
                                                                                     beta=loss_beta)
    scale = loss_scale if loss_scale is not None else 1 / math.sqrt(x.size(-1))
    return loss * scale


def fairseq_regression(x, targets, mask, clone_batch, loss_beta=0.0):
    """data2vec2 forward: repeat the targets per clone, select masked tokens, sum."""
    y = targets.repeat_interleave(clone_batch, 0) if clone_batch > 1 else targets
    return fairseq_d2v_loss(x[mask], y[mask], loss_beta).sum()


def layers_12(B, T, D, dtype=torch.float32, device="cpu"):
    # Different per-channel offsets and scales per layer, like real block outputs.
    return [(torch.randn(B, T, D, device=device) * (0.5 + torch.rand(D, device=device) * 3)
             + torch.randn(D, device=device) * 4).to(dtype) for _ in range(12)]


def small(name):
    return name == "triton"  # the Triton interpreter is slow


# Tolerances: fp32 targets differ from fairseq only by summation order and the shifted
# one-pass variance (~1e-6 on unit-variance outputs); 1e-4 leaves room for T = 197.
TGT_TOL = dict(atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------
# layer_average_targets
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", TARGET_BACKENDS)
@pytest.mark.parametrize("K", [1, 6, 8, 10])
@pytest.mark.parametrize("path", ["d2v2_instance", "v1_layer"])
def test_targets_match_fairseq_top_k(backend, K, path):
    name, device = backend
    B, T, D = (2, 37, 45) if small(name) else (3, 197, 77)
    ys = layers_12(B, T, D, device=device)
    if path == "d2v2_instance":
        want = fairseq_make_targets(ys, K, instance_norm_target_layer=True, layer_norm_targets=True)
        got = sslkern.layer_average_targets(ys[-K:], layer_norm="instance", final_norm="layer", backend=name)
    else:  # data2vec v1 vision: layer norm per layer, plain average
        want = fairseq_make_targets(ys, K, instance_norm_target_layer=False, layer_norm_target_layer=True,
                                    layer_norm_targets=False)
        got = sslkern.layer_average_targets(ys[-K:], layer_norm="layer", final_norm="none", backend=name)
    assert got.dtype == torch.float32 and got.shape == (B, T, D) and not got.requires_grad
    torch.testing.assert_close(got, want, **TGT_TOL)


@pytest.mark.parametrize("backend", TARGET_BACKENDS)
@pytest.mark.parametrize("layer_norm", ["instance", "layer", "none"])
@pytest.mark.parametrize("final_norm", ["layer", "instance", "none"])
def test_targets_all_norm_combinations(backend, layer_norm, final_norm):
    name, device = backend
    B, T, D = (2, 13, 33) if small(name) else (2, 50, 65)
    ys = layers_12(B, T, D, device=device)[:4]
    want = fairseq_make_targets(ys, 4, instance_norm_target_layer=layer_norm == "instance",
                                layer_norm_target_layer=layer_norm == "layer",
                                layer_norm_targets=final_norm == "layer",
                                instance_norm_targets=final_norm == "instance")
    got = sslkern.layer_average_targets(ys, layer_norm=layer_norm, final_norm=final_norm, backend=name)
    torch.testing.assert_close(got, want, **TGT_TOL)


@pytest.mark.parametrize("backend", TARGET_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_targets_half_inputs_stacked_and_cls_slice(backend, dtype):
    name, device = backend
    B, T, D = (2, 37, 45) if small(name) else (4, 197, 96)
    full = torch.stack(layers_12(B, T + 1, D, dtype=dtype, device=device)[:5])  # (K, B, 1 + T, D) with a CLS
    no_cls = full[:, :, 1:]                                                       # strided view, read in place
    want = fairseq_make_targets(list(no_cls.unbind(0)), 5)
    # fp16/bf16 inputs are read exactly and upcast like fairseq's tl.float(): fp32 tolerance applies.
    for layers in (no_cls, list(no_cls.unbind(0))):
        got = sslkern.layer_average_targets(layers, backend=name)
        torch.testing.assert_close(got, want, **TGT_TOL)


@pytest.mark.parametrize("backend", TARGET_BACKENDS)
def test_targets_large_channel_mean(backend):
    """A channel mean 1e3 times its spread must not cancel the variance (shifted sums)."""
    name, device = backend
    B, T, D = 2, 50, 19
    ys = [torch.randn(B, T, D, device=device) * 0.5 + 1000.0 * torch.rand(D, device=device) for _ in range(3)]
    want = fairseq_make_targets(ys, 3)
    got = sslkern.layer_average_targets(ys, backend=name)
    # fp32 inputs near 1e3 carry ~6e-5 absolute error, i.e. 1.2e-4 after normalizing by 0.5.
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_targets_detach_and_eps():
    ys = [torch.randn(2, 50, 31, requires_grad=True) for _ in range(3)]
    out = sslkern.layer_average_targets(ys, eps=1e-3)
    assert not out.requires_grad
    want = sslkern.reference.layer_average_targets([y.detach() for y in ys], eps=1e-3)
    torch.testing.assert_close(out, want, **TGT_TOL)


def test_targets_opcheck():
    ys = [torch.randn(2, 9, 7) for _ in range(3)]
    for ln, fn in [("instance", "layer"), ("layer", "none"), ("none", "instance")]:
        torch.library.opcheck(torch.ops.sslkern.layer_average_targets.default, (ys, ln, fn, 1e-5, ""))


# ----------------------------------------------------------------------------------------
# masked_regression_loss
# ----------------------------------------------------------------------------------------
# Tolerances: the loss is a sum of ~1e3..1e5 terms added in another order (fp64 across
# tokens on CPU, fp32 tiles on Triton): rtol 1e-5. Gradients are elementwise: fp32 1e-6;
# bf16/fp16 gradients are rounded once from fp32: one unit in the last place.
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
            torch.float16: dict(atol=1e-3, rtol=1e-3)}


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_matches_fairseq_clone_batch(backend, beta, reduction, dtype):
    name, device = backend
    B, M, T, D = (2, 3, 37, 45) if small(name) else (3, 4, 197, 77)
    targets = torch.randn(B, T, D, device=device)
    pred = torch.randn(B * M, T, D, device=device).to(dtype).requires_grad_(True)
    mask = torch.rand(B * M, T, device=device) < 0.8
    loss = sslkern.masked_regression_loss(pred, targets, mask, beta=beta, reduction=reduction, backend=name)
    (g,) = torch.autograd.grad(loss, pred)
    ref_pred = pred.detach().requires_grad_(True)
    want = fairseq_regression(ref_pred, targets, mask, M, beta)
    if reduction == "mean":
        want = want / mask.sum()
    (gw,) = torch.autograd.grad(want, ref_pred)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert g.dtype == dtype
    torch.testing.assert_close(g, gw.to(dtype), **GRAD_TOL[dtype])
    assert torch.all(g[~mask] == 0)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("T", [197, 50, 37])
def test_loss_ids_form_vit_lengths(backend, T):
    name, device = backend
    if small(name) and T == 197:
        pytest.skip("interpreter: T = 197 is covered by the cpu backend")
    B, M, D, Nm = 2, 2, 29, max(T * 3 // 5, 1)
    targets = torch.randn(B, T, D, device=device)
    ids = torch.stack([torch.randperm(T, device=device)[:Nm] for _ in range(B * M)])
    pred = torch.randn(B * M, Nm, D, device=device, requires_grad=True)
    loss = sslkern.masked_regression_loss(pred, targets, ids=ids, beta=0.5, backend=name)
    (g,) = torch.autograd.grad(loss, pred)
    # Same thing through the mask form: scatter the predictions into full sequences.
    full = torch.zeros(B * M, T, D, device=device)
    full.scatter_(1, ids.unsqueeze(-1).expand(-1, -1, D), pred.detach())
    mask = torch.zeros(B * M, T, dtype=torch.bool, device=device).scatter_(1, ids, True)
    ref_pred = full.requires_grad_(True)
    want = fairseq_regression(ref_pred, targets, mask, M, 0.5)
    (gw,) = torch.autograd.grad(want, ref_pred)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, torch.gather(gw, 1, ids.unsqueeze(-1).expand(-1, -1, D)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_ijepa_loss(backend):
    """I-JEPA: h = layer_norm(target_encoder(x)) (no affine); z predicted at the target
    blocks of M masks (apply_masks: mask-major rows); loss = F.smooth_l1_loss(z, h[masks])."""
    name, device = backend
    B, M, T, D, Nm = 2, 4, 50, 33, 9
    h_last = torch.randn(B, T, D, device=device) * 3 + 1
    masks = [torch.stack([torch.randperm(T, device=device)[:Nm] for _ in range(B)]) for _ in range(M)]
    z = torch.randn(M * B, Nm, D, device=device, requires_grad=True)   # mask-major, as I-JEPA
    h = F.layer_norm(h_last, (D,))
    h_masked = torch.cat([torch.gather(h, 1, m.unsqueeze(-1).expand(-1, -1, D)) for m in masks])
    want = F.smooth_l1_loss(z, h_masked)
    (gw,) = torch.autograd.grad(want, z)
    # sslkern wants image-major rows: row b*M + m holds mask m of image b.
    target = sslkern.layer_average_targets([h_last], layer_norm="layer", final_norm="none", backend=name)
    perm = torch.arange(M * B, device=device).view(M, B).t().reshape(-1)
    ids = torch.cat(masks)[perm]
    z_img = z.detach()[perm].requires_grad_(True)
    loss = sslkern.masked_regression_loss(z_img, target, ids=ids, beta=1.0, scale=1.0 / D, reduction="mean",
                                          backend=name)
    (g,) = torch.autograd.grad(loss, z_img)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g, gw[perm], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_cls_loss_and_fused_form_match_fairseq(backend):
    name, device = backend
    B, M, T, D = 2, 3, 37, 45
    ys = layers_12(B, T, D, device=device)
    pred = torch.randn(B * M, T, D, device=device, requires_grad=True)
    cls_pred = torch.randn(B * M, D, device=device, requires_grad=True)
    mask = torch.rand(B * M, T, device=device) < 0.8
    # fairseq: losses summed, then divided by sample_size = number of masked tokens.
    targets = fairseq_make_targets(ys, 8)
    n = mask.sum()
    cls_target = targets.mean(dim=1).repeat_interleave(M, 0)
    fair = (fairseq_regression(pred, targets, mask, M) + fairseq_d2v_loss(cls_pred, cls_target).sum() * (0.01 * n)) / n
    gp_w, gc_w = torch.autograd.grad(fair, (pred, cls_pred))
    reg, cls = sslkern.data2vec_loss(pred, ys, mask, top_k=8, cls_pred=cls_pred, cls_weight=0.01, backend=name)
    total = reg / n + cls
    gp, gc = torch.autograd.grad(total, (pred, cls_pred))
    torch.testing.assert_close(total, fair, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gp, gp_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gc, gc_w, atol=1e-6, rtol=1e-5)
    # The stacked (K, B, T, D) form with top_k gives the same.
    reg2, _ = sslkern.data2vec_loss(pred, torch.stack(ys), mask, top_k=8, backend=name)
    torch.testing.assert_close(reg2, reg, atol=0, rtol=0)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_no_masked_token_gives_zero(backend, reduction):
    name, device = backend
    pred = torch.randn(4, 13, 9, device=device, requires_grad=True)
    target = torch.randn(2, 13, 9, device=device)
    mask = torch.zeros(4, 13, dtype=torch.bool, device=device)
    loss = sslkern.masked_regression_loss(pred, target, mask, reduction=reduction, backend=name)
    (g,) = torch.autograd.grad(loss, pred)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.all(g == 0)
    empty_ids = torch.zeros(4, 0, dtype=torch.int64, device=device)
    loss = sslkern.masked_regression_loss(pred[:, :0], target, ids=empty_ids, reduction=reduction, backend=name)
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_gradcheck_float64(backend, beta):
    name, device = backend
    B, M, T, D = 2, 2, 7, 5
    target = torch.randn(B, T, D, dtype=torch.float64, device=device)
    pred = torch.randn(B * M, T, D, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(B * M, T, device=device) < 0.6
    for red in ("sum", "mean"):
        assert torch.autograd.gradcheck(
            lambda p: sslkern.masked_regression_loss(p, target, mask, beta=beta, reduction=red, backend=name), (pred,))
    ids = torch.randint(0, T, (B * M, 4), device=device)
    p_ids = torch.randn(B * M, 4, D, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p: sslkern.masked_regression_loss(p, target, ids=ids, beta=beta, backend=name), (p_ids,))


def test_loss_opcheck():
    target = torch.randn(2, 9, 7)
    pred = torch.randn(4, 9, 7, requires_grad=True)
    mask = torch.rand(4, 9) < 0.5
    ids = torch.randint(0, 9, (4, 3))
    torch.library.opcheck(torch.ops.sslkern.masked_regression_loss.default,
                          (pred, target, mask, None, 0.0, 0.3, False, None, False, ""))
    torch.library.opcheck(torch.ops.sslkern.masked_regression_loss.default,
                          (pred[:, :3].contiguous().detach().requires_grad_(), target, None, ids, 0.5, 0.3, True,
                           None, False, ""))
    torch.library.opcheck(torch.ops.sslkern.masked_regression_loss_backward.default,
                          (torch.tensor(1.5), pred.detach(), target, mask, None, 0.5, 0.3, True, None, False, ""))


def test_compile_fullgraph_equals_eager():
    B, M, T, D = 2, 3, 50, 33
    ys = torch.randn(6, B, T, D)
    pred = torch.randn(B * M, T, D, requires_grad=True)
    cls_pred = torch.randn(B * M, D, requires_grad=True)
    mask = torch.rand(B * M, T) < 0.8

    def step(pred, cls_pred, ys, mask):
        targets = sslkern.layer_average_targets(ys)
        reg = sslkern.masked_regression_loss(pred, targets, mask, beta=0.5)
        return reg / mask.sum() + sslkern.data2vec_cls_loss(cls_pred, targets)

    eager = step(pred, cls_pred, ys, mask)
    ge = torch.autograd.grad(eager, (pred, cls_pred))
    compiled = torch.compile(step, fullgraph=True, backend="inductor")(pred, cls_pred, ys, mask)
    gc = torch.autograd.grad(compiled, (pred, cls_pred))
    # The sslkern ops run the same kernels; inductor fuses the glue (token mean, / n, · weight)
    # in another order, hence fp32 rounding-level tolerances.
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------
def _t(*shape, **kw):
    return torch.randn(*shape, **kw)


@pytest.mark.parametrize("call,match", [
    (lambda: sslkern.layer_average_targets([]), "at least one tensor"),
    (lambda: sslkern.layer_average_targets([_t(2, 5, 4), _t(2, 6, 4)]), r"layers\[1\] expected shape \(2, 5, 4\)"),
    (lambda: sslkern.layer_average_targets([_t(2, 5, 4), _t(2, 5, 4).half()]), r"layers\[1\] expected dtype float32"),
    (lambda: sslkern.layer_average_targets([_t(2, 5, 4).long()]), r"layers\[0\] expected dtype"),
    (lambda: sslkern.layer_average_targets([_t(5, 4)]), r"layers\[0\] expected 3 dims"),
    (lambda: sslkern.layer_average_targets([_t(2, 5, 4)], layer_norm="batch"), "layer_norm must be one of"),
    (lambda: sslkern.layer_average_targets([_t(2, 5, 4)], final_norm="rms"), "final_norm must be one of"),
    (lambda: sslkern.layer_average_targets([_t(2, 5, 4)], eps=0.0), "eps must be in"),
    (lambda: sslkern.data2vec_loss(_t(2, 5, 4), [_t(2, 5, 4)] * 3, top_k=4), r"top_k must be in \[1, 3\]"),
    (lambda: sslkern.masked_regression_loss(_t(4, 6, 4), _t(2, 5, 4)), "pred expected 5 tokens like target"),
    (lambda: sslkern.masked_regression_loss(_t(4, 5, 3), _t(2, 5, 4)), "pred expected last dim 4"),
    (lambda: sslkern.masked_regression_loss(_t(5, 5, 4), _t(2, 5, 4)), "multiple of target's batch 2"),
    (lambda: sslkern.masked_regression_loss(_t(4, 5, 4), _t(2, 5, 4), torch.ones(4, 6, dtype=torch.bool)),
     r"mask expected shape \(4, 5\)"),
    (lambda: sslkern.masked_regression_loss(_t(4, 5, 4), _t(2, 5, 4), torch.ones(4, 5)), "mask expected dtype"),
    (lambda: sslkern.masked_regression_loss(_t(4, 5, 4), _t(2, 5, 4), beta=-0.1), r"beta must be in \[0.0, inf\]"),
    (lambda: sslkern.masked_regression_loss(_t(4, 5, 4), _t(2, 5, 4), beta=float("nan")), "beta expected a finite number"),
    (lambda: sslkern.masked_regression_loss(_t(4, 5, 4), _t(2, 5, 4), reduction="none"), "reduction must be one of"),
    (lambda: sslkern.masked_regression_loss(_t(4, 3, 4), _t(2, 5, 4), ids=torch.zeros(4, 2, dtype=torch.long)),
     r"ids expected shape \(4, 3\)"),
    (lambda: sslkern.masked_regression_loss(_t(4, 3, 4), _t(2, 5, 4), ids=torch.zeros(4, 3)), "ids expected dtype"),
    (lambda: sslkern.masked_regression_loss(_t(4, 5, 4), _t(2, 5, 4), torch.ones(4, 5, dtype=torch.bool),
                                            ids=torch.zeros(4, 5, dtype=torch.long)), "mask or ids, not both"),
    (lambda: sslkern.data2vec_cls_loss(_t(4, 1, 4), _t(2, 5, 4)), "cls_pred expected 2 dims"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


@pytest.mark.parametrize("backend", [b for b in LOSS_BACKENDS if b.id != "reference"])
@pytest.mark.parametrize("bad", [-1, 5, 1 << 40])
def test_ids_out_of_range(backend, bad):
    name, device = backend
    ids = torch.zeros(4, 3, dtype=torch.long, device=device)
    ids[2, 1] = bad
    pred = torch.randn(4, 3, 4, device=device, requires_grad=True)
    with pytest.raises((IndexError, RuntimeError), match=r"ids expected values in \[0, 5\)"):
        sslkern.masked_regression_loss(pred, torch.randn(2, 5, 4, device=device), ids=ids, backend=name)


@pytest.mark.skipif(not (sslkern._backend.backend_status()["triton"][0] and not torch.cuda.is_available()),
                    reason="needs the Triton interpreter on CPU tensors")
def test_triton_targets_table_cached_and_misaligned_views_copied(monkeypatch):
    """The layer-address table is uploaded once per layer set (not per call); a layer view whose
    data pointer is not 16-byte aligned is copied first (the kernels assume aligned bases)."""
    from sslkern.triton_ops import layer_average_targets as tla
    uploads = []
    real_upload = tla.upload_table
    monkeypatch.setattr(tla, "upload_table",
                        lambda rows, dev: (uploads.append(rows.tolist()), real_upload(rows, dev))[1])
    tla._tables.clear()
    B, T, D = 2, 5, 12
    layers = [torch.randn(B, T + 1, D)[:, 1:] for _ in range(2)]  # CLS dropped: 48-byte offset, aligned
    want = sslkern.layer_average_targets(layers, backend="reference")
    for _ in range(2):
        torch.testing.assert_close(sslkern.layer_average_targets(layers, backend="triton"), want,
                                   atol=1e-5, rtol=1e-5)
    layer_tables = [r for r in uploads if len(r) == 2]  # (the final layer norm uploads a 1-entry [out] table)
    assert layer_tables == [[layers[0].data_ptr(), layers[1].data_ptr()]]  # once for both calls
    flat = torch.randn(B * T * D + 1)
    odd = [flat[1:].view(B, T, D), torch.randn(B, T, D)]  # the first 4 bytes off 16; equal strides
    torch.testing.assert_close(sslkern.layer_average_targets(odd, backend="triton"),
                               sslkern.layer_average_targets(odd, backend="reference"), atol=1e-5, rtol=1e-5)
    layer_tables = [r for r in uploads if len(r) == 2]
    assert len(layer_tables) == 2 and layer_tables[1][0] != odd[0].data_ptr()
    assert layer_tables[1][0] % 16 == 0 and layer_tables[1][1] == odd[1].data_ptr()


@pytest.mark.skipif(not (sslkern._backend.backend_status()["triton"][0] and not torch.cuda.is_available()),
                    reason="needs the Triton interpreter on CPU tensors")
def test_masked_regression_ids_check_is_one_front_door_sync():
    """The ids range check syncs once in the public function (forward), never in backward;
    check_indices=False: no sync at all (CUDA graphs). Same loss and gradient."""
    from conftest import SyncCounter
    ids = torch.randint(0, 7, (4, 3))
    target = torch.randn(2, 7, 8)
    res = []
    for check in (True, False):
        pred = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        with SyncCounter() as c:
            loss = sslkern.masked_regression_loss(pred, target, ids=ids, check_indices=check, backend="triton")
            loss.backward(torch.tensor(2.0))
        res.append((c.n, loss, pred.grad))
    assert res[0][0] == 1 and res[1][0] == 0
    assert torch.equal(res[0][1], res[1][1]) and torch.equal(res[0][2], res[1][2])
