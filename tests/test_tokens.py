"""gather_tokens / restore_tokens: every backend against the eager reference."""
import pytest
import torch

import sslkern
from sslkern import masks
from sslkern.ops.tokens import dispatch
from sslkern.reference import gather_tokens as ref_gather, restore_tokens as ref_restore

from conftest import STATUS, SyncCounter, backend_params

# the interpreter on CPU tensors (the tests below that build CPU tensors for backend='triton')
STATUS_TRITON = STATUS["triton"][0] and not torch.cuda.is_available()

BACKENDS = backend_params(dispatch, include_reference=True)
# (B, P, N, D): ViT-like token counts 197 = 1 + 196, 50 = 1 + 49, 37; odd widths, one wider
# than the Triton column block (128).
SHAPES = [(2, 1, 196, 24), (3, 1, 49, 19), (2, 0, 37, 33), (1, 4, 16, 130)]
SMALL = [(2, 1, 49, 19), (2, 0, 37, 130)]  # the Triton interpreter is slow
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Forward: a copy plus one fp32 add rounded once, exactly what the eager `x + pos` does, so
# outputs are bit-identical. Gradients: sums over the batch / over clone masks may add in a
# different order: fp32 ~1e-6; bf16/fp16 rounded once from fp32 sums (reference rounds
# partial sums too), so one or two units in the last place.
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10),
            torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def fwd_tol(name, device, dtype):
    """Exact, except: the Triton *interpreter* rounds fp32 -> bf16 by truncation (checked:
    the GPU rounds to nearest even), so fused adds there may differ by one bf16 ulp."""
    if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        return dict(atol=1e-6, rtol=2 ** -7)
    return dict(atol=0, rtol=0)


def shapes_for(name):
    return SMALL if name == "triton" else SHAPES


def multi_ids(B, M, N, ratio, device="cpu"):
    return masks.random_mask(B, N, ratio, num_masks=M, device=device).ids_keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos", [False, True])
def test_gather_matches_reference(backend, dtype, with_pos):
    name, device = backend
    for B, P, N, D in shapes_for(name):
        x = torch.randn(B, P + N, D, device=device).to(dtype).requires_grad_()
        pos = torch.randn(1, P + N, D, device=device).to(dtype).requires_grad_() if with_pos else None
        ids = masks.random_mask(B, N, 0.75, device=device).ids_keep
        got = sslkern.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=P, backend=name)
        want = ref_gather(x, ids, pos_embed=pos, num_prefix_tokens=P)
        assert got.shape == (B, P + ids.shape[1], D) and got.dtype == dtype
        torch.testing.assert_close(got, want, **fwd_tol(name, device, dtype))
        g = torch.randn_like(got)
        inputs = (x, pos) if with_pos else (x,)
        for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
            torch.testing.assert_close(a, b, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_major", [False, True])
def test_gather_multi_mask_clone_batch(backend, dtype, mask_major):
    name, device = backend
    B, P, N, D, M = (2, 1, 49, 19, 3) if name == "triton" else (3, 1, 196, 40, 8)
    x = torch.randn(B, P + N, D, device=device).to(dtype).requires_grad_()
    pos = torch.randn(P + N, D, device=device).to(dtype).requires_grad_()
    ids = multi_ids(B, M, N, 0.6, device)
    got = sslkern.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=P, mask_major=mask_major, backend=name)
    want = ref_gather(x, ids, pos_embed=pos, num_prefix_tokens=P, mask_major=mask_major)
    assert got.shape == (B * M, P + ids.shape[2], D)
    torch.testing.assert_close(got, want, **fwd_tol(name, device, dtype))
    # row order, spelled out: image-major = repeat_interleave, mask-major = I-JEPA apply_masks
    b, m = 1, 2
    row = m * B + b if mask_major else b * M + m
    expect_row = (x[b, P + ids[b, m]] + pos[P + ids[b, m]])
    torch.testing.assert_close(got[row, P:], expect_row, **fwd_tol(name, device, dtype))
    g = torch.randn_like(got)
    for a, c in zip(torch.autograd.grad(got, (x, pos), g), torch.autograd.grad(want, (x, pos), g)):
        torch.testing.assert_close(a, c, atol=GRAD_TOL[dtype][0] * 2, rtol=GRAD_TOL[dtype][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mask_token", "fill"])
def test_restore_matches_reference(backend, dtype, kind):
    name, device = backend
    for B, P, N, D in shapes_for(name):
        tm = masks.random_mask(B, N, 0.75, device=device)
        Nk = tm.ids_keep.shape[1]
        x_vis = torch.randn(B, P + Nk, D, device=device).to(dtype).requires_grad_()
        mt = torch.randn(D, device=device).to(dtype).requires_grad_() if kind == "mask_token" else None
        fill = (0.01 * torch.randn(B, N, D, device=device)).to(dtype).requires_grad_() if kind == "fill" else None
        pos = torch.randn(P + N, D, device=device).to(dtype).requires_grad_()
        got = sslkern.restore_tokens(x_vis, tm.ids_restore, mask_token=mt, fill=fill, pos_embed=pos,
                                     num_prefix_tokens=P, backend=name)
        want = ref_restore(x_vis, tm.ids_restore, mask_token=mt, fill=fill, pos_embed=pos, num_prefix_tokens=P)
        assert got.shape == (B, P + N, D) and got.dtype == dtype
        torch.testing.assert_close(got, want, **fwd_tol(name, device, dtype))
        g = torch.randn_like(got)
        inputs = [x_vis, pos, mt if mt is not None else fill]
        for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
            # the mask-token gradient sums B·(N − Nk) rows: scale the tolerance with it
            tol = GRAD_TOL[dtype] if a.dim() > 1 else tuple(4 * t for t in GRAD_TOL[dtype])
            torch.testing.assert_close(a, b, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_block_and_random_masks(backend):
    name, device = backend
    B, P, N, D = 2, 1, 49, 21
    x = torch.randn(B, P + N, D, device=device)
    mt = torch.randn(D, device=device)
    for tm in [masks.random_mask(B, N, 0.6, device=device),
               masks.inverse_block_mask(B, (7, 7), 0.5, device=device),
               masks.block_mask(B, (7, 7), 0.4, device=device)]:
        vis = sslkern.gather_tokens(x, tm.ids_keep, num_prefix_tokens=P, backend=name)
        back = sslkern.restore_tokens(vis, tm.ids_restore, mask_token=mt, num_prefix_tokens=P, backend=name)
        kept_slot = tm.ids_restore < tm.ids_keep.shape[1]
        assert kept_slot.sum() == B * tm.ids_keep.shape[1]
        torch.testing.assert_close(back[:, :P], x[:, :P], atol=0, rtol=0)
        torch.testing.assert_close(back[:, P:][kept_slot], x[:, P:][kept_slot], atol=0, rtol=0)
        assert torch.equal(back[:, P:][~kept_slot], mt.expand(int((~kept_slot).sum()), D))


def test_matches_mae_random_masking_and_decoder_math():
    """mae models_mae.py: random_masking + forward_decoder's unshuffle, written out."""
    B, N, D, Dd, ratio = 4, 196, 32, 24, 0.75
    x = torch.randn(B, 1 + N, D)  # patch tokens after patch_embed, with a CLS slot
    pos = torch.randn(1, 1 + N, D)
    cls = torch.randn(1, 1, D)
    g = torch.Generator().manual_seed(7)
    tm = masks.random_mask(B, N, ratio, generator=g)
    # --- MAE, with the same noise
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(7))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    len_keep = int(N * (1 - ratio))
    ids_keep = ids_shuffle[:, :len_keep]
    patches = x[:, 1:] + pos[:, 1:]
    x_masked = torch.gather(patches, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(B, N)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    enc_in = torch.cat([(cls + pos[:, :1]).expand(B, -1, -1), x_masked], 1)
    assert torch.equal(tm.ids_keep, ids_keep) and torch.equal(tm.ids_restore, ids_restore)
    assert torch.equal(tm.mask, mask.bool())
    # ours: CLS goes into slot 0, positions fused
    x_in = torch.cat([cls.expand(B, -1, -1), x[:, 1:]], 1)
    torch.testing.assert_close(sslkern.gather_tokens(x_in, tm.ids_keep, pos_embed=pos, num_prefix_tokens=1),
                               enc_in, atol=0, rtol=0)
    # decoder: mask tokens appended, unshuffled, + decoder_pos_embed
    y = torch.randn(B, 1 + len_keep, Dd)
    mask_token = torch.randn(1, 1, Dd)
    dpos = torch.randn(1, 1 + N, Dd)
    mask_tokens = mask_token.repeat(B, ids_restore.shape[1] + 1 - y.shape[1], 1)
    x_ = torch.cat([y[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, Dd))
    dec_in = torch.cat([y[:, :1, :], x_], dim=1) + dpos
    torch.testing.assert_close(sslkern.restore_tokens(y, tm.ids_restore, mask_token=mask_token, pos_embed=dpos,
                                                      num_prefix_tokens=1), dec_in, atol=0, rtol=0)


def test_matches_lightly_utils():
    lu = pytest.importorskip("lightly.models.utils")
    B, L, D = 3, 50, 16  # 49 patches + class token
    x = torch.randn(B, L, D)
    idx_keep, idx_mask = lu.random_token_mask(size=(B, L), mask_ratio=0.75, mask_class_token=False)
    assert (idx_keep[:, 0] == 0).all()  # lightly keeps the class token first
    ids_keep = idx_keep[:, 1:] - 1
    torch.testing.assert_close(sslkern.gather_tokens(x, ids_keep, num_prefix_tokens=1), lu.get_at_index(x, idx_keep),
                               atol=0, rtol=0)
    # decoder input (lightly MAE): mask tokens everywhere, then set_at_index(idx_keep)
    x_dec = torch.randn(B, idx_keep.shape[1], D)
    mask_token = torch.randn(1, 1, D)
    want = lu.set_at_index(lu.repeat_token(mask_token, (B, L)), idx_keep, x_dec)
    perm = torch.cat([ids_keep, idx_mask - 1], 1)
    ids_restore = torch.argsort(perm, 1)
    got = sslkern.restore_tokens(x_dec, ids_restore, mask_token=mask_token, num_prefix_tokens=1)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    name, device = backend
    B, P, N, D = 2, 1, 5, 3
    kw = dict(device=device, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, P + N, D, **kw)
    pos = torch.randn(P + N, D, **kw)
    ids = torch.tensor([[[4, 0], [2, 2]], [[1, 3], [0, 4]]], device=device)  # a repeat within a mask
    for mm in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, p: sslkern.gather_tokens(a, ids, pos_embed=p, num_prefix_tokens=P, mask_major=mm, backend=name),
            (x, pos))
    tm = masks.random_mask(B, N, 0.4, device=device)
    xv = torch.randn(B, P + tm.ids_keep.shape[1], D, **kw)
    mt = torch.randn(D, **kw)
    fill = torch.randn(B, N, D, **kw)
    assert torch.autograd.gradcheck(lambda a, m, p: sslkern.restore_tokens(
        a, tm.ids_restore, mask_token=m, pos_embed=p, num_prefix_tokens=P, backend=name), (xv, mt, pos))
    assert torch.autograd.gradcheck(lambda a, f: sslkern.restore_tokens(
        a, tm.ids_restore, fill=f, num_prefix_tokens=P, backend=name), (xv, fill))


def test_opcheck():
    B, P, N, D = 2, 1, 9, 5
    x = torch.randn(B, P + N, D, requires_grad=True)
    pos = torch.randn(P + N, D, requires_grad=True)
    ids = multi_ids(B, 2, N, 0.5)
    ops = torch.ops.sslkern
    for mm in (False, True):
        torch.library.opcheck(ops.gather_tokens.default, (x, ids, pos, P, mm, False, None, ""))
        torch.library.opcheck(ops.gather_tokens.default, (x, ids, None, P, mm, False, None, ""))
        g = torch.randn(B * 2, P + ids.shape[2], D)
        for need_pos in (False, True):
            torch.library.opcheck(ops.gather_tokens_backward.default,
                                  (g, ids, P + N, P, mm, need_pos, False, False, ""))
    tm = masks.random_mask(B, N, 0.5)
    xv = torch.randn(B, P + tm.ids_keep.shape[1], D, requires_grad=True)
    mt = torch.randn(D, requires_grad=True)
    fill = torch.randn(B, N, D, requires_grad=True)
    torch.library.opcheck(ops.restore_tokens.default, (xv, tm.ids_restore, mt, None, pos, P, ""))
    torch.library.opcheck(ops.restore_tokens.default, (xv, tm.ids_restore, None, fill, None, P, ""))
    g = torch.randn(B, P + N, D)
    for need_mt, need_fill, need_pos in [(True, False, True), (False, True, False), (False, False, False)]:
        torch.library.opcheck(ops.restore_tokens_backward.default,
                              (g, tm.ids_restore, tm.ids_keep.shape[1], P, need_mt, need_fill, need_pos, ""))


def test_compile_fullgraph_equals_eager():
    B, P, N, D = 2, 1, 49, 16
    x = torch.randn(B, P + N, D, requires_grad=True)
    pos = torch.randn(1, P + N, D, requires_grad=True)
    mt = torch.randn(D, requires_grad=True)
    tm = masks.random_mask(B, N, 0.75)
    ids2 = multi_ids(B, 3, N, 0.5)

    def f(x, pos, mt, ids_keep, ids_restore, ids2):
        vis = sslkern.gather_tokens(x, ids_keep, pos_embed=pos, num_prefix_tokens=P)
        out = sslkern.restore_tokens(vis * 2, ids_restore, mask_token=mt, pos_embed=pos, num_prefix_tokens=P)
        clones = sslkern.gather_tokens(x, ids2, num_prefix_tokens=P, mask_major=True)
        return out.square().sum() + clones.sum()

    args = (x, pos, mt, tm.ids_keep, tm.ids_restore, ids2)
    eager = f(*args)
    ge = torch.autograd.grad(eager, (x, pos, mt))
    # on-disk compile caches can hold graphs traced against an older schema of these ops
    # (seen while developing): compile fresh so the test checks this build
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(f, fullgraph=True, backend="inductor")(*args)
        gc = torch.autograd.grad(compiled, (x, pos, mt))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_empty_and_int32_ids():
    x = torch.randn(2, 6, 4)
    none = torch.zeros(2, 0, dtype=torch.int64)
    out = sslkern.gather_tokens(x, none, num_prefix_tokens=1)
    assert out.shape == (2, 1, 4) and torch.equal(out, x[:, :1])
    ids_restore = torch.stack([torch.randperm(5) for _ in range(2)])
    mt = torch.randn(4)
    y = sslkern.restore_tokens(out, ids_restore, mask_token=mt, num_prefix_tokens=1)  # everything removed
    assert torch.equal(y[:, 1:], mt.expand(2, 5, 4))
    ids = torch.tensor([[3, 0], [1, 1]], dtype=torch.int32)
    torch.testing.assert_close(sslkern.gather_tokens(x, ids, num_prefix_tokens=1),
                               ref_gather(x, ids.long(), num_prefix_tokens=1), atol=0, rtol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "reference"])
def test_out_of_range_indices_raise(backend):
    name, device = backend
    x = torch.randn(2, 1 + 8, 4, device=device)
    bad = torch.tensor([[0, 8], [1, 2]], device=device)
    with pytest.raises(IndexError, match=r"ids_keep expected values in \[0, 8\)"):
        sslkern.gather_tokens(x, bad, num_prefix_tokens=1, backend=name)
    with pytest.raises(IndexError, match=r"ids_keep expected values in \[0, 8\)"):
        sslkern.gather_tokens(x, -bad - 1, num_prefix_tokens=1, backend=name)
    xv = torch.randn(2, 1 + 3, 4, device=device)
    ids_restore = torch.stack([torch.randperm(8) for _ in range(2)]).to(device)
    ids_restore[1, 5] = 8
    with pytest.raises(IndexError, match=r"ids_restore expected values in \[0, 8\)"):
        sslkern.restore_tokens(xv, ids_restore, mask_token=torch.randn(4, device=device), num_prefix_tokens=1,
                               backend=name)


def test_cpu_restore_rejects_non_permutation():
    xv = torch.randn(2, 4, 4)
    ids_restore = torch.stack([torch.randperm(8) for _ in range(2)])
    ids_restore[1, 0] = ids_restore[1, 1]
    with pytest.raises(ValueError, match=r"ids_restore\[1\] must be a permutation"):
        sslkern.restore_tokens(xv, ids_restore, mask_token=torch.randn(4), num_prefix_tokens=1, backend="cpu")


@pytest.mark.parametrize("call,match", [
    (lambda x, i, r: sslkern.gather_tokens(x[0], i), r"x expected 3 dims"),
    (lambda x, i, r: sslkern.gather_tokens(x.long(), i), r"x expected dtype"),
    (lambda x, i, r: sslkern.gather_tokens(x, i.float()), r"ids_keep expected dtype"),
    (lambda x, i, r: sslkern.gather_tokens(x, i[:1]), r"ids_keep expected batch size 2"),
    (lambda x, i, r: sslkern.gather_tokens(x, i, num_prefix_tokens=20), r"num_prefix_tokens must be in"),
    (lambda x, i, r: sslkern.gather_tokens(x, i, mask_major=True), r"mask_major=True needs ids_keep"),
    (lambda x, i, r: sslkern.gather_tokens(x, i, pos_embed=torch.randn(10, 4)), r"pos_embed expected shape \(9, 4\)"),
    (lambda x, i, r: sslkern.gather_tokens(x, i, backend="cuda"), "cannot run here"),
    (lambda x, i, r: sslkern.restore_tokens(x[:, :4], r), "exactly one of mask_token and fill"),
    (lambda x, i, r: sslkern.restore_tokens(x[:, :4], r, mask_token=torch.randn(4), fill=torch.randn(2, 9, 4)),
     "exactly one of mask_token and fill"),
    (lambda x, i, r: sslkern.restore_tokens(x[:, :4], r, mask_token=torch.randn(5)), r"mask_token expected shape"),
    (lambda x, i, r: sslkern.restore_tokens(x[:, :4], r, fill=torch.randn(2, 8, 4)), r"fill expected shape \(2, 9, 4\)"),
    (lambda x, i, r: sslkern.restore_tokens(torch.randn(2, 12, 4), r, mask_token=torch.randn(4)),
     r"x_vis expected at most"),
    (lambda x, i, r: sslkern.restore_tokens(x[:, :4], r[:, None], mask_token=torch.randn(4)),
     r"ids_restore expected 2 dims"),
])
def test_bad_input(call, match):
    x = torch.randn(2, 9, 4)
    i = torch.tensor([[0, 3], [5, 1]])
    r = torch.stack([torch.randperm(9) for _ in range(2)])
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(x, i, r)


@pytest.mark.parametrize("vit_kwargs", [{}, {"reg_tokens": 2}, {"no_embed_class": True},
                                        {"class_token": False, "global_pool": "avg"}])
def test_nn_timm_embed_visible_and_forward_masked(vit_kwargs):
    timm = pytest.importorskip("timm")
    from sslkern.nn import embed_visible
    from sslkern.patch import forward_masked

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, **vit_kwargs).eval()
    img = torch.randn(3, 3, 64, 64)
    P, N = vit.num_prefix_tokens, 16
    with torch.no_grad():
        full = vit._pos_embed(vit.patch_embed(img))            # timm's own embedding, all tokens
        # all tokens in order: the whole forward equals timm's
        torch.testing.assert_close(forward_masked(vit, img, torch.arange(N).expand(3, N)), vit.forward_features(img),
                                   atol=1e-5, rtol=1e-5)
        tm = masks.random_mask(3, N, 0.75, num_masks=2)
        for mm in (False, True):
            got = embed_visible(vit, img, tm.ids_keep, mask_major=mm)
            want = ref_gather(full, tm.ids_keep, num_prefix_tokens=P, mask_major=mm)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_nn_decoder_input_modes():
    from sslkern.nn import DecoderInput

    B, P, N, D = 2, 1, 16, 8
    tm = masks.random_mask(B, N, 0.75)
    x_vis = torch.randn(B, P + tm.ids_keep.shape[1], D, requires_grad=True)
    pos = torch.randn(1, P + N, D)
    dec = DecoderInput(D, pos_embed=pos)
    out = dec(x_vis, tm.ids_restore)
    want = ref_restore(x_vis, tm.ids_restore, mask_token=dec.mask_token, pos_embed=pos, num_prefix_tokens=P)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    out.sum().backward()
    assert torch.allclose(dec.mask_token.grad, torch.full((D,), float(B * (N - 4))))
    noisy = DecoderInput(D, mode="noise", noise_std=0.01)
    y = noisy(x_vis, tm.ids_restore, generator=torch.Generator().manual_seed(0))
    removed = y[:, P:][tm.mask]
    assert 0.005 < removed.std() < 0.02 and removed.abs().max() < 0.1   # N(0, 0.01²) fill
    torch.testing.assert_close(y[:, P:][~tm.mask], ref_restore(x_vis, tm.ids_restore, mask_token=torch.zeros(D),
                                                               num_prefix_tokens=P)[:, P:][~tm.mask])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clone_batch_round_trip(backend):
    """data2vec 2.0: M inverse-block masks per image, gather without the repeat, restore per clone."""
    name, device = backend
    B, M, P, D = 2, 3, 1, 9
    tm = masks.inverse_block_mask(B, (7, 7), 0.6, num_masks=M, device=device)
    x = torch.randn(B, P + 49, D, device=device)
    vis = sslkern.gather_tokens(x, tm.ids_keep, num_prefix_tokens=P, backend=name)
    fill = torch.randn(B * M, 49, D, device=device)
    back = sslkern.restore_tokens(vis, tm.ids_restore.reshape(B * M, 49), fill=fill, num_prefix_tokens=P, backend=name)
    rep = x.repeat_interleave(M, dim=0)
    removed = tm.mask.reshape(B * M, 49)
    torch.testing.assert_close(back[:, P:][~removed], rep[:, P:][~removed], atol=0, rtol=0)
    torch.testing.assert_close(back[:, P:][removed], fill[removed], atol=0, rtol=0)
    torch.testing.assert_close(back[:, :P], rep[:, :P], atol=0, rtol=0)


def test_cpu_large_outputs_huge_page_path():
    """Outputs >= 4 MiB take the huge-page allocation hint; results must not change."""
    B, P, N, D = 8, 1, 196, 768  # 4.8 MB gradient, 4.8 MB decoder output
    x = torch.randn(B, P + N, D, requires_grad=True)
    pos = torch.randn(P + N, D, requires_grad=True)
    tm = masks.random_mask(B, N, 0.75)
    got = sslkern.gather_tokens(x, tm.ids_keep, pos_embed=pos, num_prefix_tokens=P, backend="cpu")
    want = ref_gather(x, tm.ids_keep, pos_embed=pos, num_prefix_tokens=P)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x, pos), g), torch.autograd.grad(want, (x, pos), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    mt = torch.randn(D)
    y = sslkern.restore_tokens(got.detach(), tm.ids_restore, mask_token=mt, pos_embed=pos.detach(),
                               num_prefix_tokens=P, backend="cpu")
    torch.testing.assert_close(y, ref_restore(want.detach(), tm.ids_restore, mask_token=mt, pos_embed=pos.detach(),
                                              num_prefix_tokens=P), atol=0, rtol=0)


def _mae_step(backend, check, B=2, P=1, N=16, D=8):
    x = torch.randn(B, P + N, D, requires_grad=True)
    pos = torch.randn(P + N, D, requires_grad=True)
    mt = torch.randn(D, requires_grad=True)
    m = masks.random_mask(B, N, 0.75)
    with SyncCounter() as c:
        vis = sslkern.gather_tokens(x, m.ids_keep, pos_embed=pos, num_prefix_tokens=P, check_indices=check,
                                    backend=backend)
        out = sslkern.restore_tokens(vis * 2, m.ids_restore, mask_token=mt, pos_embed=pos, num_prefix_tokens=P,
                                     check_indices=check, backend=backend)
        out.sum().backward()
    return c.n, (x.grad, pos.grad, mt.grad)


@pytest.mark.skipif(not STATUS_TRITON, reason="triton backend unavailable")
def test_index_checks_sync_once_at_the_front_door_and_never_with_check_indices_false():
    """Item: host syncs in op bodies. Forward + backward of gather and restore: one sync per public
    call with the check on, none at all with check_indices=False (capturable in a CUDA graph);
    the gradients are the same."""
    torch.manual_seed(0)
    n_on, g_on = _mae_step("triton", True)
    torch.manual_seed(0)
    n_off, g_off = _mae_step("triton", False)
    assert n_on == 2 and n_off == 0
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.skipif(not STATUS_TRITON, reason="triton backend unavailable")
def test_unchecked_out_of_range_ids_touch_nothing():
    x = torch.randn(2, 1 + 8, 4, requires_grad=True)
    bad = torch.tensor([[0, 8], [1, -3]])
    out = sslkern.gather_tokens(x, bad, num_prefix_tokens=1, check_indices=False, backend="triton")
    assert torch.equal(out[0, 1], x[0, 1]) and torch.equal(out[1, 1], x[1, 2])
    assert torch.equal(out[0, 2], torch.zeros(4)) and torch.equal(out[1, 2], torch.zeros(4))
    out.sum().backward()
    want = torch.zeros_like(x)
    want[:, 0] = 1
    want[0, 1] = 1
    want[1, 2] = 1
    assert torch.equal(x.grad, want)


def test_front_door_finds_repeated_indices():
    from sslkern.ops._common import check_index_values
    from sslkern.ops.tokens import _repeats_in_rows
    uniq = torch.stack([torch.randperm(10)[:6] for _ in range(3)])
    assert not check_index_values("gather_tokens", "ids_keep", uniq, 10, also=_repeats_in_rows(uniq, 10))
    clones = torch.stack([torch.stack([torch.randperm(10)[:6] for _ in range(2)]) for _ in range(3)])
    clones[:, 1] = clones[:, 0]  # two clone masks keep the same tokens
    assert check_index_values("gather_tokens", "ids_keep", clones, 10, also=_repeats_in_rows(clones, 10))
    bad = uniq.clone()
    bad[1, 2] = 12
    with pytest.raises(IndexError, match=r"ids_keep expected values in \[0, 10\), got ids_keep\[1, 2\] = 12"):
        check_index_values("gather_tokens", "ids_keep", bad, 10, also=_repeats_in_rows(bad, 10))


@pytest.mark.skipif(not STATUS_TRITON, reason="triton backend unavailable")
@pytest.mark.parametrize("M,P,unique", [(1, 1, True), (2, 0, True), (2, 1, False), (2, 0, False)])
def test_gather_backward_picks_plain_stores_for_unique_ids(monkeypatch, M, P, unique):
    """Unique destinations (one writer each) -> plain stores (UNIQUE=True); repeats, or prefix rows
    shared by several clones -> relaxed atomics. The position gradient is never a kernel output
    (a separate batch reduction). Gradients equal the reference either way."""
    from sslkern.triton_ops import tokens as tt
    flags = []
    real = tt.gather_rows_backward_kernel

    class Rec:
        def __getitem__(self, grid):
            def launch(*a, **k):
                flags.append(k["UNIQUE"])
                return real[grid](*a, **k)
            return launch

    monkeypatch.setattr(tt, "gather_rows_backward_kernel", Rec())
    B, N, D = 2, 12, 8
    ids = torch.stack([torch.stack([torch.randperm(N)[:4] for _ in range(M)]) for _ in range(B)])
    if M == 2 and not unique:
        ids[:, 1, 0] = ids[:, 0, 0]  # a repeated token across clone masks
    elif M == 2:
        perm = torch.stack([torch.randperm(N) for _ in range(B)])
        ids = perm[:, :8].reshape(B, 2, 4)  # disjoint masks
    x = torch.randn(B, P + N, D, requires_grad=True)
    pos = torch.randn(P + N, D, requires_grad=True)
    g = torch.randn(B * M, P + 4, D)
    sslkern.gather_tokens(x, ids, pos_embed=pos, num_prefix_tokens=P, backend="triton").backward(g)
    assert flags == [unique and (M == 1 or P == 0)]
    x2, pos2 = x.detach().clone().requires_grad_(True), pos.detach().clone().requires_grad_(True)
    ref_gather(x2, ids, pos_embed=pos2, num_prefix_tokens=P).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pos.grad, pos2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not STATUS_TRITON, reason="triton backend unavailable")
def test_deterministic_mode_uses_no_atomics(monkeypatch):
    """torch.use_deterministic_algorithms(True): repeated clone-mask tokens are summed by index_add_
    and the mask token's gradient by torch.sum (no atomic kernel runs), bitwise repeatable,
    equal to the reference."""
    from sslkern.triton_ops import tokens as tt
    launched = []
    for name in ("gather_rows_backward_kernel",):
        real = getattr(tt, name)
        monkeypatch.setattr(tt, name, type("Rec", (), {"__getitem__": lambda self, grid, real=real: (
            lambda *a, **k: (launched.append(k), real[grid](*a, **k)))})())
    B, P, N, D, M = 2, 1, 16, 8, 3
    ids = multi_ids(B, M, N, 0.5)  # clone masks overlap: repeated destinations
    tm = masks.random_mask(B, N, 0.5)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            x = torch.randn(B, P + N, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
            mt = torch.randn(D, generator=torch.Generator().manual_seed(2), requires_grad=True)
            y = sslkern.gather_tokens(x, ids, num_prefix_tokens=P, backend="triton")
            xv = torch.randn(B, P + tm.ids_keep.shape[1], D, generator=torch.Generator().manual_seed(3),
                             requires_grad=True)
            z = sslkern.restore_tokens(xv, tm.ids_restore, mask_token=mt, num_prefix_tokens=P, backend="triton")
            (y.square().sum() + z.square().sum()).backward()
            grads.append((x.grad, mt.grad))
    finally:
        torch.use_deterministic_algorithms(old)
    assert launched == []  # the atomic gather kernel never ran
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    x2 = x.detach().clone().requires_grad_(True)
    ref_gather(x2, ids, num_prefix_tokens=P).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# prefix_tokens: MAE's forward_encoder (x + pos_embed[:, 1:], gather, cls_token + pos in front)
# ---------------------------------------------------------------------------------------
def mae_encoder_input(x, ids_keep, pos, prefix):
    """models_mae.py forward_encoder's token handling, for P shared prefix tokens (1 in MAE)."""
    P, D = prefix.shape[-2], x.shape[-1]
    h = x + pos[:, P:, :]
    if ids_keep.dim() == 2:
        h = torch.gather(h, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    else:  # clone batch, image-major rows
        B, M, Nk = ids_keep.shape
        h = torch.gather(h.repeat_interleave(M, 0), 1, ids_keep.reshape(B * M, Nk, 1).repeat(1, 1, D))
    pre = (prefix.reshape(1, P, D) + pos[:, :P, :]).expand(h.shape[0], -1, -1)
    return torch.cat((pre, h), dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_tokens_match_mae_forward_encoder(backend, dtype):
    name, device = backend
    for B, P, N, D in shapes_for(name):
        P = max(P, 1)
        x = torch.randn(B, N, D, device=device).to(dtype).requires_grad_()
        cls = torch.randn(1, P, D, device=device).to(dtype).requires_grad_()
        for pos_grad in (False, True):
            pos = torch.randn(1, P + N, D, device=device).to(dtype).requires_grad_(pos_grad)
            for ids in (masks.random_mask(B, N, 0.75, device=device).ids_keep, multi_ids(B, 3, N, 0.5, device)):
                got = sslkern.gather_tokens(x, ids, pos_embed=pos, prefix_tokens=cls, backend=name)
                want = mae_encoder_input(x, ids, pos, cls)
                assert got.shape == want.shape and got.dtype == dtype
                torch.testing.assert_close(got, want, **fwd_tol(name, device, dtype))
                g = torch.randn_like(got)
                inputs = (x, cls, pos) if pos_grad else (x, cls)
                for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
                    torch.testing.assert_close(a, b, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])
        # without positions, and with num_prefix_tokens stated
        got = sslkern.gather_tokens(x, ids, prefix_tokens=cls[0], num_prefix_tokens=P, backend=name)
        want = mae_encoder_input(x, ids, torch.zeros(1, P + N, D, device=device, dtype=dtype), cls)
        torch.testing.assert_close(got, want, **fwd_tol(name, device, dtype))


def test_prefix_tokens_gradcheck_opcheck_and_errors():
    B, P, N, D = 2, 1, 5, 3
    kw = dict(dtype=torch.float64, requires_grad=True)
    x, cls, pos = torch.randn(B, N, D, **kw), torch.randn(1, P, D, **kw), torch.randn(1, P + N, D, **kw)
    ids = torch.tensor([[[4, 0], [2, 2]], [[1, 3], [0, 4]]])
    for mm in (False, True):
        assert torch.autograd.gradcheck(lambda a, c, p: sslkern.gather_tokens(
            a, ids, pos_embed=p, prefix_tokens=c, mask_major=mm), (x, cls, pos))
    ops = torch.ops.sslkern
    x32, pre, pos32 = torch.randn(B, N, D, requires_grad=True), torch.randn(P, D, requires_grad=True), torch.randn(P + N, D)
    torch.library.opcheck(ops.gather_tokens.default, (x32, ids, pos32, P, False, False, pre, ""))
    g = torch.randn(B * 2, P + 2, D)
    for need_pos in (False, True):
        torch.library.opcheck(ops.gather_tokens_backward.default, (g, ids, N, P, False, need_pos, False, True, ""))
    f = torch.compile(lambda a, c: sslkern.gather_tokens(a, ids, pos_embed=pos32, prefix_tokens=c), fullgraph=True)
    torch.testing.assert_close(f(x32, pre), sslkern.gather_tokens(x32, ids, pos_embed=pos32, prefix_tokens=pre))
    with pytest.raises(ValueError, match=r"prefix_tokens expected shape \(1, 3\) or \(1, 1, 3\)"):
        sslkern.gather_tokens(x32, ids, prefix_tokens=torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"num_prefix_tokens expected 0 or 1"):
        sslkern.gather_tokens(x32, ids, prefix_tokens=pre, num_prefix_tokens=2)
    with pytest.raises(ValueError, match=r"pos_embed expected shape \(6, 3\)"):
        sslkern.gather_tokens(x32, ids, prefix_tokens=pre, pos_embed=torch.randn(N, D))
    with pytest.raises(IndexError, match="ids_keep"):  # indices are into the N patches of x
        sslkern.gather_tokens(x32, torch.full((B, 2), N), prefix_tokens=pre)


def test_cpu_streaming_writes_of_large_outputs():
    # outputs of >= 4 MiB are written with streaming stores (csrc/cpu/tokens.cpp): gather
    # (clone batch), its backward (grad_x), restore; with and without positions, fp32 and bf16
    B, N, D, M = 8, 196, 768, 4
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(B, N, D).to(dtype).requires_grad_()
        cls = torch.randn(1, 1, D).to(dtype).requires_grad_()
        pos = torch.randn(1, 1 + N, D).to(dtype)
        ids = multi_ids(B, M, N, 0.75)
        got = sslkern.gather_tokens(x, ids, pos_embed=pos, prefix_tokens=cls, backend="cpu")
        want = mae_encoder_input(x, ids, pos, cls)
        assert got.numel() * got.element_size() >= (4 << 20) or dtype != torch.float32
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        g = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, (x, cls), g), torch.autograd.grad(want, (x, cls), g)):
            torch.testing.assert_close(a, b, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])
        tm = masks.random_mask(B, N, 0.75)
        xv = torch.randn(B, 1 + tm.ids_keep.shape[1], D).to(dtype).requires_grad_()
        mt = torch.randn(D).to(dtype)
        for p in (None, pos):
            got = sslkern.restore_tokens(xv, tm.ids_restore, mask_token=mt, pos_embed=p, num_prefix_tokens=1,
                                         backend="cpu")
            torch.testing.assert_close(got, ref_restore(xv, tm.ids_restore, mask_token=mt, pos_embed=p,
                                                        num_prefix_tokens=1), atol=0, rtol=0)
