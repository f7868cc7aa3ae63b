"""``layer_average_targets`` — data2vec teacher targets: top-K layer average (fairseq
``data2vec2.py: make_targets``)."""
from __future__ import annotations

from typing import Sequence

import torch

from .._backend import Dispatch, standard_impls
from .._checks import HALF_OR_FLOAT32, check_choice, check_float, check_tensor, dtype_name, fail

OP = "layer_average_targets"
NORMS = ("instance", "layer", "none")


def layer_average_targets_eager(layers, layer_norm, final_norm, eps):
    """The custom op's contract on the oracle ``sslkern.reference.layer_average_targets``."""
    from ..reference.layer_average_targets import layer_average_targets

    return layer_average_targets(layers, layer_norm, final_norm, eps)


dispatch = Dispatch(OP, standard_impls(OP, layer_average_targets_eager))


@torch.library.custom_op("sslkern::layer_average_targets", mutates_args=())
def _layer_average_targets_op(layers: list[torch.Tensor], layer_norm: str, final_norm: str, eps: float,
                              backend: str) -> torch.Tensor:
    return dispatch(layers[0].device, backend)(layers, layer_norm, final_norm, eps)


@_layer_average_targets_op.register_fake
def _(layers, layer_norm, final_norm, eps, backend):
    return layers[0].new_empty(layers[0].shape, dtype=torch.float32)


def layer_average_targets(
    layers: Sequence[torch.Tensor] | torch.Tensor,
    *,
    layer_norm: str = "instance",
    final_norm: str = "layer",
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    r"""data2vec regression targets: ``final_norm(mean_k layer_norm(y_k))`` of shape (B, T, D), fp32.

    Args:
        layers: the K teacher layer outputs to average (the caller picks the top K, e.g.
            ``outputs[-K:]``), a list of K tensors (B, T, D) or one stacked (K, B, T, D)
            tensor; fp32, bf16 or fp16 (all the same). Any strides with a unit stride on D
            (e.g. ``x[:, 1:]`` dropping CLS) are read in place; others are made contiguous.
        layer_norm: per layer, before averaging: ``"instance"`` (``F.instance_norm`` on the
            (B, D, T) view: per image and channel over tokens, biased variance, fp32; data2vec
            2.0), ``"layer"`` (parameter-free layer norm over D; data2vec v1) or ``"none"``.
        final_norm: on the average: ``"layer"`` (data2vec 2.0 images), ``"instance"`` or ``"none"``.
        eps: added to the variance in every norm (fairseq: the ``F.*_norm`` default 1e-5).
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: auto).

    Returns a new fp32 tensor (B, T, D), detached (targets carry no gradient). Extra memory
    is the output only: the K layers are not stacked or copied to fp32.

    Matches fairseq ``examples/data2vec/models/data2vec2.py: make_targets``
    (``instance_norm_target_layer`` / ``layer_norm_target_layer`` and ``layer_norm_targets``
    / ``instance_norm_targets``) and the data2vec v1 vision targets
    (``layer_norm_target_layer=True``, no final norm). I-JEPA's target is
    ``layer_average_targets([h], layer_norm="layer", final_norm="none")``.
    With T = 1 the instance norm gives zeros (torch's ``F.instance_norm`` refuses T = 1).
    """
    if isinstance(layers, torch.Tensor):
        check_tensor(OP, "layers", layers, dtypes=HALF_OR_FLOAT32, ndim=4)
        layers = list(layers.unbind(0))
    else:
        layers = list(layers)
    if not layers:
        fail(OP, "layers expected at least one tensor, got an empty list")
    first = check_tensor(OP, "layers[0]", layers[0], dtypes=HALF_OR_FLOAT32, ndim=3)
    for i, y in enumerate(layers[1:], 1):
        check_tensor(OP, f"layers[{i}]", y, shape=tuple(first.shape), device=first.device)
        if y.dtype != first.dtype:
            fail(OP, f"layers[{i}] expected dtype {dtype_name(first.dtype)} like layers[0], got {dtype_name(y.dtype)}",
                 TypeError)
    check_choice(OP, "layer_norm", layer_norm, NORMS)
    check_choice(OP, "final_norm", final_norm, NORMS)
    eps = check_float(OP, "eps", eps, 0.0, None, lo_open=True)
    layers = [y.detach() for y in layers]
    if not all(tuple(y.stride()) == tuple(first.stride()) and (y.shape[-1] <= 1 or y.stride(-1) == 1) for y in layers):
        layers = [y.contiguous() for y in layers]
    with torch.no_grad():
        return torch.ops.sslkern.layer_average_targets(layers, layer_norm, final_norm, eps, backend or "")
