"""Run by tests/test_fsdp.py under torchrun (2 gloo ranks): EMA and clipping on DTensors vs full tensors."""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sslkern  # noqa: E402
from sslkern.train import distributed as sdist  # noqa: E402
from sslkern.train.loop import _clip  # noqa: E402


def expect_error(fn, match):
    try:
        fn()
    except ValueError as e:
        assert match in str(e), str(e)
        return
    raise AssertionError(f"no error (expected {match!r})")


def ema_on_dtensors(mesh):
    # odd sizes: uneven shards (5 rows -> 3 + 2), an empty shard on rank 1 (1 row), bf16 students
    shapes = [(5, 3), (1, 4), (7,), (2, 3, 3), (9, 2)]
    g = torch.Generator().manual_seed(0)
    for backend in ("reference", "cpu"):
        for sdtype in (torch.float32, torch.bfloat16):
            t_full = [torch.randn(s, generator=g) for s in shapes]
            s_full = [torch.randn(s, generator=g).to(sdtype) for s in shapes]
            t_d = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in t_full]
            s_d = [distribute_tensor(s.clone(), mesh, [Shard(0)]) for s in s_full]
            ptrs = [t.to_local().data_ptr() for t in t_d]
            sslkern.ema_update_(t_d, s_d, 0.9, backend=backend)
            sslkern.ema_update_(t_full, s_full, 0.9, backend=backend)
            assert [t.to_local().data_ptr() for t in t_d] == ptrs  # in place on the local shards
            for td, tf in zip(t_d, t_full):
                assert torch.equal(td.full_tensor(), tf), (backend, sdtype)
    t = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
    expect_error(lambda: sslkern.ema_update_([t], [distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])], 0.5),
                 "sharded differently")
    expect_error(lambda: sslkern.ema_update_([t], [torch.randn(4, 3)], 0.5), "is a DTensor but students[0] is a plain tensor")


class Pair(nn.Module):
    def __init__(self, student):
        super().__init__()
        self.student = student
        self.teacher = sslkern.nn.EMATeacher(student)


def ema_teacher_on_fully_sharded_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)  # dim 18: uneven shards; pos_embed / cls_token have 1 row (rank 1 holds none)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=18, depth=2, num_heads=3, num_classes=0)
    vit.pos_embed.requires_grad_(False)  # copied, not averaged
    pair = Pair(vit)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p))
    plain = copy.deepcopy(pair)
    blocks = sdist.fully_shard_method(pair, [(pair.teacher, pair.student)])
    assert blocks == ["student.blocks.0", "student.blocks.1", "teacher.module.blocks.0", "teacher.module.blocks.1"], blocks
    for m in (0.9, torch.tensor(0.75)):
        pair.teacher.update(pair.student, m)
        plain.teacher.update(plain.student, m)
    full = sdist.full_state_dict(pair)
    if dist.get_rank() == 0:
        ref = plain.state_dict()
        assert full.keys() == ref.keys()
        for k in ref:
            assert torch.equal(full[k], ref[k]), k
        assert not torch.equal(full["teacher.module.blocks.0.attn.qkv.weight"], full["student.blocks.0.attn.qkv.weight"])
    # a teacher sharded unlike its student is a clear error naming the parameter
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=18, depth=1, num_heads=3, num_classes=0)
    teacher = sslkern.nn.EMATeacher(vit)
    from torch.distributed.fsdp import fully_shard

    fully_shard(vit)
    expect_error(lambda: teacher.update(vit, 0.9), "teacher 'cls_token' is a plain tensor but student 'cls_token' is a DTensor")


def clipping_on_dtensors(mesh):
    g = torch.Generator().manual_seed(1)
    for mode in ("global", "per-param"):
        shapes = [(5, 3), (1, 4), (7,), (3, 3)]
        full = [nn.Parameter(torch.zeros(s)) for s in shapes]
        for p, scale in zip(full, (3.0, 0.1, 2.0, 0.01)):
            p.grad = scale * torch.randn(p.shape, generator=g)
        shard = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in full]
        for p, q in zip(full, shard):
            q.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
        _clip(full, 1.0, mode)
        _clip(shard, 1.0, mode)
        for p, q in zip(full, shard):
            torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-6, atol=1e-7, msg=mode)
        norms = [float(p.grad.norm()) for p in full]
        assert (max(norms) <= 1 + 1e-5) if mode == "per-param" else abs(sum(n * n for n in norms) ** 0.5 - 1) < 1e-5


def global_batchnorm_uneven_rows():
    """GlobalBatchNorm1d with a different number of rows per rank (iBOT's patch head) equals
    BatchNorm1d on the concatenated rows: outputs, input gradients and running statistics."""
    from sslkern.nn.heads import GlobalBatchNorm1d
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [3 + 4 * r for r in range(world)]
    g = torch.Generator().manual_seed(5)
    full = torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64) * 2 + 1
    lo = sum(sizes[:rank])
    ref, gbn = nn.BatchNorm1d(6).double(), GlobalBatchNorm1d(6).double()
    x_full = full.clone().requires_grad_(True)
    ref(x_full).pow(2).sum().backward()
    x = full[lo:lo + sizes[rank]].clone().requires_grad_(True)
    y = gbn(x)
    y.pow(2).sum().backward()
    y_ref = nn.functional.batch_norm(full, None, None, training=True, eps=ref.eps)[lo:lo + sizes[rank]]
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_full.grad[lo:lo + sizes[rank]], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gbn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gbn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ema_on_dtensors(mesh)
    ema_teacher_on_fully_sharded_vit()
    clipping_on_dtensors(mesh)
    global_batchnorm_uneven_rows()
    dist.barrier()
    if dist.get_rank() == 0:
        print("FSDP-WORKER-OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
