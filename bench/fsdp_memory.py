"""Per-rank memory of a ViT-B student + EMA teacher under DDP and under ``--fsdp`` (2 CPU ranks).

    python bench/fsdp_memory.py          # launches 2 gloo ranks per mode, ~1 min; prints a markdown table

Not training: one forward/backward at batch 1 (224x224, so every gradient and AdamW state
exists), one AdamW step, one EMA update, then the bytes of this rank's tensors are counted:
parameters (student, teacher), gradients and AdamW state (exp_avg, exp_avg_sq), plus the
process's resident set (VmRSS) and its peak (VmHWM). FSDP builds the model on the meta
device, shards it (``sslkern.train.distributed.fully_shard_method``: one unit per block + the
root) and only then allocates, as a ViT-g run has to.
"""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss():
    """(resident bytes after returning freed heap to the OS, peak resident bytes)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/status") as f:
        kv = dict(line.split(":", 1) for line in f if ":" in line)
    return int(kv["VmRSS"].split()[0]) * 1024, int(kv["VmHWM"].split()[0]) * 1024


def worker(mode: str) -> None:
    import torch
    import torch.distributed as dist
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

    import sslkern
    from sslkern.train import distributed as sdist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                             num_classes=0)  # ViT-B/16, 85.8 M parameters
            self.teacher = sslkern.nn.EMATeacher(self.student)

        def forward(self, x):
            with torch.no_grad():
                t = self.teacher(x)
            return (self.student(x) - t).pow(2).mean()

    torch.manual_seed(0)
    if mode == "fsdp":
        with torch.device("meta"):
            pair = Pair()
        sdist.fully_shard_method(pair, [(pair.teacher, pair.student)])
        pair.to_empty(device="cpu")
        with torch.no_grad():
            for p in pair.parameters():
                sdist.local(p).normal_(0, 0.02)
        model = pair
    else:
        pair = Pair()
        model = nn.parallel.DistributedDataParallel(pair, broadcast_buffers=False)
    opt = torch.optim.AdamW([p for p in pair.student.parameters()], lr=1e-4)
    stages = {"built": _rss()[0]}
    loss = model(torch.randn(1, 3, 224, 224))
    stages["forward"] = _rss()[0]
    loss.backward()
    stages["backward"] = _rss()[0]
    opt.step()
    pair.teacher.update(pair.student, 0.996)
    stages["step"] = _rss()[0]

    def nbytes(ts):
        return sum(sdist.local(t).numel() * sdist.local(t).element_size() for t in ts)

    row = {"student": nbytes(pair.student.parameters()), "teacher": nbytes(pair.teacher.parameters()),
           "grads": nbytes(p.grad for p in pair.student.parameters() if p.grad is not None),
           "adamw": nbytes(v for s in opt.state.values() for v in s.values() if v.dim() > 0)}
    row["rss"], row["peak_rss"] = _rss()
    row["stages"] = stages
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print("ROWS " + json.dumps(rows))
    dist.destroy_process_group()


def launch(mode: str, world: int = 2) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", mode], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(err[-3000:])
    return json.loads(next(line for line in outs[0][0].splitlines() if line.startswith("ROWS "))[5:])


def main() -> None:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    print("| mode | rank | student params | teacher params | gradients | AdamW state | params + grads + AdamW "
          "| RSS built / forward / backward / step | peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in ("ddp", "fsdp"):
        for rank, r in enumerate(launch(mode)):
            total = r["student"] + r["teacher"] + r["grads"] + r["adamw"]
            print(f"| {mode} | {rank} | {mib(r['student'])} | {mib(r['teacher'])} | {mib(r['grads'])} | "
                  f"{mib(r['adamw'])} | {mib(total)} | {' / '.join(mib(v) for v in r['stages'].values())} | "
                  f"{mib(r['peak_rss'])} |")
    print("(MiB per rank; ViT-B/16 224, fp32, 2 gloo CPU ranks; RSS after malloc_trim)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
