"""gather_tokens / restore_tokens and the mask generators (issue #4).

Cases
  MAE step pieces: B = 64, 196 patches + CLS, encoder D = 768, decoder D = 512, mask 0.75,
    fp32, forward + backward of (encoder gather with position add) and (decoder restore with
    mask token and position add). Providers: sslkern, reference (MAE code math, eager:
    ``x + pos``, ``torch.gather``, ``cat`` mask tokens, unshuffle ``torch.gather``, ``+ pos``),
    compiled (``torch.compile`` of the reference). bytes_moved = the minimal traffic.
  data2vec 2.0 clone batch: B = 32 images × 196 × 768, M = 8 masks (mask_prob 0.8), fp32,
    forward + backward. Peer: reference = ``repeat_interleave`` + ``torch.gather``.
  Mask generation, B = 256 at 14 × 14: sslkern.masks vs the per-image reference loops
    (sslkern.reference.masks ports of dinov2 / fairseq / I-JEPA; MAE's own code for random).
"""
import random

import pytest
import torch

import sslkern
from sslkern import masks
from sslkern.reference import masks as ref_masks
from sslkern.reference import tokens as ref
from harness import measure

F32 = 4


# ---------------------------------------------------------------------------------------
def mae_inputs(B=64, N=196, P=1, D=768, Dd=512, ratio=0.75):
    g = torch.Generator().manual_seed(0)
    tm = masks.random_mask(B, N, ratio, generator=g)
    Nk = tm.ids_keep.shape[1]
    x = torch.randn(B, P + N, D, requires_grad=True)
    pos = torch.randn(1, P + N, D, requires_grad=True)
    xv = torch.randn(B, P + Nk, Dd, requires_grad=True)
    mt = torch.randn(1, 1, Dd, requires_grad=True)
    dpos = torch.randn(1, P + N, Dd, requires_grad=True)
    g_enc = torch.randn(B, P + Nk, D)
    g_dec = torch.randn(B, P + N, Dd)
    return tm, x, pos, xv, mt, dpos, g_enc, g_dec


def mae_reference(x, pos, ids_keep, xv, mt, dpos, ids_restore):
    # models_mae.py: forward_encoder (+pos, random_masking gather, cls + pos) and
    # forward_decoder (append mask tokens, unshuffle, + decoder_pos_embed)
    B, L, D = x.shape
    patches = x[:, 1:] + pos[:, 1:]
    kept = torch.gather(patches, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    enc = torch.cat([x[:, :1] + pos[:, :1], kept], dim=1)
    Dd = xv.shape[-1]
    mask_tokens = mt.repeat(B, ids_restore.shape[1] + 1 - xv.shape[1], 1)
    y = torch.cat([xv[:, 1:, :], mask_tokens], dim=1)
    y = torch.gather(y, 1, ids_restore.unsqueeze(-1).repeat(1, 1, Dd))
    dec = torch.cat([xv[:, :1, :], y], dim=1) + dpos
    return enc, dec


def mae_sslkern(x, pos, ids_keep, xv, mt, dpos, ids_restore):
    enc = sslkern.gather_tokens(x, ids_keep, pos_embed=pos, num_prefix_tokens=1)
    dec = sslkern.restore_tokens(xv, ids_restore, mask_token=mt, pos_embed=dpos, num_prefix_tokens=1)
    return enc, dec


_compiled = {}


@pytest.mark.parametrize("provider", ["sslkern", "sslkern_nocache", "reference", "compiled"])
def test_mae_gather_restore(benchmark, provider):
    tm, x, pos, xv, mt, dpos, g_enc, g_dec = mae_inputs()
    fwd = {"sslkern": mae_sslkern, "sslkern_nocache": mae_sslkern, "reference": mae_reference}.get(provider)
    if provider == "compiled":
        fwd = _compiled.setdefault("mae", torch.compile(mae_reference))
    params = (x, pos, xv, mt, dpos)

    def step():
        enc, dec = fwd(x, pos, tm.ids_keep, xv, mt, dpos, tm.ids_restore)
        torch.autograd.grad((enc, dec), params, (g_enc, g_dec))

    B, L, D = x.shape
    Lk, Dd = xv.shape[1], xv.shape[2]
    # fwd gather: read kept rows + pos, write them; bwd: read grad rows, write grad_x (all L
    # rows: unkept ones are zeros) and grad_pos. restore fwd: read x_vis, write B·L rows;
    # bwd: read B·L grad rows, write grad_x_vis, grad_pos, grad mask token.
    bytes_moved = F32 * (B * Lk * D * 2 + L * D + B * Lk * D + B * L * D + L * D
                         + B * Lk * Dd + B * L * Dd + L * Dd + B * L * Dd + B * Lk * Dd + L * Dd)
    measure(benchmark, op="gather_restore_tokens",
            case="MAE B=64 L=196+CLS enc D=768 gather+pos, dec D=512 restore+mask token+pos, r=0.75 fp32 fwd+bwd",
            provider=provider, fn=step, bytes_moved=bytes_moved,
            target={"reference": 10.0, "compiled": 3.0}.get(provider), rounds=10)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["sslkern", "reference", "compiled"])
def test_data2vec_clone_batch(benchmark, provider):
    B, N, D, M = 32, 196, 768, 8
    tm = masks.inverse_block_mask(B, (14, 14), 0.8, num_masks=M, generator=torch.Generator().manual_seed(0))
    x = torch.randn(B, N, D, requires_grad=True)
    Nk = tm.ids_keep.shape[-1]
    g = torch.randn(B * M, Nk, D)
    if provider == "sslkern":
        fwd = lambda: sslkern.gather_tokens(x, tm.ids_keep)  # noqa: E731
    else:
        f = ref.gather_tokens if provider == "reference" else _compiled.setdefault("d2v", torch.compile(ref.gather_tokens))
        fwd = lambda: f(x, tm.ids_keep)  # noqa: E731  (repeat_interleave(M) + gather)

    def step():
        torch.autograd.grad(fwd(), (x,), (g,))

    bytes_moved = F32 * (B * M * Nk * D * 2 + B * M * Nk * D + B * N * D)
    measure(benchmark, op="gather_tokens",
            case=f"data2vec 2.0 clone batch B=32 M=8 N=196 D=768 Nk={Nk} fp32 fwd+bwd", provider=provider,
            fn=step, bytes_moved=bytes_moved, target={"reference": 3.0}.get(provider), rounds=10)


# ---------------------------------------------------------------------------------------
def _mae_random_masking(B, N, ratio, g):
    noise = torch.rand(B, N, generator=g)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :int(N * (1 - ratio))]
    mask = torch.ones(B, N)
    mask[:, :ids_keep.shape[1]] = 0
    return ids_keep, ids_restore, torch.gather(mask, 1, ids_restore)


GENERATORS = {
    "random (MAE, r=0.75)": (lambda g: masks.random_mask(256, 196, 0.75, generator=g),
                             lambda g: _mae_random_masking(256, 196, 0.75, g)),
    "block (dinov2, 0.1-0.5)": (lambda g: masks.block_mask(256, (14, 14), (0.1, 0.5), generator=g),
                                lambda g: ref_masks.dinov2_block_mask(random.Random(0), 256, 14, 14, (0.1, 0.5))),
    "inverse block (data2vec 2.0, 0.8)": (lambda g: masks.inverse_block_mask(256, (14, 14), 0.8, generator=g),
                                          lambda g: ref_masks.fairseq_inverse_block_mask(256, 14, 14, 0.8, generator=g)),
    "multiblock (I-JEPA)": (lambda g: masks.multiblock_masks(256, (14, 14), generator=g),
                            lambda g: ref_masks.ijepa_multiblock(256, 14, 14, generator=g)),
}


@pytest.mark.parametrize("provider", ["sslkern", "reference"])
@pytest.mark.parametrize("kind", list(GENERATORS))
def test_mask_generation(benchmark, provider, kind):
    g = torch.Generator().manual_seed(0)
    fn = GENERATORS[kind][0 if provider == "sslkern" else 1]
    measure(benchmark, op="masks", case=f"{kind} B=256 14x14", provider=provider, fn=lambda: fn(g), rounds=10)
