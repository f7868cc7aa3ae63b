"""fp16 under GradScaler's initial loss scale, every differentiable op, every CPU-runnable backend.

GradScaler multiplies the loss by 65,536, which is inf in fp16: an op whose backward forms
``saved_gradient × incoming_gradient`` in the input dtype turns every fp16 step into inf.
Each case (``sslkern.gpu_check.OP_CASES``, the calls ``python -m sslkern.gpu_check`` runs on a
GPU) is differentiated at scale 1 and at 65,536: the scaled gradients must be finite and equal
65,536 × the unscaled ones (exactly for the ops that save their gradient in the forward, up to
fp16 rounding of the unscaled ones for the others). The inputs keep every unscaled gradient
below 0.5, so 65,536 × it fits fp16 and a failure can only come from the op.
"""
import pytest
import torch

from sslkern.gpu_check import LOSS_SCALE, OP_CASES, loss_scale_grads

CASES = [c for c in OP_CASES if c.differentiable]
# the ops whose backward only rescales a gradient written in the forward (sslkern.ops._common)
SAVED_GRADIENT = {"dino_loss", "dino_loss sinkhorn", "ibot_patch_loss", "prototype_loss", "prototype_loss ibot",
                  "info_nce_loss", "info_nce_loss nt_xent", "info_nce_loss rince", "cross_correlation_loss",
                  "vicreg_loss", "swav_loss"}


def _params():
    out = []
    for case in CASES:
        for b in ("cpu", "triton", "reference"):
            if b in case.backends():
                out.append(pytest.param(case, b, id=f"{case.name.replace(' ', '_')}-{b}"))
    return out


@pytest.mark.parametrize("case,backend", _params())
def test_fp16_gradients_under_loss_scale_65536(case, backend):
    if backend == "triton" and torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    unscaled = loss_scale_grads(case, device, backend, 1.0)
    scaled = loss_scale_grads(case, device, backend, LOSS_SCALE)
    for i, (g1, g2) in enumerate(zip(unscaled, scaled)):
        assert g1.dtype == torch.float16 and g2.dtype == torch.float16
        assert 0 < float(g1.abs().max()) < 0.5, f"leaf {i}: the case's gradient must fit fp16 when scaled"
        assert torch.isfinite(g2).all(), f"leaf {i}: inf / nan under the loss scale"
        if case.name in SAVED_GRADIENT:
            torch.testing.assert_close(g2, g1 * LOSS_SCALE, rtol=0, atol=0)
        else:  # backward kernels read the scaled incoming gradient: rounding differs below fp16's normals
            torch.testing.assert_close(g2.float() / LOSS_SCALE, g1.float(), rtol=2e-3, atol=1e-7)


def test_every_differentiable_public_op_has_a_case():
    import sslkern

    differentiable = {"alibi_attention", "cross_correlation_loss", "data2vec_cls_loss", "data2vec_loss", "dino_loss",
                      "gather_tokens", "ibot_patch_loss", "info_nce_loss", "koleo_loss", "masked_regression_loss",
                      "prototype_loss", "relation_loss", "restore_tokens", "swav_loss", "vicreg_loss"}
    ops = {n for n in sslkern.__all__ if callable(getattr(sslkern, n)) and n[0].islower()}
    not_differentiable = {"alibi_slopes", "ema_update_", "hog_targets", "layer_average_targets",
                          "sinkhorn_knopp_teacher", "swav_codes", "backend_status", "use_backend", "cpu_cache_disabled",
                          "cpu_cache_info", "empty_cpu_cache", "set_cpu_cache_limit", "patch_timm_vit",
                          "render_views"}
    assert ops == differentiable | not_differentiable, ops ^ (differentiable | not_differentiable)
    covered = " ".join(c.name for c in CASES)
    # composed in plain torch ops (no custom op of its own): koleo_loss; data2vec_loss = targets + the two losses
    for name in differentiable - {"koleo_loss", "data2vec_loss", "data2vec_cls_loss", "restore_tokens",
                                  "gather_tokens"}:
        assert name in covered, name
    assert "gather_tokens / restore_tokens" in covered and "masked_regression_loss" in covered
