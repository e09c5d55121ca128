"""Shard writer: schema round trip, manifest, skipping bad items, resume, settings guard."""
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clipjax.data import schema, writer
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
        read = (lambda d=data: d)
        caption: str | bytes = f"caption {i}"
        if kind == "c":
            read = (lambda d=data: d[: len(d) // 2])
        elif kind == "u":
            def read():
                raise OSError("permission denied")
        elif kind == "e":
            caption = "   "
        elif kind == "b":
            caption = b"\xff\xfe caption"
        yield SourceItem(key=f"k{i}", origin=f"item{i}.jpg", caption=caption, read=read,
                         label=i % 3)


def _records(path):
    return [tf.train.Example.FromString(r) for r in
            tf.data.TFRecordDataset(path).as_numpy_iterator()]


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
    m = writer.write_shards(_items(11, bad), out, source={"kind": "test"}, shard_size=4,
                            progress=False, classnames=["a", "b", "c"])
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
    assert on_disk == m
    assert sorted(os.listdir(out)) == ["manifest.json"] + [s["file"] for s in m["shards"]]
    recs = _records(os.path.join(out, "shard-00000.tfrecord"))
    keys = [r.features.feature["key"].bytes_list.value[0] for r in recs]
    assert keys == [b"k0", b"k2", b"k3"]
    assert recs[1].features.feature["label"].int64_list.value == [2]


def test_rerun_skips_complete_shards_and_rewrites_missing(tmp_path):
    out = str(tmp_path)
    writer.write_shards(_items(10), out, source={"kind": "t"}, shard_size=4, progress=False)
    os.remove(os.path.join(out, "shard-00001.tfrecord"))
    reads = []

    def tracked():
        for it in _items(10):
            yield SourceItem(it.key, it.origin, it.caption,
                             (lambda it=it: reads.append(it.key) or it.read()), it.label)

    m = writer.write_shards(tracked(), out, source={"kind": "t"}, shard_size=4, progress=False)
    assert reads == ["k4", "k5", "k6", "k7"]  # only the missing shard was read again
    assert [s["count"] for s in m["shards"]] == [4, 4, 2]
    with pytest.raises(ValueError, match="different settings.*shard_size"):
        writer.write_shards(_items(10), out, source={"kind": "t"}, shard_size=5, progress=False)


def test_interrupted_run_leaves_no_partial_shard(tmp_path):
    def failing():
        yield from _items(5)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        writer.write_shards(failing(), str(tmp_path), source={"kind": "t"}, shard_size=4,
                            progress=False)
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
    m1 = writer.write_shards(items, str(tmp_path / "a"), source={"kind": "t"}, shard_size=3,
                             max_side=8, progress=False)
    m2 = writer.write_shards(items, str(tmp_path / "b"), source={"kind": "t"}, shard_size=3,
                             max_side=8, workers=2, progress=False)
    assert [s["count"] for s in m1["shards"]] == [s["count"] for s in m2["shards"]] == [2, 3]
    for s in m1["shards"]:
        a = (tmp_path / "a" / s["file"]).read_bytes()
        assert a == (tmp_path / "b" / s["file"]).read_bytes()
