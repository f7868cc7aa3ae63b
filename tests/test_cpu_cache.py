"""The CPU output cache (sslkern.cpu_cache): reuse only of freed outputs, limits, API."""
import gc

import pytest
import torch

import sslkern

pytestmark = pytest.mark.skipif(sslkern._backend.extension() is None, reason="sslkern._C not built")


@pytest.fixture(autouse=True)
def fresh_cache():
    limit = sslkern.cpu_cache_info()["limit_bytes"]
    sslkern.set_cpu_cache_limit(256 << 20)
    gc.collect()  # tensors of earlier tests caught in reference cycles
    sslkern.empty_cpu_cache()
    yield
    sslkern.set_cpu_cache_limit(limit)


def _inputs(B=4, L=256, D=1024, keep=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    ids = torch.argsort(torch.rand(B, L, generator=g), 1)[:, :keep]
    return x, ids


def _gather(x, ids):  # output: B·keep·D fp32 = 2 MiB, above the cache's 1 MiB floor
    return sslkern.gather_tokens(x, ids, backend="cpu")


def test_idle_buffer_is_reused():
    x, ids = _inputs()
    out = _gather(x, ids)
    ptr = out.data_ptr()
    del out
    before = sslkern.cpu_cache_info()
    assert before["free_blocks"] == 1 and before["free_bytes"] == 4 * 128 * 1024 * 4
    out2 = _gather(x, ids)
    after = sslkern.cpu_cache_info()
    assert out2.data_ptr() == ptr and after["hits"] == before["hits"] + 1
    torch.testing.assert_close(out2, torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[2])), rtol=0, atol=0)


def _overlaps(t: torch.Tensor, storage) -> bool:
    a0, a1 = t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()
    b0, b1 = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    return a0 < b1 and b0 < a1


@pytest.mark.parametrize("holder", ["tensor", "view", "storage"])
def test_referenced_buffer_is_never_reused(holder):
    x, ids = _inputs()
    x2, ids2 = _inputs(seed=1)
    out = _gather(x, ids)
    expected = out.clone()
    kept = {"tensor": out, "view": out[1:3, 5], "storage": out.untyped_storage()}[holder]
    storage = out.untyped_storage()
    del out
    news = [_gather(x2, ids2) for _ in range(3)]  # same shapes again: other memory every time
    assert not any(_overlaps(n, storage) for n in news)
    del news
    news = [_gather(x2, ids2) for _ in range(2)]  # and again, with idle buffers around
    assert not any(_overlaps(n, storage) for n in news)
    if holder == "storage":
        kept = torch.empty(0).set_(kept).view(expected.shape)
    torch.testing.assert_close(kept, expected[1:3, 5] if holder == "view" else expected, rtol=0, atol=0)


def test_accumulated_grad_stays_correct():
    # the gather backward's output becomes x.grad (autograd keeps it); the next backward's
    # output must come from other memory, or the in-place accumulation would be wrong
    x, ids = _inputs()
    _, ids2 = _inputs(seed=1)
    xg = x.clone().requires_grad_(True)
    g1, g2 = torch.randn(4, 128, 1024), torch.randn(4, 128, 1024)
    sslkern.gather_tokens(xg, ids, backend="cpu").backward(g1)
    sslkern.gather_tokens(xg, ids2, backend="cpu").backward(g2)
    want = torch.zeros_like(x)
    want.scatter_add_(1, ids[..., None].expand(-1, -1, 1024), g1)
    want.scatter_add_(1, ids2[..., None].expand(-1, -1, 1024), g2)
    torch.testing.assert_close(xg.grad, want)


def test_grad_kept_by_autograd_is_not_overwritten():
    # dino_loss returns its stored gradient on loss.backward(); a second call must not
    # write into the first gradient while the user holds it
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(8 * 4, 16384, generator=g) * 3).requires_grad_(True)  # 2 MiB gradient
    t = torch.randn(2 * 4, 16384, generator=g) * 3
    c = torch.zeros(16384)
    loss = sslkern.dino_loss(s, t, c, n_global_crops=2, backend="cpu")
    (g1,) = torch.autograd.grad(loss, s)
    g1_copy = g1.clone()
    loss2 = sslkern.dino_loss(s * 1.5, t, c, n_global_crops=2, backend="cpu")
    (g2,) = torch.autograd.grad(loss2, s)
    assert g1.data_ptr() != g2.data_ptr()
    torch.testing.assert_close(g1, g1_copy, rtol=0, atol=0)
    del g1, g1_copy
    loss3 = sslkern.dino_loss(s, t, c, n_global_crops=2, backend="cpu")
    (g3,) = torch.autograd.grad(loss3, s)
    assert sslkern.cpu_cache_info()["hits"] >= 1
    torch.testing.assert_close(loss3, loss)


def test_storage_object_keeps_the_block():
    # a Python storage object outliving its tensor (PyTorch preserves it) holds the block
    x, ids = _inputs()
    out = _gather(x, ids)
    expected = out.clone()
    st = out.untyped_storage()
    del out
    assert sslkern.cpu_cache_info()["free_blocks"] == 0
    other = _gather(*_inputs(seed=2))
    assert not _overlaps(other, st)
    torch.testing.assert_close(torch.empty(0).set_(st).view(expected.shape), expected, rtol=0, atol=0)
    del st, other
    gc.collect()
    assert sslkern.cpu_cache_info()["free_blocks"] == 2  # both returned once unreferenced


def test_outputs_behave_like_ordinary_tensors():
    # resize (the old block returns to the cache), in-place ops, out=, pickling, numpy
    import io
    x, ids = _inputs()
    out = _gather(x, ids)
    want = out.clone()
    out.resize_(8, 128, 1024)
    torch.testing.assert_close(out[:4], want, rtol=0, atol=0)
    assert sslkern.cpu_cache_info()["free_blocks"] == 1
    out2 = _gather(x, ids)
    torch.add(out2, 1, out=out2)
    torch.testing.assert_close(out2, want + 1, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(out2, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf), want + 1, rtol=0, atol=0)
    assert (out2.numpy() == (want + 1).numpy()).all()


def test_limit_zero_disables_and_context_restores():
    x, ids = _inputs()
    with sslkern.cpu_cache_disabled():
        assert sslkern.cpu_cache_info()["limit_bytes"] == 0
        out = _gather(x, ids)
        del out
        info = sslkern.cpu_cache_info()
        assert info["free_blocks"] == 0 and info["free_bytes"] == 0
        out = _gather(x, ids)
        torch.testing.assert_close(out, torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[2])), rtol=0, atol=0)
    assert sslkern.cpu_cache_info()["limit_bytes"] == 256 << 20


def test_limit_bounds_free_bytes():
    sslkern.set_cpu_cache_limit(5 << 20)  # room for two free 2 MiB outputs
    x, ids = _inputs()
    outs = [_gather(x, ids) for _ in range(4)]
    assert len({o.data_ptr() for o in outs}) == 4
    del outs
    info = sslkern.cpu_cache_info()
    assert info["free_blocks"] == 2 and info["free_bytes"] == 4 << 20
    sslkern.set_cpu_cache_limit(3 << 20)
    assert sslkern.cpu_cache_info()["free_blocks"] == 1
    sslkern.empty_cpu_cache()
    assert sslkern.cpu_cache_info()["free_blocks"] == 0


def test_small_outputs_bypass_the_cache():
    x, ids = _inputs(B=2, L=16, D=64, keep=8)
    before = sslkern.cpu_cache_info()
    for _ in range(3):
        _gather(x, ids)
    after = sslkern.cpu_cache_info()
    assert after["free_blocks"] == 0 and (after["hits"], after["misses"]) == (before["hits"], before["misses"])


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="limit_bytes"):
        sslkern.set_cpu_cache_limit(bad)
