"""gather_tokens / restore_tokens and the mask generators.

Cases
  MAE step pieces (what MAE's code does): B = 64 images of 196 patches, encoder
    D = 768, decoder D = 512, mask 0.75, fp32 and bf16, forward + backward of MAE's
    ``forward_encoder`` token handling (``x + pos_embed[:, 1:]``, then random_masking's
    gather, then ``cls_token + pos_embed[:, :1]`` concatenated in front) and of
    ``forward_decoder``'s (mask tokens appended to the CLS-prefixed decoder input, unshuffle,
    CLS back in front, ``+ decoder_pos_embed``). Position embeddings are fixed (MAE's
    sin-cos, no gradient); gradients w.r.t. the patch embeddings, cls_token, the decoder
    input and mask_token, fresh every call (``torch.autograd.grad``). Providers: sslkern
    (``gather_tokens(x, ids_keep, pos_embed=pos, prefix_tokens=cls_token)`` and
    ``restore_tokens``), reference (MAE's code, eager), compiled (``torch.compile`` of it).
    bytes_moved = the minimal traffic.
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
from harness import measure, sweep

F32 = 4


# ---------------------------------------------------------------------------------------
def mae_inputs(B=64, N=196, D=768, Dd=512, ratio=0.75, dtype=torch.float32):
    """MAE's tensors: patch embeddings (B, N, D), cls_token (1, 1, D), the fixed sin-cos
    pos_embed (1, 1 + N, D) (requires_grad=False in MAE), the decoder-embedded encoder output
    (B, 1 + Nk, Dd) (CLS first), mask_token (1, 1, Dd), the fixed decoder_pos_embed."""
    g = torch.Generator().manual_seed(0)
    tm = masks.random_mask(B, N, ratio, generator=g)
    Nk = tm.ids_keep.shape[1]

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    x, cls, pos = t(B, N, D), t(1, 1, D), t(1, 1 + N, D, grad=False)
    xv, mt, dpos = t(B, 1 + Nk, Dd), t(1, 1, Dd), t(1, 1 + N, Dd, grad=False)
    g_enc, g_dec = t(B, 1 + Nk, D, grad=False), t(B, 1 + N, Dd, grad=False)
    return tm, (x, cls, pos, xv, mt, dpos), g_enc, g_dec


def mae_reference(x, cls, pos, ids_keep, xv, mt, dpos, ids_restore):
    # models_mae.py, forward_encoder: x + pos_embed[:, 1:], random_masking's gather, then
    # cls_token + pos_embed[:, :1] expanded and concatenated in front
    D = x.shape[-1]
    x = x + pos[:, 1:, :]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    cls_tokens = (cls + pos[:, :1, :]).expand(x.shape[0], -1, -1)
    enc = torch.cat((cls_tokens, x), dim=1)
    # forward_decoder on the decoder-embedded, CLS-prefixed encoder output: append mask
    # tokens, unshuffle, put CLS back, + decoder_pos_embed
    mask_tokens = mt.repeat(xv.shape[0], ids_restore.shape[1] + 1 - xv.shape[1], 1)
    x_ = torch.cat([xv[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, xv.shape[2]))
    dec = torch.cat([xv[:, :1, :], x_], dim=1) + dpos
    return enc, dec


def mae_sslkern(x, cls, pos, ids_keep, xv, mt, dpos, ids_restore):
    enc = sslkern.gather_tokens(x, ids_keep, pos_embed=pos, prefix_tokens=cls)
    dec = sslkern.restore_tokens(xv, ids_restore, mask_token=mt, pos_embed=dpos, num_prefix_tokens=1)
    return enc, dec


_compiled = {}


@pytest.mark.parametrize("provider", sweep(["sslkern", "sslkern_nocache", "reference", "compiled"],
                                           ["sslkern", "reference", "compiled"]))
@pytest.mark.parametrize("dtype", sweep([torch.float32, torch.bfloat16], [torch.float32]), ids=["fp32", "bf16"])
def test_mae_gather_restore(benchmark, provider, dtype):
    if provider == "sslkern_nocache" and dtype != torch.float32:
        pytest.skip("the output cache is timed on the fp32 case only")
    tm, (x, cls, pos, xv, mt, dpos), g_enc, g_dec = mae_inputs(dtype=dtype)
    fwd = {"sslkern": mae_sslkern, "sslkern_nocache": mae_sslkern, "reference": mae_reference}.get(provider)
    if provider == "compiled":
        fwd = _compiled.setdefault("mae", torch.compile(mae_reference))
    params = (x, cls, xv, mt)  # what MAE trains here: patch embeddings, cls_token, decoder input, mask_token

    def step():  # fresh gradients every call, nothing accumulated
        enc, dec = fwd(x, cls, pos, tm.ids_keep, xv, mt, dpos, tm.ids_restore)
        torch.autograd.grad((enc, dec), params, (g_enc, g_dec))

    B, N, D = x.shape
    Lk, Dd, L = xv.shape[1], xv.shape[2], 1 + N
    # encoder fwd: read the kept rows + positions, write B·(1+Nk) rows; bwd: read them, write
    # grad_x (all N rows: unkept ones are zeros). decoder fwd: read x_vis + positions, write
    # B·L rows; bwd: read B·L rows, write grad_x_vis. (O(D) tokens left out.)
    bytes_moved = x.element_size() * (B * (Lk - 1) * D + L * D + B * Lk * D + B * Lk * D + B * N * D
                                      + B * Lk * Dd + L * Dd + B * L * Dd + B * L * Dd + B * Lk * Dd)
    dt = "bf16" if dtype == torch.bfloat16 else "fp32"
    measure(benchmark, op="gather_restore_tokens",
            case=f"MAE forward_encoder/forward_decoder B=64 N=196 enc D=768 (x+pos, mask, cls), dec D=512 "
                 f"(mask tokens, unshuffle, +pos), r=0.75 {dt} fwd+bwd",
            provider=provider, fn=step, bytes_moved=bytes_moved,
            target={"reference": 10.0, "compiled": 3.0}.get(provider) if dtype == torch.float32 else None,
            rounds=10)


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", sweep(["sslkern", "reference", "compiled"], ["sslkern", "reference"]))
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


def _out_bytes(out):
    """Bytes of the tensors a mask generator returns (its minimal traffic: it reads nothing)."""
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (list, tuple)):
        return sum(_out_bytes(o) for o in out)
    if hasattr(out, "__dataclass_fields__"):
        return sum(_out_bytes(getattr(out, f)) for f in out.__dataclass_fields__)
    return 0


@pytest.mark.parametrize("provider", ["sslkern", "reference"])
@pytest.mark.parametrize("kind", sweep(list(GENERATORS), ["random (MAE, r=0.75)", "block (dinov2, 0.1-0.5)"]))
def test_mask_generation(benchmark, provider, kind):
    g = torch.Generator().manual_seed(0)
    fn = GENERATORS[kind][0 if provider == "sslkern" else 1]
    nbytes = _out_bytes(GENERATORS[kind][0](torch.Generator().manual_seed(0))) or None
    measure(benchmark, op="masks", case=f"{kind} B=256 14x14", provider=provider, fn=lambda: fn(g), rounds=10,
            bytes_moved=nbytes)
