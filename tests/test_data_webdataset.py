"""Webdataset tars read by the training pipeline: the same batches as TFRecords of the same
samples, metadata kept, corrupt members skipped and counted, exact resume, img2dataset's sizes."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clipjax.data import schema, webdataset
from clipjax.data.train_pipeline import TrainPipeline, gather_state

N, FILES = 24, 2


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path, samples, mode="w"):
    """samples: (key, {ext: bytes}) in member order."""
    with tarfile.open(path, mode) as tar:
        for key, members in samples:
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)


def _sample(i: int) -> tuple[str, dict]:
    meta = {"width": 10, "height": 12, "url": f"http://x/{i}.jpg", "status": "success"}
    return f"{i:06d}", {
        "jpg": _jpeg(i),
        "txt": f"photo {i}".encode(),
        "json": json.dumps(meta).encode(),
        "cls": str(i).encode(),
    }


@pytest.fixture(scope="module")
def same_samples(tmp_path_factory):
    """The same samples as TFRecord shards, plain and gzipped tars (file k holds i % 2 == k)."""
    d = tmp_path_factory.mktemp("wds")
    for k in range(FILES):
        ids = range(k, N, FILES)
        with tf.io.TFRecordWriter(str(d / f"shard-{k}.tfrecord")) as w:
            for i in ids:
                w.write(schema.make_example(_jpeg(i), f"photo {i}", f"{i:06d}", label=i))
        _write_tar(d / f"shard-{k}.tar", [_sample(i) for i in ids])
        _write_tar(d / f"shard-{k}.tar.gz", [_sample(i) for i in ids], mode="w:gz")
    return {kind: str(d / f"shard-*.{kind}") for kind in ("tfrecord", "tar", "tar.gz")}


def _pipe(shards, state=None, batch=4, **kw):
    kw = {"shuffle_buffer": 8, "seed": 5, "process_index": 0, "process_count": 1} | kw
    return TrainPipeline(
        shards, global_batch=batch, image_size=8, context_length=16, state=state, **kw
    )


def _take(pipe, n):
    it = iter(pipe)
    return [next(it) for _ in range(n)]


def test_tar_read_equals_the_same_records_from_tfrecords(same_samples):
    ref = _take(_pipe(same_samples["tfrecord"]), 8)  # two epochs of 6 batches, and more
    for kind in ("tar", "tar.gz"):
        got = _take(_pipe(same_samples[kind]), 8)
        for (b, s), (tb, ts) in zip(ref, got):
            assert ts == s and b.keys() == tb.keys() == {"image", "text", "label"}
            for key in b:
                np.testing.assert_array_equal(tb[key], b[key], err_msg=f"{kind}: {key}")
    # the metadata is kept in the records: key for provenance, sizes from the JSON member
    first = next(webdataset.tar_examples(same_samples["tar"].replace("*", "0")))
    f = tf.train.Example.FromString(first).features.feature
    assert f["key"].bytes_list.value == [b"000000"] and f["txt"].bytes_list.value == [b"photo 0"]
    assert f["width"].int64_list.value == [10] and f["height"].int64_list.value == [12]


def test_tar_resume_mid_epoch_is_exact(same_samples):
    run = _take(_pipe(same_samples["tar.gz"], read_windows=2), 9)
    state = gather_state(run[3][1])
    resumed = _take(_pipe(same_samples["tar.gz"], state=state, read_windows=2), 4)
    for (b, s), (rb, rs) in zip(run[4:8], resumed):
        assert rs == s
        for key in b:
            np.testing.assert_array_equal(rb[key], b[key])


def test_corrupt_members_are_skipped_and_counted(tmp_path):
    good = [_sample(i) for i in range(8)]
    bad = [
        ("corrupt", {"jpg": _jpeg(90)[:40], "txt": b"truncated image"}),
        ("notext", {"jpg": _jpeg(91)}),
        ("noimage", {"txt": b"caption only", "json": b"{}"}),
        ("badutf8", {"jpg": _jpeg(92), "txt": b"caf\xe9 \xff"}),
        ("badcls", {"jpg": _jpeg(93), "txt": b"ok", "cls": b"seven"}),
    ]
    labelled = [(k, m | {"cls": b"100"}) if "cls" not in m else (k, m) for k, m in bad]
    path = tmp_path / "mixed.tar"
    _write_tar(path, labelled + good)  # bad ones first: read before every good one
    pipe = _pipe(str(path), batch=1, shuffle_buffer=1)  # the tar's own order
    run = _take(pipe, 8)
    assert sorted(int(b["label"][0]) for b, _ in run) == list(range(8))
    assert run[-1][1]["skipped"] == len(bad) and run[-1][1]["offset"] == len(bad) + 8
    # a gzipped tar cut off mid-stream: its samples up to the break, then one record for the
    # break (no image: dropped and counted like a corrupt member)
    whole = tmp_path / "whole.tar.gz"
    _write_tar(whole, [_sample(i) for i in range(20, 28)], mode="w:gz")
    data = whole.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    records = [
        tf.train.Example.FromString(r).features.feature
        for r in webdataset.tar_examples(str(tmp_path / "cut.tar.gz"))
    ]
    assert 1 <= len(records) - 1 < 8
    assert all(r["jpg"].bytes_list.value[0] for r in records[:-1])
    assert records[-1]["jpg"].bytes_list.value == [b""]


def test_img2dataset_stats_give_the_sizes_without_reading(tmp_path, monkeypatch):
    _write_tar(tmp_path / "00000.tar", [_sample(i) for i in range(6)])
    _write_tar(tmp_path / "00001.tar", [_sample(i) for i in range(6, 9)])
    (tmp_path / "00000_stats.json").write_text(
        json.dumps({"count": 10, "successes": 6, "failed_to_download": 4})
    )
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    status = ["success", "failed_to_download", "success", "success", "failed_to_resize"]
    pq.write_table(pa.table({"key": list("abcde"), "status": status}), tmp_path / "00001.parquet")

    def no_scan(path):
        raise AssertionError(f"{path} was read to count its samples")

    monkeypatch.setattr(webdataset, "scan_count", no_scan)
    files = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert webdataset.sample_counts(files) == [6, 3]
    with pytest.raises(ValueError, match="gets 9 records per epoch .* fewer than its batch of 16"):
        _pipe(str(tmp_path / "*.tar"), batch=16)
    monkeypatch.undo()
    assert webdataset.sample_counts([str(tmp_path / "00001.tar")]) == [3]
    (tmp_path / "00001.parquet").unlink()
    assert webdataset.sample_counts([str(tmp_path / "00001.tar")], stats_only=True) == [None]
    assert webdataset.sample_counts([str(tmp_path / "00001.tar")]) == [3]  # by its headers


def test_bad_tar_inputs_are_clear_errors(tmp_path, same_samples):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="junk.tar: unreadable tar"):
        _pipe(str(junk))
    _write_tar(tmp_path / "nocap.tar", [("k", {"jpg": _jpeg(0)})])
    with pytest.raises(ValueError, match=r"nocap.tar: first sample 'k' has members \['jpg'\]"):
        _pipe(str(tmp_path / "nocap.tar"))
    with pytest.raises(ValueError, match="mix webdataset tars"):
        _pipe(f"{same_samples['tar']},{same_samples['tfrecord']}")


def test_process_exits_with_a_tar_reader_open(tmp_path):
    """A tar reader's iterator still open at exit is closed before the interpreter shuts down
    (destroyed during shutdown it cannot run its generator's Python any more)."""
    path = tmp_path / "big.tar.gz"  # more samples than the pipeline reads ahead
    _write_tar(path, [_sample(i) for i in range(200)], mode="w:gz")
    code = (
        "from clipjax.data.train_pipeline import TrainPipeline\n"
        f"pipe = TrainPipeline({str(path)!r}, global_batch=4, image_size=8, "
        "context_length=16, shuffle_buffer=8, process_index=0, process_count=1)\n"
        "it = iter(pipe)\n"
        "next(it)\n"
        "print('read')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "read" in out.stdout, out.stderr[-2000:]
    # without the close, TF reports the iterator finalized after the interpreter (and with two
    # such iterators open the process hangs there)
    assert "finalizing GeneratorDataset" not in out.stderr, out.stderr[-2000:]
