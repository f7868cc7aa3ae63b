"""Run by tests/test_redundancy_distributed.py as torchrun would (2 gloo ranks): the Barlow Twins,
VICReg and SwAV losses under DDP against one process on the global batch and against the
official code on the same ranks. fp64 throughout, so "equal" means to 1e-9."""
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sslkern  # noqa: E402
from _redundancy_ref import SwAVLossLoop, barlowtwins_forward, vicreg_forward  # noqa: E402

torch.set_default_dtype(torch.float64)


class Pair(nn.Module):
    """A linear 'projector' applied to both views in one forward (one DDP forward per backward)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, xa, xb):
        return self.lin(xa), self.lin(xb)


def close(name, got, want, tol=1e-9):
    err = float((got - want).abs().max() / max(float(want.abs().max()), 1e-30))
    assert err < tol, f"rank {dist.get_rank()}: {name}: relative error {err:.2e}"


def step(model, loss_fn, xa, xb):
    """loss and the projector's weight gradient (DDP-averaged when model is DDP)."""
    model.zero_grad()
    za, zb = model(xa, xb)
    loss = loss_fn(za, zb)
    loss.backward()
    lin = model.module.lin if isinstance(model, nn.parallel.DistributedDataParallel) else model.lin
    return loss.detach(), lin.weight.grad.clone()


def check_pair_loss(name, make_loss, one_process_loss, n, d, rank, world, seed, *, official=None, scale=1.0):
    torch.manual_seed(seed)
    xa, xb = torch.randn(n, 12), torch.randn(n, 12)
    base = Pair(12, d)
    rows = slice(rank * n // world, (rank + 1) * n // world)
    want_loss, want_grad = step(copy.deepcopy(base), one_process_loss, xa, xb)
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    loss, grad = step(ddp, make_loss(), xa[rows], xb[rows])
    avg = loss.clone()
    dist.all_reduce(avg)
    close(f"{name}: loss", avg / world, want_loss)
    close(f"{name}: weight gradient", grad, want_grad)
    if official is not None:  # the official code on the same ranks
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        o_loss, o_grad = step(ddp, official, xa[rows], xb[rows])
        dist.all_reduce(o_loss)
        close(f"{name}: official loss", o_loss / world, want_loss)
        close(f"{name}: official gradient × {scale:g}", o_grad * scale, want_grad)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for n, d, method in ((32, 48, "gram"), (48, 20, "tiled")):
        # Barlow Twins, global statistics: exact; the official code (SyncBatchNorm → GlobalBatchNorm1d,
        # its non-differentiated all-reduce of C) gives 1/world of the gradient
        sync_bn = sslkern.nn.GlobalBatchNorm1d(d, affine=False)
        check_pair_loss(f"barlow {method}", lambda: sslkern.nn.BarlowTwinsLoss(method=method),
                        lambda a, b: sslkern.cross_correlation_loss(a, b), n, d, rank, world, 1,
                        official=lambda a, b: barlowtwins_forward(a, b, 0.0051, n, bn=sync_bn), scale=world)
        # Barlow Twins, each rank's own statistics: lightly BarlowTwinsLoss(gather_distributed=True)
        from lightly.loss import BarlowTwinsLoss

        check_pair_loss(f"barlow local {method}",
                        lambda: sslkern.nn.BarlowTwinsLoss(5e-3, statistics="local", method=method),
                        lambda a, b: sslkern.cross_correlation_loss(a, b, 5e-3, groups=world), n, d, rank, world, 2,
                        official=BarlowTwinsLoss(gather_distributed=True), scale=1.0)
        # VICReg: the official FullGatherLayer gives the exact gradients too
        check_pair_loss(f"vicreg {method}", lambda: sslkern.nn.VICRegLoss(method=method),
                        lambda a, b: sslkern.vicreg_loss(a, b), n, d, rank, world, 3,
                        official=lambda a, b: vicreg_forward(a, b, n, d), scale=1.0)
    # return_stats on ranks: the global batch's figures
    torch.manual_seed(4)
    za, zb = torch.randn(32, 40), torch.randn(32, 40)
    rows = slice(rank * 32 // world, (rank + 1) * 32 // world)
    _, st = sslkern.nn.BarlowTwinsLoss()(za[rows], zb[rows], return_stats=True)
    _, st1 = sslkern.cross_correlation_loss(za, zb, return_stats=True)
    for k in st1:
        close(f"barlow stats {k}", st[k], st1[k])
    _, st = sslkern.nn.VICRegLoss()(za[rows], zb[rows], return_stats=True)
    _, st1 = sslkern.vicreg_loss(za, zb, return_stats=True)
    for k in st1:
        close(f"vicreg stats {k}", st[k], st1[k])

    # SwAV: per-crop codes over the global batch (and the queues of every rank)
    b, k, dim, crops = 8, 12, 10, (2, 2)
    v = sum(crops)
    torch.manual_seed(5)
    x = torch.randn(v * world * b, dim)  # crop-major, global batch of world·b images
    w0 = torch.randn(k, dim)

    def run(xs, queue_len, steps=3, official=False):
        protos = sslkern.nn.SwAVPrototypes(dim, k)
        with torch.no_grad():
            protos.weight.copy_(w0)
        crit = sslkern.nn.SwAVLoss(v, dim, queue_length=queue_len)  # queue_len rows over all processes
        ranks = world if dist.is_initialized() and xs is not x else 1
        # swav main_swav.py: each process holds queue_length // world_size rows
        loop = SwAVLossLoop(crops, queue=torch.zeros(2, queue_len // ranks, dim) if queue_len else None,
                            world_size=ranks)
        out = []
        for s in range(steps):
            protos.normalize_()
            z = F.normalize(torch.sin(xs * (1 + s)), dim=1)
            if official:
                loss = loop.step(z, F.linear(z, protos.weight), protos.weight.detach(), z.shape[0] // v)
            else:
                loss = crit(z, protos, use_queue=queue_len > 0)
            (g,) = torch.autograd.grad(loss, protos.weight)
            out.append((loss.detach(), g))
        return out

    local = x.view(v, world, b, dim)[:, rank].reshape(v * b, dim)  # this rank's images, crop-major
    torch.distributed.barrier()
    got = run(local, 2 * b * world)  # 2·b queue rows on each rank: read from step 2 on
    offi = run(local, 2 * b * world, official=True)
    for s, ((lg, gg), (lo, go)) in enumerate(zip(got, offi)):  # the official codes are rounded to fp32
        close(f"swav step {s}: loss vs official", lg, lo, tol=1e-6)
        close(f"swav step {s}: prototype gradient vs official", gg, go, tol=1e-6)
    # one process on the global batch (queue of both ranks' rows): same mean loss and gradient
    lg = torch.stack([g[0] for g in got])
    gg = torch.stack([g[1] for g in got])
    dist.all_reduce(lg)
    dist.all_reduce(gg)
    if rank == 0:
        dist.destroy_process_group()  # the one-process run must not see the group
        one = run(x, 2 * b * world)
        for s in range(3):
            close(f"swav step {s}: loss vs one process", lg[s] / world, one[s][0])
            close(f"swav step {s}: gradient vs one process", gg[s] / world, one[s][1])
        print("redundancy_worker: all checks passed")
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
