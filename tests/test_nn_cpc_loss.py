"""sslkern.nn.CPCLoss: CPC's InfoNCE over every target of the global batch, its top-1
statistics, and its cross-process gathering (two gloo processes equal one)."""
import socket

import pytest
import torch
import torch.nn.functional as F

import sslkern


def _explicit(preds, targets, labels):
    """The pseudo-code's loss with the logits written out: Σ_k cross_entropy(preds_k·targetsᵀ, labels_k)."""
    return sum(F.cross_entropy(p @ targets.t(), lab) for p, lab in zip(preds, labels))


def test_loss_is_the_explicit_cross_entropy_summed_over_offsets():
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(5 * 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    preds = [torch.randn(n, 16, generator=g, dtype=torch.float64, requires_grad=True) for n in (30, 15)]
    labels = [torch.randint(0, 45, (30,), generator=g), torch.randint(0, 45, (15,), generator=g)]
    loss, stats = sslkern.nn.CPCLoss(9)(preds, targets, labels)
    want = _explicit(preds, targets, labels)
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-12)
    got_grads = torch.autograd.grad(loss, [targets, *preds])
    for a, b in zip(got_grads, torch.autograd.grad(want, [targets, *preds])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    hits = sum(int(((p @ targets.t()).argmax(1) == lab).sum()) for p, lab in zip(preds, labels))
    assert float(stats["accuracy"]) == pytest.approx(hits / 45)
    assert float(stats["chance"]) == pytest.approx(1 / 45)
    total = stats["accuracy"] + stats["wrong_same_image"] + stats["wrong_other_image"]
    assert float(total) == pytest.approx(1.0)


def test_guesses_split_same_and_other_image():
    targets = torch.eye(8)                        # 2 images of 4 targets
    labels = [torch.tensor([0, 1, 5, 6])]
    preds = [torch.eye(8)[[0, 3, 7, 2]]]          # right; same image (3 vs 1); same image (7 vs 5); other image (2 vs 6)
    stats = sslkern.nn.CPCLoss(4, chunk=3).guesses(preds, targets, labels)
    assert [float(stats[k]) for k in ("accuracy", "wrong_same_image", "wrong_other_image")] == [0.25, 0.5, 0.25]


@pytest.mark.parametrize("kwargs, message", [
    (dict(preds=[], labels=[]), "preds and labels expected one entry per offset each, got 0 and 0"),
    (dict(labels=[torch.zeros(4, dtype=torch.long)] * 2), "got 1 and 2"),
    (dict(targets=torch.randn(10, 8)), r"targets expected \(images · 4, C\), got shape \(10, 8\)"),
])
def test_bad_input(kwargs, message):
    args = dict(preds=[torch.randn(4, 8)], targets=torch.randn(8, 8), labels=[torch.zeros(4, dtype=torch.long)])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sslkern.nn.CPCLoss(4)(**args)
    with pytest.raises(ValueError, match="targets_per_image expected a positive int"):
        sslkern.nn.CPCLoss(0)


# ---------------------------------------------------------------------------------------
# two gloo processes: each holds half the images; the targets of both are the negatives
# ---------------------------------------------------------------------------------------
B, PER_IMAGE, C, D = 6, 4, 8, 5  # global images, targets per image, target width, input width


def _global_problem():
    """Inputs x (B·PER_IMAGE, D) of every target, each image's predictions from its first two
    rows (2 per image), a shared weight W (D, C) through which both are formed."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B * PER_IMAGE, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, C, generator=g, dtype=torch.float64)
    pred_rows = torch.tensor([b * PER_IMAGE + r for b in range(B) for r in range(2)])
    labels = pred_rows + 2  # each prediction's positive: two rows further in its own image
    return x, w, pred_rows, labels


def _loss_and_grad(x, w, pred_rows, labels):
    w = w.clone().requires_grad_(True)
    t = x @ w
    loss, stats = sslkern.nn.CPCLoss(PER_IMAGE)([t[pred_rows] * 0.3], t, [labels])
    loss.backward()
    return loss.detach(), w.grad, stats


def _worker(rank, world, port, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, w, _, _ = _global_problem()
        n = B // world                                   # this process's images: rank·n ... (rank + 1)·n − 1
        x_local = x[rank * n * PER_IMAGE:(rank + 1) * n * PER_IMAGE]
        pred_rows = torch.tensor([b * PER_IMAGE + r for b in range(n) for r in range(2)])
        loss, grad, stats = _loss_and_grad(x_local, w, pred_rows, pred_rows + 2)
        dist.all_reduce(grad)                            # what DDP does with the gradients: their mean
        queue.put((rank, float(loss), (grad / world).tolist(), float(stats["accuracy"]), float(stats["chance"])))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one():
    """The mean of the two processes' losses and the mean of their gradients (DDP) equal the
    one-process loss and gradient on the whole batch; the chance level counts every target."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, rest) for r, *rest in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    loss, grad, stats = _loss_and_grad(*_global_problem())
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(float(loss), rel=1e-12)
    assert results[0][0] != pytest.approx(results[1][0])  # the halves differ: the check is not trivial
    for r in (0, 1):
        torch.testing.assert_close(torch.tensor(results[r][1], dtype=torch.float64), grad, atol=1e-12, rtol=1e-10)
        assert results[r][3] == pytest.approx(1 / (B * PER_IMAGE))
    assert (results[0][2] + results[1][2]) / 2 == pytest.approx(float(stats["accuracy"]))
