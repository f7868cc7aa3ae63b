"""Which JPEG decoder the data layer's workers use: Pillow with ``draft`` against the others.

    python bench/decode_choice.py            # table on stdout (one thread, in-memory JPEG bytes)

Decodes the same JPEG bytes to an RGB uint8 array with each decoder, one thread, interleaved
rounds, medians: Pillow full decode, Pillow with ``Image.draft`` to at least ``min_side`` (what
``sslkern.data.decode.decode_image`` does; ``min_side`` = the default ``--decode-size`` of a 224
run, 448), ``torchvision.io.decode_jpeg`` (libjpeg-turbo, full size) and, if importable,
``torchcodec.decoders.decode_jpeg``. Two image sizes: ~400 × 350 (the throughput bench's images,
where ``draft`` cannot scale) and 2,000 × 1,500 (a camera photo, where it scales by 1/2 .. 1/8).
"""
from __future__ import annotations

import io
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from sslkern.data.decode import decode_image  # noqa: E402


def jpeg_bytes(w: int, h: int, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth gradients plus noise), quality 90."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / (37 + 5 * c) + y / (53 - 7 * c)) for c in range(3)], -1)
    img += g.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def providers():
    import torchvision.io as tvio

    out = {
        "pillow_full": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")),
        "pillow_draft (sslkern)": lambda b: decode_image(b, min_side=448),
        "torchvision.io.decode_jpeg": lambda b: tvio.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)),
    }
    try:
        from torchcodec.decoders import decode_jpeg

        out["torchcodec.decode_jpeg"] = lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    except Exception as e:  # not installed, or its native libraries do not load
        print(f"torchcodec: not measured ({type(e).__name__}: {e})", file=sys.stderr)
    return out


def main() -> None:
    torch.set_num_threads(1)
    rounds = 15
    provs = providers()
    print("| image | decoder | median ms | output shape | × pillow_draft |")
    print("|---|---|---:|---|---:|")
    for w, h in ((400, 350), (2000, 1500)):
        data = jpeg_bytes(w, h)
        times = {k: [] for k in provs}
        shapes = {}
        for k, f in provs.items():
            shapes[k] = tuple(f(data).shape)  # warm-up
        for _ in range(rounds):
            for k, f in provs.items():
                t0 = time.perf_counter()
                f(data)
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["pillow_draft (sslkern)"])
        for k in provs:
            m = statistics.median(times[k])
            print(f"| {w} × {h} ({len(data) // 1024} KiB) | {k} | {m * 1e3:.2f} | {shapes[k]} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
