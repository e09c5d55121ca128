"""Shard writer: schema round trip, manifest, skipping bad items, resume, settings guard,
seeded shuffle (global permutation, bounded buffer, resumable, order guard)."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clipjax.data import order, schema, writer
from clipjax.data.writer import SourceItem


def _jpeg(color, size=(24, 16), fmt="JPEG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def _items(n, bad=()):
    """n items; indices in `bad` are corrupt ('c'), unreadable ('u'), empty caption ('e'),
    non-UTF-8 caption ('b') according to bad[i]."""
    bad = dict(bad)
    for i in range(n):
        kind = bad.get(i)
        data = _jpeg((i * 9 % 256, 10, 20))
        read = lambda d=data: d
        caption: str | bytes = f"caption {i}"
        if kind == "c":
            read = lambda d=data: d[: len(d) // 2]
        elif kind == "u":

            def read():
                raise OSError("permission denied")
        elif kind == "e":
            caption = "   "
        elif kind == "b":
            caption = b"\xff\xfe caption"
        yield SourceItem(
            key=f"k{i}", origin=f"item{i}.jpg", caption=caption, read=read, label=i % 3
        )


def _records(path):
    return [
        tf.train.Example.FromString(r) for r in tf.data.TFRecordDataset(path).as_numpy_iterator()
    ]


def test_example_round_trip_matches_img2dataset_feature_names():
    ex = tf.train.Example.FromString(schema.make_example(b"img", "héllo", "000", label=4))
    f = ex.features.feature
    assert f["jpg"].bytes_list.value == [b"img"]
    assert f["txt"].bytes_list.value[0].decode() == "héllo"
    assert f["key"].bytes_list.value == [b"000"]
    assert f["label"].int64_list.value == [4]


def test_write_shards_manifest_and_skips(tmp_path):
    out = str(tmp_path / "out")
    bad = {1: "c", 4: "u", 6: "e", 9: "b"}
    m = writer.write_shards(
        _items(11, bad),
        out,
        source={"kind": "test"},
        shard_size=4,
        progress=False,
        classnames=["a", "b", "c"],
        shuffle_seed=None,
    )
    assert [s["file"] for s in m["shards"]] == [f"shard-0000{i}.tfrecord" for i in range(3)]
    assert [s["count"] for s in m["shards"]] == [3, 2, 2]
    assert m["num_examples"] == 7 and m["num_skipped"] == 4 and m["complete"]
    reasons = {s["origin"]: s["reason"] for sh in m["shards"] for s in sh["skipped"]}
    assert set(reasons) == {"item1.jpg", "item4.jpg", "item6.jpg", "item9.jpg"}
    assert reasons["item1.jpg"].startswith("corrupt image")
    assert "unreadable" in reasons["item4.jpg"] and "permission denied" in reasons["item4.jpg"]
    assert reasons["item6.jpg"] == "empty caption"
    assert "UTF-8" in reasons["item9.jpg"]
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk == m and m["order"] == {"shuffled": False}
    assert sorted(os.listdir(out)) == ["manifest.json"] + [s["file"] for s in m["shards"]]
    recs = _records(os.path.join(out, "shard-00000.tfrecord"))
    keys = [r.features.feature["key"].bytes_list.value[0] for r in recs]
    assert keys == [b"k0", b"k2", b"k3"]
    assert recs[1].features.feature["label"].int64_list.value == [2]


def test_rerun_skips_complete_shards_and_rewrites_missing(tmp_path):
    out = str(tmp_path)
    writer.write_shards(
        _items(10), out, source={"kind": "t"}, shard_size=4, progress=False, shuffle_seed=None
    )
    os.remove(os.path.join(out, "shard-00001.tfrecord"))
    reads = []

    def tracked():
        for it in _items(10):
            yield SourceItem(
                it.key,
                it.origin,
                it.caption,
                (lambda it=it: reads.append(it.key) or it.read()),
                it.label,
            )

    m = writer.write_shards(
        tracked(), out, source={"kind": "t"}, shard_size=4, progress=False, shuffle_seed=None
    )
    assert reads == ["k4", "k5", "k6", "k7"]  # only the missing shard was read again
    assert [s["count"] for s in m["shards"]] == [4, 4, 2]
    with pytest.raises(ValueError, match="different settings.*shard_size"):
        writer.write_shards(
            _items(10), out, source={"kind": "t"}, shard_size=5, progress=False, shuffle_seed=None
        )


def test_interrupted_run_leaves_no_partial_shard(tmp_path):
    def failing():
        yield from _items(5)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        writer.write_shards(
            failing(),
            str(tmp_path),
            source={"kind": "t"},
            shard_size=4,
            progress=False,
            shuffle_seed=None,
        )
    files = sorted(os.listdir(tmp_path))
    assert files == ["manifest.json", "shard-00000.tfrecord"]
    m = json.load(open(tmp_path / "manifest.json"))
    assert not m["complete"] and [s["index"] for s in m["shards"]] == [0]


def test_encode_image_keeps_or_converts_and_resizes():
    jpeg = _jpeg((1, 2, 3), size=(40, 20))
    assert writer.encode_image(jpeg) == jpeg  # small RGB JPEG kept byte-for-byte
    small = writer.encode_image(jpeg, max_side=10)
    assert Image.open(io.BytesIO(small)).size == (10, 5)
    rgba = _jpeg((255, 0, 0, 0), fmt="PNG", mode="RGBA")  # fully transparent -> white
    out = Image.open(io.BytesIO(writer.encode_image(rgba)))
    assert out.format == "JPEG" and out.mode == "RGB"
    assert np.asarray(out).min() > 240
    with pytest.raises(writer.ImageError):
        writer.encode_image(b"not an image")


def test_parallel_workers_write_identical_shards(tmp_path):
    items = list(_items(6, {2: "c"}))
    m1 = writer.write_shards(
        items, str(tmp_path / "a"), source={"kind": "t"}, shard_size=3, max_side=8, progress=False
    )
    m2 = writer.write_shards(
        items,
        str(tmp_path / "b"),
        source={"kind": "t"},
        shard_size=3,
        max_side=8,
        workers=2,
        progress=False,
    )
    assert [s["count"] for s in m1["shards"]] == [s["count"] for s in m2["shards"]] == [2, 3]
    for s in m1["shards"]:
        a = (tmp_path / "a" / s["file"]).read_bytes()
        assert a == (tmp_path / "b" / s["file"]).read_bytes()


def _class_sorted(n_classes=4, per_class=15, reads=None, fail_key=None):
    """Items sorted by class, like a class-folder source; `reads` collects the keys read and
    reading `fail_key` raises (an interrupted run)."""
    for c in range(n_classes):
        for i in range(per_class):
            key = f"c{c}/{i:02d}"
            data = _jpeg((40 * c, 3 * i, 7))

            def read(key=key, data=data):
                if key == fail_key:
                    raise KeyboardInterrupt("killed")
                if reads is not None:
                    reads.append(key)
                return data

            yield SourceItem(key=key, origin=f"{key}.jpg", caption=f"class {c}", read=read, label=c)


def _written(out):
    m = json.load(open(os.path.join(out, "manifest.json")))
    recs = [r for s in m["shards"] for r in _records(os.path.join(out, s["file"]))]
    keys = [r.features.feature["key"].bytes_list.value[0].decode() for r in recs]
    labels = [r.features.feature["label"].int64_list.value[0] for r in recs]
    return m, keys, labels


def _shard_bytes(out):
    return {
        n: open(os.path.join(out, n), "rb").read()
        for n in sorted(os.listdir(out))
        if n.endswith(".tfrecord")
    }


def test_default_order_is_a_seeded_global_permutation(tmp_path):
    source_keys = [it.key for it in _class_sorted()]
    m = writer.write_shards(
        _class_sorted(), str(tmp_path / "a"), source={"kind": "t"}, shard_size=8, progress=False
    )
    _, keys, labels = _written(str(tmp_path / "a"))
    assert labels != sorted(labels)  # not class-sorted any more
    assert sorted(keys) == sorted(source_keys) and len(keys) == 60  # each record exactly once
    assert keys == [source_keys[i] for i in np.random.default_rng(0).permutation(60)]
    assert len({lab for lab in labels[:8]}) > 1  # the first shard mixes classes
    assert m["order"]["shuffled"] and m["order"]["seed"] == 0
    assert m["order"]["method"] == "permutation" and m["order"]["items"] == 60

    writer.write_shards(
        _class_sorted(),
        str(tmp_path / "b"),
        source={"kind": "t"},
        shard_size=8,
        progress=False,
        shuffle_seed=0,
    )
    assert _shard_bytes(str(tmp_path / "a")) == _shard_bytes(str(tmp_path / "b"))
    m3 = writer.write_shards(
        _class_sorted(),
        str(tmp_path / "c"),
        source={"kind": "t"},
        shard_size=8,
        progress=False,
        shuffle_seed=3,
    )
    _, keys3, _ = _written(str(tmp_path / "c"))
    assert m3["order"]["seed"] == 3 and keys3 != keys and sorted(keys3) == sorted(keys)
    m4 = writer.write_shards(
        _class_sorted(),
        str(tmp_path / "d"),
        source={"kind": "t"},
        shard_size=8,
        progress=False,
        shuffle_seed=None,
    )
    _, keys4, _ = _written(str(tmp_path / "d"))
    assert keys4 == source_keys and m4["order"] == {"shuffled": False}
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        writer.write_shards(
            _class_sorted(),
            str(tmp_path / "e"),
            source={"kind": "t"},
            progress=False,
            shuffle_seed=-1,
        )


def test_killed_shuffled_run_resumes_to_the_uninterrupted_output(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    writer.write_shards(
        _class_sorted(), full, source={"kind": "t"}, shard_size=8, progress=False, shuffle_seed=5
    )
    _, keys, _ = _written(full)
    with pytest.raises(KeyboardInterrupt):  # killed while writing the third shard
        writer.write_shards(
            _class_sorted(fail_key=keys[19]),
            part,
            source={"kind": "t"},
            shard_size=8,
            progress=False,
            shuffle_seed=5,
        )
    assert sorted(os.listdir(part)) == [
        "manifest.json",
        "shard-00000.tfrecord",
        "shard-00001.tfrecord",
    ]
    reads = []
    m = writer.write_shards(
        _class_sorted(reads=reads),
        part,
        source={"kind": "t"},
        shard_size=8,
        progress=False,
        shuffle_seed=5,
    )
    assert reads == keys[16:]  # the complete shards were not read again
    assert _shard_bytes(part) == _shard_bytes(full)
    assert m == json.load(open(os.path.join(full, "manifest.json")))

    os.remove(os.path.join(part, "shard-00003.tfrecord"))  # a lost shard is rewritten the same
    reads.clear()
    writer.write_shards(
        _class_sorted(reads=reads),
        part,
        source={"kind": "t"},
        shard_size=8,
        progress=False,
        shuffle_seed=5,
    )
    assert reads == keys[24:32] and _shard_bytes(part) == _shard_bytes(full)


def test_other_order_over_existing_output_is_refused(tmp_path):
    out = str(tmp_path)
    keys = [it.key for it in order.permuted(_class_sorted(), 0)]
    with pytest.raises(KeyboardInterrupt):  # a partial output written with seed 0
        writer.write_shards(
            _class_sorted(fail_key=keys[9]), out, source={"kind": "t"}, shard_size=8, progress=False
        )
    with pytest.raises(
        ValueError,
        match=r"shuffled with seed 0, this run would write them "
        r"shuffled with seed 1.*--seed 0 to resume",
    ):
        writer.write_shards(
            _class_sorted(), out, source={"kind": "t"}, shard_size=8, progress=False, shuffle_seed=1
        )
    with pytest.raises(ValueError, match="seed 0, this run would write them in source order"):
        writer.write_shards(
            _class_sorted(),
            out,
            source={"kind": "t"},
            shard_size=8,
            progress=False,
            shuffle_seed=None,
        )
    with pytest.raises(ValueError, match="60 items.*source now lists 64"):
        writer.write_shards(
            _class_sorted(per_class=16), out, source={"kind": "t"}, shard_size=8, progress=False
        )
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.tfrecord"]  # untouched
    m = writer.write_shards(
        _class_sorted(), out, source={"kind": "t"}, shard_size=8, progress=False
    )
    assert m["complete"] and m["num_examples"] == 60


def test_manifest_from_before_shuffling_resumes_in_source_order(tmp_path):
    out = str(tmp_path)
    writer.write_shards(
        _items(10), out, source={"kind": "t"}, shard_size=4, progress=False, shuffle_seed=None
    )
    path = os.path.join(out, "manifest.json")
    old = json.load(open(path))
    del old["order"]
    json.dump(old, open(path, "w"))
    with pytest.raises(ValueError, match="in source order.*--keep-order to resume"):
        writer.write_shards(_items(10), out, source={"kind": "t"}, shard_size=4, progress=False)
    m = writer.write_shards(
        _items(10), out, source={"kind": "t"}, shard_size=4, progress=False, shuffle_seed=None
    )
    assert m["order"] == {"shuffled": False} and m["num_examples"] == 10


class _StreamedSource:
    """Like a tfds source: items carry their bytes, so the writer must not list them all."""

    in_memory = True

    def __init__(self, n):
        self.n, self.pulled = n, 0

    def __iter__(self):
        for it in _class_sorted(n_classes=4, per_class=self.n // 4):
            self.pulled += 1
            yield it


def test_in_memory_source_gets_a_bounded_seeded_buffer_shuffle(tmp_path):
    src = _StreamedSource(40)
    stream = order.buffer_shuffled(src, seed=0, buffer_size=10)
    first = next(stream)
    assert src.pulled == 11  # holds at most the buffer before yielding
    rest = list(stream)
    keys = [it.key for it in [first] + rest]
    assert sorted(keys) == sorted(it.key for it in _class_sorted(4, 10))
    assert keys != sorted(keys)
    assert keys == [it.key for it in order.buffer_shuffled(_StreamedSource(40), 0, 10)]

    m = writer.write_shards(
        _StreamedSource(40),
        str(tmp_path / "a"),
        source={"kind": "t"},
        shard_size=8,
        progress=False,
        shuffle_buffer=10,
    )
    assert m["order"] == {
        "shuffled": True,
        "seed": 0,
        "method": "buffer",
        "buffer": 10,
        "files_shuffled": False,
    }
    assert _written(str(tmp_path / "a"))[1] == keys
    with pytest.raises(ValueError, match="by a 10-item buffer.*--shuffle-buffer 10"):
        writer.write_shards(
            _StreamedSource(40),
            str(tmp_path / "a"),
            source={"kind": "t"},
            shard_size=8,
            progress=False,
            shuffle_buffer=20,
        )
