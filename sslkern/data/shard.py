"""Indexed tar shards: write them from an ImageFolder tree, or index existing webdataset tars.

    python -m sslkern.data.shard SRC OUT                 # ImageFolder tree -> OUT/shard-000000.tar + .idx ...
    python -m sslkern.data.shard SRC OUT --max-side 512  # also shrink images whose longer side exceeds 512
    python -m sslkern.data.shard --index DIR [DIR ...]   # write a .idx beside every .tar (webdataset tars)

A shard is a standard tar of ``<key>.jpg`` + ``<key>.cls`` members (the image and its
class index as decimal text), readable by webdataset, DALI and ``tar tf``; beside it a JSON
``.idx`` gives every image's byte offset and size, so a loader reads any image with one
``pread`` (:class:`sslkern.data.sources.TarShardSource`). Shards close at ``--shard-size``
(default 1 GiB).

If SRC has ``train/`` and ``val/`` (or ``test/``) sub-trees, OUT gets ``train/`` and ``val/``
shard sets. Keys are the images' positions in sorted order (``000000042``); ``keys.tsv`` in
each output folder maps them back to the source files.

JPEGs are copied byte for byte unless they must change; an image is re-encoded (JPEG,
quality ``--quality``, baseline) when it is not a JPEG, is progressive, is CMYK or another
mode that is neither RGB nor grey, carries an EXIF rotation (the pixels are rotated upright
and the tag dropped), or its longer side exceeds ``--max-side``. Decoding the output gives
what :mod:`sslkern.data.decode` gives for the source.

The output does not depend on ``--workers``: images are prepared in parallel and written in
order. Every shard and index is written to a temporary name and renamed when complete, so an
error (an unreadable image is named and stops the run, unless ``--skip-bad``) leaves only
complete shards behind.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from multiprocessing import get_context

from .sources import INDEX_FORMAT, INDEX_VERSION, DataError, ImageFolderSource, index_path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
_EXIF_ORIENTATION = 0x0112


# ---------------------------------------------------------------------------------------
# One image: copy or re-encode
# ---------------------------------------------------------------------------------------
def prepare_image(path: str, max_side: int = 0, quality: int = 95) -> tuple[bytes, str]:
    """(JPEG bytes, why re-encoded or "") for one source file; raises DataError naming it."""
    from PIL import Image, ImageOps

    try:
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as im:
            reasons = []
            if im.format != "JPEG":
                reasons.append(f"format {im.format}")
            elif im.info.get("progressive") or im.info.get("progression"):
                reasons.append("progressive")
            if im.mode not in ("RGB", "L"):
                reasons.append(f"mode {im.mode}")
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                reasons.append("EXIF rotation")
            if max_side and max(im.size) > max_side:
                reasons.append(f"larger than {max_side}")
            if not reasons:
                im.verify()  # a truncated or corrupt JPEG must not be copied silently
                return raw, ""
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            if max_side and max(im.size) > max_side:
                scale = max_side / max(im.size)
                im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                               Image.BICUBIC, reducing_gap=3.0)
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=quality, progressive=False, optimize=False)
            return out.getvalue(), ", ".join(reasons)
    except Exception as e:  # Pillow raises many types for bad files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _prepare(job):
    i, path, max_side, quality = job
    try:
        data, why = prepare_image(path, max_side, quality)
        return i, data, why, None
    except DataError as e:  # reported by the writer, in order
        return i, None, "", str(e)


# ---------------------------------------------------------------------------------------
# Writing tars
# ---------------------------------------------------------------------------------------
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Appends (key, jpeg, label) records to ``prefix-NNNNNN.tar`` files of at most ``shard_size`` bytes."""

    def __init__(self, out_dir: str, classes: list[str], shard_size: int, prefix: str = "shard"):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.classes, self.shard_size, self.prefix = out_dir, classes, shard_size, prefix
        self.n_shards, self._tar, self._entries = 0, None, None
        self.written: list[str] = []

    def _open(self):
        self._path = os.path.join(self.out_dir, f"{self.prefix}-{self.n_shards:06d}.tar")
        self._tmp = self._path + ".tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._entries = {"keys": [], "exts": [], "offsets": [], "sizes": [], "labels": []}

    def add(self, key: str, data: bytes, label: int) -> None:
        cls = str(label).encode()
        need = 2 * 512 + -(-len(data) // 512) * 512 + 512  # two headers, the padded image, the label block
        end = self._tar.offset + need + 2 * 512 if self._tar is not None else 0  # + the end-of-archive blocks
        closed = -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE           # tar pads to whole records
        if self._tar is not None and self._entries["keys"] and closed > self.shard_size:
            self.close_shard()
        if self._tar is None:
            self._open()
        offset = self._tar.offset + 512  # one ustar header block precedes the data (short names)
        self._tar.addfile(_tarinfo(f"{key}.jpg", len(data)), io.BytesIO(data))
        self._tar.addfile(_tarinfo(f"{key}.cls", len(cls)), io.BytesIO(cls))
        e = self._entries
        e["keys"].append(key), e["exts"].append("jpg"), e["offsets"].append(offset)
        e["sizes"].append(len(data)), e["labels"].append(int(label))

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self._path)
        _atomic_json(index_path(self._path), {"format": INDEX_FORMAT, "version": INDEX_VERSION,
                                              "tar_size": os.path.getsize(self._path), "classes": self.classes,
                                              **self._entries})
        self.written.append(self._path)
        self.n_shards += 1
        self._tar = None

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.unlink(self._tmp)
            self._tar = None


def write_shards(src: str, out: str, *, shard_size: int = 1 << 30, max_side: int = 0, quality: int = 95,
                 workers: int = 0, skip_bad: bool = False, prefix: str = "shard", log=print) -> dict:
    """Convert the ImageFolder tree ``src`` into indexed shards in ``out``; returns counts."""
    source = ImageFolderSource(src)
    writer = ShardWriter(out, source.classes, shard_size, prefix)
    n = len(source)
    jobs = ((i, source.path(i), max_side, quality) for i in range(n))
    counts = {"images": 0, "copied": 0, "reencoded": 0, "skipped": 0}
    keys_tsv = open(os.path.join(out, "keys.tsv.tmp"), "w", encoding="utf-8")
    pool = get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_prepare, jobs, chunksize=16) if pool else map(_prepare, jobs)
        for i, data, why, err in results:
            if err is not None:
                if not skip_bad:
                    raise DataError(f"{err} (shards already complete in {out} are kept; --skip-bad skips such files)")
                log(f"skipped: {err}")
                counts["skipped"] += 1
                continue
            key = f"{i:09d}"
            writer.add(key, data, int(source.labels[i]))
            keys_tsv.write(f"{key}\t{os.path.relpath(source.path(i), src)}\n")
            counts["images"] += 1
            counts["reencoded" if why else "copied"] += 1
        writer.close_shard()
    except BaseException:
        writer.abort()
        keys_tsv.close()
        os.unlink(keys_tsv.name)
        raise
    finally:
        if pool:
            pool.terminate()
        keys_tsv.close()
    os.replace(os.path.join(out, "keys.tsv.tmp"), os.path.join(out, "keys.tsv"))
    counts["shards"] = writer.n_shards
    return counts


# ---------------------------------------------------------------------------------------
# Indexing existing tars (webdataset)
# ---------------------------------------------------------------------------------------
def index_tar(tar_path: str) -> dict:
    """Write ``<tar>.idx`` for a webdataset-style tar (members ``<key>.<ext>``; the image is the
    first member with an image extension, the label a ``.cls`` member); returns the index."""
    images, labels = {}, {}
    order = []
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(m.name), stem) if os.path.dirname(m.name) else stem
                if ext.lower() in IMAGE_EXTS and key not in images:
                    images[key] = (ext, m.offset_data, m.size)
                    order.append(key)
                elif ext == "cls":
                    raw = tar.extractfile(m).read().strip()
                    try:
                        labels[key] = int(raw)
                    except ValueError:
                        raise DataError(f"{tar_path}: {m.name} expected a decimal class index, got {raw[:40]!r}") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot index {tar_path}: {type(e).__name__}: {e} (truncated or not a tar?)") from None
    if not order:
        raise DataError(f"{tar_path} holds no images (members <key>.jpg, .png, ...)")
    idx = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "tar_size": os.path.getsize(tar_path), "classes": [],
           "keys": order, "exts": [images[k][0] for k in order], "offsets": [images[k][1] for k in order],
           "sizes": [images[k][2] for k in order], "labels": [labels.get(k, -1) for k in order]}
    _atomic_json(index_path(tar_path), idx)
    return idx


def _tars_in(paths: list[str]) -> list[str]:
    tars = []
    for p in paths:
        if os.path.isdir(p):
            tars += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".tar"))
        elif p.endswith(".tar") and os.path.isfile(p):
            tars.append(p)
        else:
            raise DataError(f"{p!r} is neither a directory nor a .tar file")
    if not tars:
        raise DataError(f"no .tar files in {', '.join(paths)}")
    return tars


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sslkern.data.shard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="+", help="ImageFolder tree and output folder; with --index: folders or .tar files")
    p.add_argument("--index", action="store_true", help="index existing tars in place instead of writing shards")
    p.add_argument("--shard-size", default="1GiB", help="bytes per shard (e.g. 512MiB, 1GiB; default 1GiB)")
    p.add_argument("--max-side", type=int, default=0, help="re-encode images whose longer side exceeds this (0 = keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes preparing images")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    a = p.parse_args(argv)
    try:
        if a.index:
            for t in _tars_in(a.src):
                idx = index_tar(t)
                print(f"{index_path(t)}: {len(idx['keys'])} images")
            return 0
        if len(a.src) != 2:
            p.error("expected SRC OUT (or --index DIR ...)")
        src, out = a.src
        size = _size(a.shard_size)
        if size < 1 << 16:
            p.error(f"--shard-size expected at least 64KiB, got {a.shard_size}")
        split = [d for d in ("train", "val", "test") if os.path.isdir(os.path.join(src, d))]
        pairs = [(os.path.join(src, d), os.path.join(out, d)) for d in split] if "train" in split else [(src, out)]
        for s, o in pairs:
            c = write_shards(s, o, shard_size=size, max_side=a.max_side, quality=a.quality, workers=a.workers,
                             skip_bad=a.skip_bad)
            print(f"{o}: {c['images']} images in {c['shards']} shards ({c['copied']} copied, "
                  f"{c['reencoded']} re-encoded, {c['skipped']} skipped)")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
