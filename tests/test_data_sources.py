"""Sources (captions file, class folders, webdataset tars, tfds) through the make_shards CLI."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from clipjax.data import make_shards, sources


def _save(path, color, fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path, format=fmt)


def _read_shards(out):
    m = json.load(open(os.path.join(out, "manifest.json")))
    recs = []
    for s in m["shards"]:
        for r in tf.data.TFRecordDataset(os.path.join(out, s["file"])).as_numpy_iterator():
            f = tf.train.Example.FromString(r).features.feature
            recs.append({"key": f["key"].bytes_list.value[0].decode(),
                         "txt": f["txt"].bytes_list.value[0].decode(),
                         "label": list(f["label"].int64_list.value) if "label" in f else None,
                         "jpg": f["jpg"].bytes_list.value[0]})
    return m, recs


def test_captions_jsonl_and_csv(tmp_path, capsys):
    img = tmp_path / "img"
    _save(str(img / "a.jpg"), (255, 0, 0))
    _save(str(img / "sub" / "b.png"), (0, 255, 0), fmt="PNG")
    (img / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    rows = [{"image": "a.jpg", "caption": "red"}, {"image": "sub/b.png", "caption": "green"},
            {"image": "a.jpg", "caption": "a second caption"},
            {"image": "missing.jpg", "caption": "x"}, {"image": "broken.jpg", "caption": "y"}]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = str(tmp_path / "out")
    rc = make_shards.main(["--out", out, "--captions", str(caps), "--images", str(img),
                           "--shard-size", "2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "missing.jpg" in printed and "broken.jpg" in printed and "skipped 2" in printed
    m, recs = _read_shards(out)
    assert [(r["key"], r["txt"]) for r in recs] == [
        ("a.jpg", "red"), ("sub/b.png", "green"), ("a.jpg", "a second caption")]
    assert m["num_skipped"] == 2 and m["source"]["kind"] == "captions"

    csv = tmp_path / "caps.csv"
    csv.write_text('image,caption\na.jpg,"red, with a comma"\n')
    out2 = str(tmp_path / "out2")
    assert make_shards.main(["--out", out2, "--captions", str(csv), "--images", str(img),
                             "--no-progress"]) == 0
    assert [r["txt"] for r in _read_shards(out2)[1]] == ["red, with a comma"]


def test_bad_captions_file_is_a_clear_error(tmp_path, capsys):
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"image": "a.jpg", "caption": "ok"}\n{"img": "b.jpg"}\n')
    rc = make_shards.main(["--out", str(tmp_path / "o"), "--captions", str(caps), "--images",
                           str(tmp_path), "--no-progress"])
    assert rc == 2
    assert "caps.jsonl:2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs --images"):
        make_shards.make_source(make_shards.build_parser().parse_args(
            ["--out", "o", "--captions", str(caps)]))
    with pytest.raises(SystemExit):
        make_shards.main(["--out", "o", "--class-folders", "x", "--shard-size", "0"])


def test_class_folders(tmp_path):
    for cls, color in (("golden_retriever", (200, 150, 50)), ("cat", (90, 90, 90))):
        for i in range(2):
            _save(str(tmp_path / "root" / cls / f"{i}.jpg"), color)
    (tmp_path / "root" / "cat" / "notes.txt").write_text("ignored")
    src = sources.class_folder_source(str(tmp_path / "root"), "a photo of a {}.")
    assert src.classnames == ["cat", "golden retriever"] and src.total == 4
    out = str(tmp_path / "out")
    assert make_shards.main(["--out", out, "--class-folders", str(tmp_path / "root"),
                             "--no-progress"]) == 0
    m, recs = _read_shards(out)
    assert m["classnames"] == ["cat", "golden retriever"]
    assert [(r["txt"], r["label"]) for r in recs] == [
        ("a photo of a cat.", [0])] * 2 + [("a photo of a golden retriever.", [1])] * 2
    with pytest.raises(ValueError, match="must contain"):
        sources.class_folder_source(str(tmp_path / "root"), "no placeholder")


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        _add(tar, "000000000.jpg", jpg)
        _add(tar, "000000000.txt", b"first")
        _add(tar, "000000000.json", b"{}")
        _add(tar, "000000001.txt", b"no image here")
        _add(tar, "000000002.jpg", jpg)
        _add(tar, "000000002.txt", b"third")
        _add(tar, "000000002.cls", b"7")
    out = str(tmp_path / "out")
    assert make_shards.main(["--out", out, "--webdataset", str(tmp_path / "*.tar"),
                             "--no-progress"]) == 0
    m, recs = _read_shards(out)
    assert [(r["key"], r["txt"]) for r in recs] == [("000000000", "first"), ("000000002", "third")]
    assert recs[1]["label"] == [7] and recs[0]["jpg"] == jpg
    assert m["num_skipped"] == 1
    assert "no image" in m["shards"][0]["skipped"][0]["reason"]
    with pytest.raises(ValueError, match="matches no files"):
        sources.webdataset_source(str(tmp_path / "nothing-*.tar"))


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """A 5-example dataset built locally in the test (tfds needs no network for it)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(names=["dark", "bright"]),
            "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            img = np.full((8, 8, 3), 40 * i, np.uint8)
            yield i, {"image": img, "label": int(i >= 3), "caption": f"shade {i}"}


def test_tfds_source(tmp_path):
    TinyShapes(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    out = str(tmp_path / "out")
    assert make_shards.main(["--out", out, "--tfds", "tiny_shapes", "--data-dir",
                             str(tmp_path / "tfds"), "--label-field", "label",
                             "--template", "a {} square", "--no-progress"]) == 0
    m, recs = _read_shards(out)
    assert m["classnames"] == ["dark", "bright"] and m["shards"][0]["file"].startswith("train-")
    got = sorted((r["txt"], r["label"][0], int(np.asarray(Image.open(io.BytesIO(r["jpg"])))[0, 0, 0]))
                 for r in recs)
    assert got == sorted([("a dark square", 0, 0), ("a dark square", 0, 40),
                          ("a dark square", 0, 80), ("a bright square", 1, 120),
                          ("a bright square", 1, 160)])
    src = sources.tfds_source("tiny_shapes", "train", str(tmp_path / "tfds"),
                              text_field="caption")
    assert sorted(it.caption for it in src) == [f"shade {i}".encode() for i in range(5)]
    with pytest.raises(ValueError, match="no feature 'text'"):
        sources.tfds_source("tiny_shapes", "train", str(tmp_path / "tfds"), text_field="text")
