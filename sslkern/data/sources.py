"""Where images come from: random access to one split of a dataset, nothing read in full.

A :class:`Source` knows how many images it has, their labels, and how to decode image ``i``
(a uint8 ``(H, W, C)`` array at the image's own size and aspect ratio). Opening a source
reads metadata only — a directory listing or the shards' index files — so the time and
memory before the first step do not depend on the images' bytes.

Sources:
  * :class:`ImageFolderSource` — ``root/<class>/<image>`` (torchvision ``ImageFolder`` layout).
  * :class:`TarShardSource` — indexed tar shards (``<key>.jpg`` + ``<key>.cls`` members,
    readable by webdataset, DALI and ``tar tf``) with a ``.idx`` file each (byte offsets, see
    :mod:`sslkern.data.shard`); images are read with one ``pread`` each.
  * :class:`ArraySource` — small in-memory uint8 arrays (the bundled digits, CIFAR batches).
  * :class:`SubsetSource` — some indices of another source (a held-out split).

File names are kept in one byte buffer, not a list of Python strings: DataLoader workers are
forked, and touching a million string objects would copy their pages into every worker.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .decode import DecodeError, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
INDEX_FORMAT = "sslkern-tar-index"
INDEX_VERSION = 1


class DataError(ValueError):
    """A dataset that cannot be used: missing, empty, unknown layout, or files that disagree."""


class _Names:
    """Many strings in one byte buffer (fork-friendly: no per-string Python objects)."""

    def __init__(self, names: list[str]):
        encoded = [n.encode("utf-8", "surrogateescape") for n in names]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._blob[start:int(self._ends[i])].tobytes().decode("utf-8", "surrogateescape")


class Source:
    """One split of a dataset: ``len``, ``labels``, ``classes``, ``channels`` and ``load(i)``."""

    name: str = "source"
    classes: list[str]
    channels: int = 3
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def item_name(self, i: int) -> str:
        """What to call image ``i`` in a message (its file, or shard and key)."""
        return f"{self.name}[{i}]"

    def load(self, i: int, min_side: int | None = None) -> np.ndarray:
        """Image ``i`` as a uint8 ``(H, W, channels)`` array; :class:`DecodeError` if unreadable."""
        raise NotImplementedError

    @property
    def shard_sizes(self) -> list[int] | None:
        """Images per shard in index order (shards hold consecutive indices), if sharded."""
        return None

    def describe(self) -> str:
        return f"{self.name}: {len(self)} images, {len(self.classes)} classes"


# ---------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------
def _scan_sorted(directory: str) -> list[str]:
    """Image files under ``directory`` (recursively), sorted by relative path."""
    found = []
    stack = [directory]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=True):
                    stack.append(e.path)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(e.path)
    found.sort()
    return found


class ImageFolderSource(Source):
    """``root/<class>/<image>``: classes are the sorted sub-directories, files sorted within each.

    Raises :class:`DataError` naming the directory if ``root`` has no class folders, or a
    class folder holds no image (torchvision's ``ImageFolder`` refuses that too).
    """

    def __init__(self, root: str, *, channels: int = 3):
        if not os.path.isdir(root):
            raise DataError(f"data path {root!r} is not a directory")
        self.root, self.channels = root, channels
        self.name = f"imagefolder:{os.path.basename(os.path.normpath(root))}"
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"data path {root!r} holds no class folders: expected an ImageFolder tree "
                            f"root/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}")
        paths, labels = [], []
        for ci, c in enumerate(self.classes):
            files = _scan_sorted(os.path.join(root, c))
            if not files:
                raise DataError(f"class folder {os.path.join(root, c)!r} holds no images "
                                f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
            paths += [os.path.relpath(p, root) for p in files]
            labels += [ci] * len(files)
        self._paths = _Names(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self._paths[i])

    def item_name(self, i: int) -> str:
        return self.path(i)

    def load(self, i: int, min_side: int | None = None) -> np.ndarray:
        path = self.path(i)
        try:
            with open(path, "rb") as f:
                buf = f.read()
        except OSError as e:
            raise DecodeError(f"cannot read image {path}: {e.strerror or e}") from None
        return decode_image(buf, channels=self.channels, min_side=min_side, name=path)


# ---------------------------------------------------------------------------------------
# Indexed tar shards
# ---------------------------------------------------------------------------------------
def index_path(tar_path: str) -> str:
    """The index file of a shard: ``shard-000000.tar`` -> ``shard-000000.idx``."""
    return os.path.splitext(tar_path)[0] + ".idx"


def read_index(tar_path: str) -> dict:
    """A shard's index, checked against the shard (its size); :class:`DataError` otherwise."""
    ipath = index_path(tar_path)
    if not os.path.isfile(ipath):
        raise DataError(f"shard {tar_path} has no index {ipath}; write one with "
                        f"`python -m sslkern.data.shard --index {os.path.dirname(tar_path) or '.'}`")
    try:
        with open(ipath, encoding="utf-8") as f:
            idx = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"index {ipath} cannot be read: {e}") from None
    if not isinstance(idx, dict) or idx.get("format") != INDEX_FORMAT:
        raise DataError(f"index {ipath} is not an sslkern tar index (format {INDEX_FORMAT!r})")
    if idx.get("version") != INDEX_VERSION:
        raise DataError(f"index {ipath} has version {idx.get('version')}, this sslkern reads {INDEX_VERSION}")
    n = len(idx["keys"])
    if not all(len(idx[k]) == n for k in ("offsets", "sizes", "labels", "exts")):
        raise DataError(f"index {ipath} is inconsistent: its arrays have different lengths")
    size = os.path.getsize(tar_path)
    if size != idx["tar_size"]:
        raise DataError(f"index {ipath} does not match its shard {tar_path}: it describes {idx['tar_size']} bytes, "
                        f"the shard has {size} (truncated or rewritten; re-run the indexer)")
    return idx


def _member_name(header: bytes) -> str:
    """The path of a ustar / GNU tar header block (prefix + name)."""
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


class TarShardSource(Source):
    """Indexed tar shards; image ``i`` is one ``pread`` of its member (header included, to
    check that the index still matches the shard)."""

    def __init__(self, tar_paths: list[str], *, channels: int = 3, name: str | None = None):
        if not tar_paths:
            raise DataError("no tar shards given")
        self.channels = channels
        self.tars = sorted(tar_paths)
        self.name = name or f"shards:{os.path.basename(os.path.dirname(os.path.abspath(self.tars[0])))}"
        keys, exts, offsets, sizes, labels, shard_of, counts = [], [], [], [], [], [], []
        classes: list[str] | None = None
        for si, t in enumerate(self.tars):
            idx = read_index(t)
            keys += idx["keys"]
            exts += idx["exts"]
            offsets += idx["offsets"]
            sizes += idx["sizes"]
            labels += idx["labels"]
            shard_of += [si] * len(idx["keys"])
            counts.append(len(idx["keys"]))
            if idx.get("classes") and (classes is None or len(idx["classes"]) > len(classes)):
                classes = list(idx["classes"])
        if not keys:
            raise DataError(f"the shards {self.tars[0]} ... hold no images")
        self._keys = _Names([k + "." + e for k, e in zip(keys, exts)])
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._shard = np.asarray(shard_of, dtype=np.int32)
        self._counts = counts
        self.labels = np.asarray(labels, dtype=np.int64)
        if (self.labels < 0).any():
            raise DataError(f"shards {self.tars[0]} ...: some images have no .cls label")
        n_cls = int(self.labels.max()) + 1
        self.classes = classes if classes and len(classes) >= n_cls else [str(c) for c in range(n_cls)]
        self._fds: dict[int, int] = {}

    @property
    def shard_sizes(self) -> list[int]:
        return list(self._counts)

    def item_name(self, i: int) -> str:
        return f"{self.tars[self._shard[i]]}:{self._keys[i]}"

    def _fd(self, shard: int) -> int:
        # opened lazily per process (forked workers must not share file offsets; pread needs none)
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.tars[shard], os.O_RDONLY)
        return fd

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def read_bytes(self, i: int) -> bytes:
        shard, off, size = int(self._shard[i]), int(self._offsets[i]), int(self._sizes[i])
        try:
            blob = os.pread(self._fd(shard), size + 512, off - 512)
        except OSError as e:
            raise DecodeError(f"cannot read {self.item_name(i)}: {e.strerror or e}") from None
        if len(blob) != size + 512:
            raise DataError(f"shard {self.tars[shard]} is truncated: {self._keys[i]} ends past its end")
        if _member_name(blob[:512]) != self._keys[i]:
            raise DataError(f"index {index_path(self.tars[shard])} does not match its shard: at byte {off - 512} "
                            f"the shard holds {_member_name(blob[:512])!r}, the index says {self._keys[i]!r}")
        return blob[512:]

    def load(self, i: int, min_side: int | None = None) -> np.ndarray:
        return decode_image(self.read_bytes(i), channels=self.channels, min_side=min_side, name=self.item_name(i))

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------
# In memory
# ---------------------------------------------------------------------------------------
class ArraySource(Source):
    """Images already decoded: a uint8 array ``(N, H, W, C)`` and labels ``(N,)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], name: str):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"{name}: images expected a uint8 (N, H, W, 1|3) array, got {images.dtype} {images.shape}")
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes, self.name, self.channels = list(classes), name, images.shape[-1]

    def load(self, i: int, min_side: int | None = None) -> np.ndarray:
        return self.images[i]


class SubsetSource(Source):
    """The images ``indices`` of ``base`` (a held-out split of one tree)."""

    def __init__(self, base: Source, indices: np.ndarray, name: str):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.labels = base.labels[self.indices]
        self.classes, self.channels, self.name = base.classes, base.channels, name

    def item_name(self, i: int) -> str:
        return self.base.item_name(int(self.indices[i]))

    def load(self, i: int, min_side: int | None = None) -> np.ndarray:
        return self.base.load(int(self.indices[i]), min_side)


