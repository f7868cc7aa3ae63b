"""The streaming data layer: sources, shard writer / indexer, batch order, decode-only loader."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from sslkern.data import (BatchOrder, DataError, DecodeError, ImageFolderSource, TarShardSource, TrainLoader,
                          decode_image, open_dataset)
from sslkern.data import shard as shard_cli
from sslkern.data.sources import index_path, read_index


def _image(rng, h, w, mode="RGB"):
    """Flat 8x8 blocks of random colour: JPEG keeps them close, so decodes can be compared."""
    small = rng.integers(0, 256, size=(-(-h // 8), -(-w // 8), 3), dtype=np.uint8)
    arr = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
    return Image.fromarray(np.ascontiguousarray(arr)).convert(mode)


def make_folder(root, n_classes=3, per_class=5, seed=0, sizes=((37, 50), (50, 37), (64, 48))):
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            h, w = sizes[(c + i) % len(sizes)]
            _image(rng, h, w).save(os.path.join(root, f"class{c}", f"img{i:03d}.jpg"), quality=95)
    return root


# ---------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------
def test_batch_order_is_a_pure_function_of_seed_epoch_step():
    a, b = BatchOrder(103, 10, seed=3), BatchOrder(103, 10, seed=3)
    assert a.steps_per_epoch == 10
    for s in [25, 3, 17, 0, 99]:  # any order of access, no state
        assert torch.equal(a.global_batch(s), b.global_batch(s))
    epoch0 = torch.cat([a.global_batch(s) for s in range(10)])
    assert len(set(epoch0.tolist())) == 100  # drop-last: 100 distinct of 103
    assert not torch.equal(a.global_batch(0), a.global_batch(10))  # a new permutation per epoch
    assert not torch.equal(a.global_batch(0), BatchOrder(103, 10, seed=4).global_batch(0))


def test_rank_rows_partition_the_global_batch():
    o = BatchOrder(64, 8, seed=0)
    for s in range(12):
        parts = [o.rank_batch(s, r, 4) for r in range(4)]
        merged = torch.stack(parts, 1).flatten()  # row k of rank r is global row r + 4k
        assert torch.equal(merged, o.global_batch(s))
    with pytest.raises(ValueError, match="multiple of the world size"):
        o.rank_batch(0, 0, 3)


def test_shard_windows_visit_every_sample_once_and_stay_local():
    sizes = [7, 5, 9, 6, 8, 4]
    o = BatchOrder(sum(sizes), 6, seed=1, shard_sizes=sizes, window=2)
    starts = np.cumsum([0] + sizes)
    shard_of = np.searchsorted(starts, np.arange(sum(sizes)), side="right") - 1
    for epoch in range(3):
        perm = o.permutation(epoch)
        assert sorted(perm.tolist()) == list(range(sum(sizes)))
        # consecutive windows: the first window's samples come from exactly two shards
        first = perm[:sizes[shard_of[perm[0]]]]
        assert len(set(shard_of[first.numpy()])) <= 2
    assert not torch.equal(o.permutation(0), o.permutation(1))
    assert torch.equal(o.permutation(2), BatchOrder(sum(sizes), 6, seed=1, shard_sizes=sizes, window=2).permutation(2))
    with pytest.raises(ValueError, match="sharded"):
        BatchOrder(10, 2, 0, window=2)


# ---------------------------------------------------------------------------------------
# Sources and decoding
# ---------------------------------------------------------------------------------------
def test_image_folder_source_lists_without_reading(tmp_path):
    root = make_folder(str(tmp_path / "f"))
    src = ImageFolderSource(root)
    assert src.classes == ["class0", "class1", "class2"] and len(src) == 15
    assert src.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    im = src.load(1)
    assert im.dtype == np.uint8 and im.shape == (50, 37, 3)  # its own size, not squashed
    assert src.item_name(1).endswith(os.path.join("class0", "img001.jpg"))


def test_empty_class_and_empty_tree_are_named(tmp_path):
    root = make_folder(str(tmp_path / "f"), n_classes=2)
    os.makedirs(os.path.join(root, "zebra"))
    with pytest.raises(DataError, match="zebra.*holds no images"):
        ImageFolderSource(root)
    os.makedirs(tmp_path / "empty" / "x")
    with pytest.raises(DataError, match="holds no class folders"):
        ImageFolderSource(str(tmp_path / "empty" / "x"))


def test_decode_draft_grey_cmyk_exif_and_bad_bytes():
    rng = np.random.default_rng(0)
    big = _image(rng, 400, 640)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    full = decode_image(buf.getvalue())
    assert full.shape == (400, 640, 3)
    small = decode_image(buf.getvalue(), min_side=100)  # 1/2 -> 200x320, 1/4 -> 100x160 both >= 100
    assert small.shape == (100, 160, 3)
    assert decode_image(buf.getvalue(), min_side=150).shape == (200, 320, 3)
    grey = decode_image(buf.getvalue(), channels=1)
    assert grey.shape == (400, 640, 1)
    cmyk = io.BytesIO()
    big.convert("CMYK").save(cmyk, "JPEG")
    assert decode_image(cmyk.getvalue()).shape == (400, 640, 3)
    # EXIF orientation 6 (rotated 90° clockwise): decoded upright, sides swapped
    ex = Image.Exif()
    ex[0x0112] = 6
    rot = io.BytesIO()
    big.save(rot, "JPEG", exif=ex)
    assert decode_image(rot.getvalue()).shape == (640, 400, 3)
    with pytest.raises(DecodeError, match="cannot decode image broken.jpg"):
        decode_image(buf.getvalue()[:300], name="broken.jpg")
    with pytest.raises(DecodeError, match="notanimage"):
        decode_image(b"hello", name="notanimage")


# ---------------------------------------------------------------------------------------
# Shards: writer round trip, indexer, bad shards
# ---------------------------------------------------------------------------------------
def test_shard_writer_round_trip_is_deterministic_and_standard(tmp_path):
    root = make_folder(str(tmp_path / "f"), per_class=6)
    # one PNG, one progressive JPEG, one CMYK and one EXIF-rotated image: re-encoded
    rng = np.random.default_rng(1)
    _image(rng, 30, 40).save(os.path.join(root, "class1", "zz_png.png"))
    _image(rng, 30, 40).save(os.path.join(root, "class1", "zz_prog.jpg"), progressive=True)
    _image(rng, 30, 40).convert("CMYK").save(os.path.join(root, "class2", "zz_cmyk.jpg"))
    ex = Image.Exif()
    ex[0x0112] = 8
    _image(rng, 30, 40).save(os.path.join(root, "class2", "zz_rot.jpg"), exif=ex)
    counts1 = shard_cli.write_shards(root, str(tmp_path / "s1"), shard_size=40_000, workers=0)
    counts2 = shard_cli.write_shards(root, str(tmp_path / "s2"), shard_size=40_000, workers=2)
    assert counts1 == counts2 and counts1["reencoded"] == 4 and counts1["copied"] == 18 and counts1["shards"] > 1
    tars1 = sorted(p for p in os.listdir(tmp_path / "s1") if p.endswith(".tar"))
    for t in tars1:  # the output does not depend on the number of workers
        assert (tmp_path / "s1" / t).read_bytes() == (tmp_path / "s2" / t).read_bytes()
        assert os.path.getsize(tmp_path / "s1" / t) <= 40_000 or len(read_index(str(tmp_path / "s1" / t))["keys"]) == 1
        with tarfile.open(tmp_path / "s1" / t) as tf:  # a standard tar of <key>.jpg + <key>.cls
            names = tf.getnames()
            assert all(n.endswith((".jpg", ".cls")) for n in names) and len(names) % 2 == 0
    folder, shards = ImageFolderSource(root), TarShardSource([str(tmp_path / "s1" / t) for t in tars1])
    assert len(folder) == len(shards) == 22 and shards.classes == folder.classes
    assert shards.labels.tolist() == folder.labels.tolist()
    for i in range(len(folder)):  # byte copies decode identically; re-encoded ones are upright and close
        a, b = folder.load(i), shards.load(i)
        assert a.shape == b.shape, folder.item_name(i)
        if "zz_" not in folder.item_name(i):
            assert np.array_equal(a, b)
        else:
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 12
    keys = (tmp_path / "s1" / "keys.tsv").read_text().splitlines()
    assert len(keys) == 22 and keys[0].split("\t")[1] == os.path.join("class0", "img000.jpg")


def test_shard_writer_names_an_unreadable_image_and_keeps_complete_shards(tmp_path):
    root = make_folder(str(tmp_path / "f"), per_class=6)
    bad = os.path.join(root, "class2", "img003.jpg")
    with open(bad, "r+b") as f:
        f.truncate(200)
    with pytest.raises(DataError, match="img003.jpg"):
        shard_cli.write_shards(root, str(tmp_path / "s"), shard_size=20_000)
    left = sorted(os.listdir(tmp_path / "s"))
    assert left and not any(p.endswith(".tmp") for p in left)  # only complete shards and indexes
    for t in (p for p in left if p.endswith(".tar")):
        assert len(TarShardSource([str(tmp_path / "s" / t)])) > 0
    counts = shard_cli.write_shards(root, str(tmp_path / "s2"), shard_size=20_000, skip_bad=True, log=lambda m: None)
    assert counts["skipped"] == 1 and counts["images"] == 17


def test_index_existing_webdataset_tar_in_place(tmp_path):
    rng = np.random.default_rng(2)
    path = str(tmp_path / "wds-000.tar")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for k in range(5):
            for name, data in ((f"dir/sample{k}.jpg", None), (f"dir/sample{k}.cls", str(k % 2).encode()),
                               (f"dir/sample{k}.json", b"{}")):
                if data is None:
                    b = io.BytesIO()
                    _image(rng, 20 + k, 30).save(b, "JPEG")
                    data = b.getvalue()
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    assert shard_cli.main(["--index", str(tmp_path)]) == 0
    src = TarShardSource([path])
    assert len(src) == 5 and src.labels.tolist() == [0, 1, 0, 1, 0]
    assert src.load(3).shape == (23, 30, 3)


def test_truncated_shard_and_mismatched_index_are_named(tmp_path):
    root = make_folder(str(tmp_path / "f"))
    shard_cli.write_shards(root, str(tmp_path / "s"), shard_size=1 << 20)
    tar = str(tmp_path / "s" / "shard-000000.tar")
    idx = read_index(tar)
    with open(tar, "r+b") as f:  # truncated shard: the index no longer matches its size
        f.truncate(os.path.getsize(tar) - 4096)
    with pytest.raises(DataError, match="does not match its shard.*truncated"):
        TarShardSource([tar])
    shard_cli.write_shards(root, str(tmp_path / "t"), shard_size=1 << 20)
    tar = str(tmp_path / "t" / "shard-000000.tar")
    import json
    idx = read_index(tar)
    idx["offsets"][2], idx["offsets"][3] = idx["offsets"][3], idx["offsets"][2]
    with open(index_path(tar), "w") as f:
        json.dump(idx, f)
    src = TarShardSource([tar])
    with pytest.raises(DataError, match="does not match its shard"):
        src.load(2)
    os.remove(index_path(tar))
    with pytest.raises(DataError, match="has no index"):
        TarShardSource([tar])


# ---------------------------------------------------------------------------------------
# Datasets and the loader
# ---------------------------------------------------------------------------------------
def test_open_dataset_layouts(tmp_path):
    d = open_dataset(None)
    assert d.name == "digits" and (len(d.train), len(d.test)) == (1257, 540) and d.channels == 1
    assert d.train.load(0).shape == (8, 8, 1) and d.in_memory
    root = make_folder(str(tmp_path / "f"), per_class=10)
    f = open_dataset(root)
    assert (len(f.train), len(f.test)) == (21, 9) and not f.in_memory and f.channels == 3
    tv = tmp_path / "tv"
    make_folder(str(tv / "train"), per_class=4)
    make_folder(str(tv / "val"), per_class=2, seed=5)
    shard_cli.main([str(tv), str(tmp_path / "tvs"), "--shard-size", "64KiB", "--workers", "1"])
    s = open_dataset(str(tmp_path / "tvs"))
    assert (len(s.train), len(s.test)) == (12, 6) and s.name.startswith("shards:")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="is empty"):
        open_dataset(str(tmp_path / "empty"))


def _all(loader):
    return [(b.step, b.data.clone(), b.offsets.clone(), b.hw.clone(), b.labels.clone()) for b in loader]


def test_loader_is_the_same_for_any_workers_prefetch_and_start(tmp_path):
    root = make_folder(str(tmp_path / "f"), per_class=8)
    shard_cli.write_shards(root, str(tmp_path / "s"), shard_size=30_000)
    data = open_dataset(str(tmp_path / "s"))
    order = BatchOrder(len(data.train), 4, seed=0)
    ref = _all(TrainLoader(data.train, order, start=0, stop=9, workers=0))
    assert [r[0] for r in ref] == list(range(9))
    assert ref[0][3].tolist() != ref[1][3].tolist() or True  # ragged: sizes vary
    for workers, prefetch in ((1, 1), (2, 3)):
        got = _all(TrainLoader(data.train, order, start=0, stop=9, workers=workers, prefetch=prefetch))
        for a, b in zip(ref, got):
            assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    resumed = _all(TrainLoader(data.train, order, start=5, stop=9, workers=2))
    for a, b in zip(ref[5:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    # two ranks see the rows r::2 of the one-process batch
    for r in range(2):
        part = _all(TrainLoader(data.train, order, start=0, stop=3, rank=r, world_size=2, workers=1))
        for a, b in zip(ref, part):
            assert torch.equal(b[4], a[4][r::2])


def test_unreadable_image_mid_run_is_reported_and_replaced(tmp_path):
    root = make_folder(str(tmp_path / "f"), per_class=4)
    data = open_dataset(root)
    order = BatchOrder(len(data.train), 4, seed=0)
    first = order.global_batch(0).tolist()
    victim = data.train.item_name(first[1])
    with open(victim, "wb") as f:
        f.write(b"not a jpeg")
    for workers in (0, 2):
        b = next(iter(TrainLoader(data.train, order, start=0, stop=1, workers=workers)))
        assert len(b) == 4 and len(b.bad) == 1 and victim in b.bad[0]
        assert b.labels[1] == int(data.train.labels[order.replacement(0, 1, 1)])
    for i in range(len(data.train)):  # all unreadable: a clear error, not a worker traceback
        with open(data.train.item_name(i), "wb") as f:
            f.write(b"x")
    with pytest.raises(DataError, match="unreadable images in a row"):
        next(iter(TrainLoader(data.train, order, start=0, stop=1, workers=1)))
