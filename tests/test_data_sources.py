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
            recs.append(
                {
                    "key": f["key"].bytes_list.value[0].decode(),
                    "txt": f["txt"].bytes_list.value[0].decode(),
                    "label": list(f["label"].int64_list.value) if "label" in f else None,
                    "jpg": f["jpg"].bytes_list.value[0],
                }
            )
    return m, recs


def test_captions_jsonl_and_csv(tmp_path, capsys):
    img = tmp_path / "img"
    _save(str(img / "a.jpg"), (255, 0, 0))
    _save(str(img / "sub" / "b.png"), (0, 255, 0), fmt="PNG")
    (img / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    rows = [
        {"image": "a.jpg", "caption": "red"},
        {"image": "sub/b.png", "caption": "green"},
        {"image": "a.jpg", "caption": "a second caption"},
        {"image": "missing.jpg", "caption": "x"},
        {"image": "broken.jpg", "caption": "y"},
    ]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = str(tmp_path / "out")
    rc = make_shards.main(
        [
            "--out",
            out,
            "--captions",
            str(caps),
            "--images",
            str(img),
            "--shard-size",
            "2",
            "--no-progress",
            "--keep-order",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "missing.jpg" in printed and "broken.jpg" in printed and "skipped 2" in printed
    m, recs = _read_shards(out)
    assert [(r["key"], r["txt"]) for r in recs] == [
        ("a.jpg", "red"),
        ("sub/b.png", "green"),
        ("a.jpg", "a second caption"),
    ]
    assert m["num_skipped"] == 2 and m["source"]["kind"] == "captions"
    assert m["order"] == {"shuffled": False} and "in source order" in printed

    csv = tmp_path / "caps.csv"
    csv.write_text('image,caption\na.jpg,"red, with a comma"\n')
    out2 = str(tmp_path / "out2")
    assert (
        make_shards.main(
            ["--out", out2, "--captions", str(csv), "--images", str(img), "--no-progress"]
        )
        == 0
    )
    assert [r["txt"] for r in _read_shards(out2)[1]] == ["red, with a comma"]


def test_bad_captions_file_is_a_clear_error(tmp_path, capsys):
    caps = tmp_path / "caps.jsonl"
    caps.write_text('{"image": "a.jpg", "caption": "ok"}\n{"img": "b.jpg"}\n')
    rc = make_shards.main(
        [
            "--out",
            str(tmp_path / "o"),
            "--captions",
            str(caps),
            "--images",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "caps.jsonl:2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs --images"):
        make_shards.make_source(
            make_shards.build_parser().parse_args(["--out", "o", "--captions", str(caps)])
        )
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
    assert (
        make_shards.main(
            [
                "--out",
                out,
                "--class-folders",
                str(tmp_path / "root"),
                "--no-progress",
                "--keep-order",
            ]
        )
        == 0
    )
    m, recs = _read_shards(out)
    assert m["classnames"] == ["cat", "golden retriever"]
    assert [(r["txt"], r["label"]) for r in recs] == [("a photo of a cat.", [0])] * 2 + [
        ("a photo of a golden retriever.", [1])
    ] * 2
    with pytest.raises(ValueError, match="must contain"):
        sources.class_folder_source(str(tmp_path / "root"), "no placeholder")


def test_class_folders_are_shuffled_by_default(tmp_path, capsys):
    root = tmp_path / "root"
    for c in range(3):
        for i in range(10):
            _save(str(root / f"class{c}" / f"{i}.jpg"), (80 * c, 9 * i, 0))
    out = str(tmp_path / "out")
    assert (
        make_shards.main(
            ["--out", out, "--class-folders", str(root), "--shard-size", "7", "--no-progress"]
        )
        == 0
    )
    assert "shuffled with seed 0" in capsys.readouterr().out
    m, recs = _read_shards(out)
    labels = [r["label"][0] for r in recs]
    assert labels != sorted(labels) and len(set(labels[:7])) > 1
    assert sorted(r["key"] for r in recs) == sorted(
        f"class{c}/{i}.jpg" for c in range(3) for i in range(10)
    )
    assert m["order"]["shuffled"] and m["order"]["seed"] == 0
    out7 = str(tmp_path / "out7")
    assert (
        make_shards.main(
            [
                "--out",
                out7,
                "--class-folders",
                str(root),
                "--shard-size",
                "7",
                "--seed",
                "7",
                "--no-progress",
            ]
        )
        == 0
    )
    m7, recs7 = _read_shards(out7)
    assert m7["order"]["seed"] == 7 and [r["key"] for r in recs7] != [r["key"] for r in recs]
    assert (
        make_shards.main(
            [
                "--out",
                out,
                "--class-folders",
                str(root),
                "--shard-size",
                "7",
                "--seed",
                "7",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "shuffled with seed 0" in err and "shuffled with seed 7" in err
    assert (
        make_shards.main(
            ["--out", out, "--class-folders", str(root), "--shard-size", "7", "--no-progress"]
        )
        == 0
    )  # same arguments: resumes (nothing to do)
    assert _read_shards(out)[1] == recs
    with pytest.raises(SystemExit):
        make_shards.main(
            ["--out", out, "--class-folders", str(root), "--seed", "1", "--keep-order"]
        )


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _wds_tar(path, jpg, mode="w"):
    with tarfile.open(path, mode) as tar:
        _add(tar, "000000000.jpg", jpg)
        _add(tar, "000000000.txt", b"first")
        _add(tar, "000000000.json", b"{}")
        _add(tar, "000000001.txt", b"no image here")
        _add(tar, "000000002.jpg", jpg)
        _add(tar, "000000002.txt", b"third")
        _add(tar, "000000002.cls", b"7")


def test_webdataset_tars(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    _wds_tar(tmp_path / "00000.tar", jpg)
    src = sources.webdataset_source(str(tmp_path / "*.tar"))
    assert not src.in_memory  # uncompressed: images are read by offset when written
    assert [it.read() for it in src if it.key != "000000001"] == [jpg, jpg]
    out = str(tmp_path / "out")
    assert (
        make_shards.main(
            ["--out", out, "--webdataset", str(tmp_path / "*.tar"), "--no-progress", "--keep-order"]
        )
        == 0
    )
    m, recs = _read_shards(out)
    assert [(r["key"], r["txt"]) for r in recs] == [("000000000", "first"), ("000000002", "third")]
    assert recs[1]["label"] == [7] and recs[0]["jpg"] == jpg
    assert m["num_skipped"] == 1
    assert "no image" in m["shards"][0]["skipped"][0]["reason"]
    with pytest.raises(ValueError, match="matches no files"):
        sources.webdataset_source(str(tmp_path / "nothing-*.tar"))


def test_webdataset_shuffle_lazy_and_compressed(tmp_path):
    jpgs = []
    for t in range(4):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (60 * t, 2, 3)).save(buf, format="JPEG")
        jpgs.append(buf.getvalue())
        os.makedirs(tmp_path / "plain", exist_ok=True)
        with tarfile.open(tmp_path / "plain" / f"{t:05d}.tar", "w") as tar:
            for i in range(5):
                _add(tar, f"{t}{i:04d}.jpg", jpgs[t])
                _add(tar, f"{t}{i:04d}.txt", f"tar {t}".encode())
    out = str(tmp_path / "out")
    assert (
        make_shards.main(
            [
                "--out",
                out,
                "--webdataset",
                str(tmp_path / "plain" / "*.tar"),
                "--shard-size",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    m, recs = _read_shards(out)
    assert m["order"]["method"] == "permutation" and m["order"]["items"] == 20
    keys = [r["key"] for r in recs]
    assert sorted(keys) == [f"{t}{i:04d}" for t in range(4) for i in range(5)]
    assert keys != sorted(keys)  # records of one tar are spread over the shards
    assert all(
        r["jpg"] == jpgs[int(r["key"][0])] and r["txt"] == f"tar {r['key'][0]}" for r in recs
    )

    _wds_tar(tmp_path / "a.tar.gz", jpgs[0], mode="w:gz")
    src = sources.webdataset_source(str(tmp_path / "a.tar.gz"))
    assert src.in_memory and src.shuffled_parts is not None
    out = str(tmp_path / "gz")
    assert (
        make_shards.main(
            [
                "--out",
                out,
                "--webdataset",
                str(tmp_path / "a.tar.gz"),
                "--shuffle-buffer",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    m, recs = _read_shards(out)
    assert m["order"] == {
        "shuffled": True,
        "seed": 0,
        "method": "buffer",
        "buffer": 2,
        "files_shuffled": True,
    }
    assert sorted(r["key"] for r in recs) == ["000000000", "000000002"]


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """A 5-example dataset built locally in the test (tfds needs no network for it)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(names=["dark", "bright"]),
                    "caption": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            img = np.full((8, 8, 3), 40 * i, np.uint8)
            yield i, {"image": img, "label": int(i >= 3), "caption": f"shade {i}"}


def test_tfds_source(tmp_path):
    TinyShapes(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    out = str(tmp_path / "out")
    assert (
        make_shards.main(
            [
                "--out",
                out,
                "--tfds",
                "tiny_shapes",
                "--data-dir",
                str(tmp_path / "tfds"),
                "--label-field",
                "label",
                "--template",
                "a {} square",
                "--no-progress",
            ]
        )
        == 0
    )
    m, recs = _read_shards(out)
    assert m["order"]["method"] == "buffer" and m["order"]["seed"] == 0
    assert m["classnames"] == ["dark", "bright"] and m["shards"][0]["file"].startswith("train-")
    got = sorted(
        (r["txt"], r["label"][0], int(np.asarray(Image.open(io.BytesIO(r["jpg"])))[0, 0, 0]))
        for r in recs
    )
    assert got == sorted(
        [
            ("a dark square", 0, 0),
            ("a dark square", 0, 40),
            ("a dark square", 0, 80),
            ("a bright square", 1, 120),
            ("a bright square", 1, 160),
        ]
    )
    src = sources.tfds_source("tiny_shapes", "train", str(tmp_path / "tfds"), text_field="caption")
    assert sorted(it.caption for it in src) == [f"shade {i}".encode() for i in range(5)]
    with pytest.raises(ValueError, match="no feature 'text'"):
        sources.tfds_source("tiny_shapes", "train", str(tmp_path / "tfds"), text_field="text")


def test_tfds_source_reads_split_slices(tmp_path):
    TinyShapes(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    data_dir = str(tmp_path / "tfds")
    src = sources.tfds_source("tiny_shapes", "train[1:3]", data_dir, text_field="caption")
    assert len(list(src)) == 2
    src = sources.tfds_source("tiny_shapes", "train[:40%]+train[4:]", data_dir, label_field="label")
    assert len(list(src)) == 3
    for bad in ("test", "train[abc]"):
        with pytest.raises(ValueError, match=r"no split .*it has \['train'\].*train\[:10%\]"):
            sources.tfds_source("tiny_shapes", bad, data_dir, label_field="label")


# ------------------------------------------------------------------ bad input: clear errors, skips
def test_caption_rows_that_are_not_text_are_skipped_and_counted(tmp_path, capsys):
    """null / list / number captions were stored as the text 'None' / "['x', 'y']" / '3'."""
    img = tmp_path / "img"
    _save(str(img / "a.jpg"), (255, 0, 0))
    rows = [
        {"image": "a.jpg", "caption": "red"},
        {"image": "a.jpg", "caption": None},
        {"image": "a.jpg", "caption": ["x", "y"]},
        {"image": "a.jpg", "caption": 3},
        {"image": None, "caption": "no image"},
    ]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = str(tmp_path / "out")
    argv = ["--out", out, "--captions", str(caps), "--images", str(img), "--keep-order"]
    assert make_shards.main(argv + ["--no-progress"]) == 0
    m, recs = _read_shards(out)
    assert [r["txt"] for r in recs] == ["red"]
    reasons = [s["reason"] for s in m["shards"][0]["skipped"]]
    assert m["num_skipped"] == 4 and "skipped 4" in capsys.readouterr().out
    assert reasons[:3] == [
        "caption is null, expected text",
        "caption is list ['x', 'y'], expected text",
        "caption is int 3, expected text",
    ]
    assert "image is None" in reasons[3]


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_captions_file_that_is_not_utf8_names_file_and_line(tmp_path, capsys, ext):
    caps = tmp_path / f"caps.{ext}"
    if ext == "jsonl":
        caps.write_bytes(
            b'{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg", "caption": "\xe9t\xe9"}\n'
        )
    else:
        caps.write_bytes(b"image,caption\na.jpg,ok\nb.jpg,caf\xe9\n")
    argv = ["--out", str(tmp_path / "o"), "--captions", str(caps), "--images", str(tmp_path)]
    assert make_shards.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    line = 2 if ext == "jsonl" else 3
    assert f"caps.{ext}:{line}: not UTF-8" in err and "Traceback" not in err


def test_template_with_an_unknown_field_is_a_clear_error(tmp_path, capsys):
    _save(str(tmp_path / "root" / "cat" / "a.jpg"), (1, 2, 3))
    for bad in ("a {x} of {}", "a photo", "{} {0}", "a { of {}"):
        argv = ["--out", str(tmp_path / "o"), "--class-folders", str(tmp_path / "root")]
        assert make_shards.main(argv + ["--template", bad, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "caption template" in err and "'{}'" in err, err
    assert (
        "(found {x})"
        in (pytest.raises(ValueError, sources.check_template, "a {x} of {}").value.args[0])
    )
    assert sources.check_template("{{literal}} {} {!r}") == "{{literal}} {} {!r}"
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("compressed", [False, True])
def test_webdataset_member_over_the_cap_is_skipped_unread(tmp_path, monkeypatch, compressed):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    jpg, big = buf.getvalue(), b"\xff" * (2 << 20)  # 2 MiB, over a 1 MiB cap
    path = tmp_path / ("00000.tar.gz" if compressed else "00000.tar")
    with tarfile.open(path, "w:gz" if compressed else "w") as tar:
        _add(tar, "k1.jpg", jpg)
        _add(tar, "k1.txt", b"small")
        _add(tar, "k2.jpg", big)
        _add(tar, "k2.txt", b"huge image")
        _add(tar, "k3.jpg", jpg)
        _add(tar, "k3.txt", big)
        _add(tar, "k4.jpg", jpg)
        _add(tar, "k4.json", big)  # unused member: not read, does not matter
        _add(tar, "k4.txt", b"fine")
    extracted = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(
        tarfile.TarFile, "extractfile", lambda self, m: extracted.append(m.name) or real(self, m)
    )
    out = str(tmp_path / "out")
    argv = ["--out", out, "--webdataset", str(path), "--max-member-mb", "1", "--keep-order"]
    assert make_shards.main(argv + ["--no-progress"]) == 0
    m, recs = _read_shards(out)
    assert [(r["key"], r["txt"]) for r in recs] == [("k1", "small"), ("k4", "fine")]
    assert m["num_skipped"] == 2
    reasons = {s["key"]: s["reason"] for s in m["shards"][0]["skipped"]}
    assert "k2.jpg is 2097152 bytes, over the cap" in reasons["k2"]
    assert "k3.txt is 2097152 bytes, over the cap" in reasons["k3"]
    assert not {"k2.jpg", "k3.txt", "k4.json"} & set(extracted)
    # The default cap (64 MiB) keeps them all.
    assert len(list(sources.webdataset_source(str(path)))) == 4
    with pytest.raises(SystemExit):
        make_shards.main(["--out", out, "--webdataset", str(path), "--max-member-mb", "0"])
