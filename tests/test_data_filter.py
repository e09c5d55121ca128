"""CLIP-score filtering: kept keys against scores computed directly with the model (threshold,
top fraction), resume after an interruption, exact duplicates dropped, the uid table."""

import glob
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from clipjax.data import filter as filter_lib
from clipjax.data import schema, writer
from clipjax.data.demo import make_demo_dataset
from clipjax.data.eval_pipeline import EvalPipeline
from clipjax.export.load import load
from clipjax.export.modeldir import save_model_dir
from clipjax.models import abstract_variables
from tests.test_eval_suite import TINY

N_DUP = 3  # the pool's last records repeat the images of its first ones under other keys


class Interrupted(Exception):
    """A run killed mid-way (a preemption)."""


def random_params(cfg, seed):
    import flax

    rng = np.random.default_rng(seed)
    shapes = flax.core.meta.unbox(abstract_variables(cfg))["params"]
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def uid(i: int) -> str:
    return hashlib.md5(f"r{i}".encode()).hexdigest()


def read_records(pattern):
    import tensorflow as tf

    out = {}
    for path in sorted(glob.glob(pattern)):
        for rec in tf.data.TFRecordDataset(path).as_numpy_iterator():
            key = tf.train.Example.FromString(rec).features.feature[schema.KEY]
            out[key.bytes_list.value[0].decode()] = rec
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A 3-shard pool of demo records keyed by uids (the last N_DUP copy the first images), a
    tiny random model, and each key's score computed directly with model.apply."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("filter")
    demo = make_demo_dataset(str(root / "demo"), n_train=30, n_test=1, image_size=32)
    examples = [tf.train.Example.FromString(r) for r in read_records(demo.train).values()]
    examples += [tf.train.Example.FromString(e.SerializeToString()) for e in examples[:N_DUP]]
    for i, e in enumerate(examples):
        e.features.feature[schema.KEY].bytes_list.value[:] = [uid(i).encode()]
    records = [e.SerializeToString() for e in examples]
    writer.write_record_shards(
        [records[:12], records[12:24], records[24:]], str(root / "pool"), source={"kind": "t"}
    )
    model_dir = str(root / "model")
    save_model_dir(model_dir, TINY, random_params(TINY, 0))
    model, variables, _ = load(model_dir)
    (batch,) = EvalPipeline(
        str(root / "pool" / "*.tfrecord"),
        global_batch=64,
        image_size=TINY.image_size,
        context_length=TINY.context_length,
    )
    rows = np.flatnonzero(batch["mask"])
    img = model.apply(variables, batch["image"][rows], method="encode_image")
    txt = model.apply(variables, batch["text"][rows], method="encode_text")
    scores = dict(zip(batch["key"][rows].tolist(), np.sum(np.asarray(img * txt), axis=1)))
    assert len(scores) == len(records) == 33
    return root, model_dir, str(root / "pool" / "*.tfrecord"), scores


def kept_by_table(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "scores.jsonl"))]
    return rows, {r["key"] for r in rows if r["kept"]}


def test_threshold_and_top_fraction_keep_the_right_keys(pool):
    root, model_dir, shards, ref = pool
    out = str(root / "out")
    summary = filter_lib.run_filter(model_dir, shards, out, top_fraction=0.4, progress=False)
    order = sorted(ref, key=lambda k: -ref[k])
    rows, kept = kept_by_table(out)
    assert kept == set(order[:13])  # round(0.4 * 33)
    for r in rows:
        assert r["score"] == pytest.approx(float(ref[r["key"]]), abs=1e-4)
    written = read_records(os.path.join(out, "filtered-*.tfrecord"))
    originals = read_records(shards)
    assert set(written) == kept and all(written[k] == originals[k] for k in kept)
    assert summary["kept"] == 13 and summary["scored"] == 33
    uids = np.load(os.path.join(out, "kept_uids.npy"))
    assert uids.dtype == np.dtype("u8,u8") and len(uids) == 13
    assert sorted(f"{a:016x}{b:016x}" for a, b in uids.tolist()) == sorted(kept)
    assert uids.tolist() == sorted(uids.tolist())
    manifest = json.load(open(os.path.join(out, schema.MANIFEST)))
    assert [s["count"] for s in manifest["shards"]] == [
        sum(k in kept for k in list(originals)[i : i + 12]) for i in (0, 12, 24)
    ]

    # the same scores (no rescoring), another rule: a threshold between two scores
    threshold = float(np.mean([ref[order[19]], ref[order[20]]]))
    summary = filter_lib.run_filter(model_dir, shards, out, min_score=threshold, progress=False)
    assert kept_by_table(out)[1] == set(order[:20]) == set(read_records(out + "/filtered-*"))


def test_dedup_drops_exact_duplicate_images(pool):
    root, model_dir, shards, ref = pool
    out = str(root / "dedup")
    summary = filter_lib.run_filter(
        model_dir, shards, out, top_fraction=1.0, dedup=0.99999, progress=False
    )
    kept = kept_by_table(out)[1]
    assert summary["near_duplicates_dropped"] == N_DUP
    for i in range(N_DUP):  # of each pair, the copy with the higher score stays
        a, b = uid(i), uid(30 + i)
        assert (a in kept) != (b in kept)
        assert (a in kept) == (ref[a] >= ref[b])
    assert len(kept) == 33 - N_DUP


def test_scoring_resumes_after_an_interruption(pool, monkeypatch):
    root, model_dir, shards, ref = pool
    out = str(root / "resume")
    real, calls, fail_at = filter_lib.score_shard, [], [2]

    def failing(encoder, path, *args):
        calls.append(os.path.basename(path))
        if len(calls) in fail_at:
            raise Interrupted
        return real(encoder, path, *args)

    monkeypatch.setattr(filter_lib, "score_shard", failing)
    with pytest.raises(Interrupted):
        filter_lib.run_filter(model_dir, shards, out, top_fraction=0.4, progress=False)
    assert sorted(os.listdir(os.path.join(out, "scores"))) == ["00000.npz", "meta.json"]
    assert not glob.glob(os.path.join(out, "scores", ".*"))  # no half-written part left
    calls.clear()
    fail_at.clear()
    filter_lib.run_filter(model_dir, shards, out, top_fraction=0.4, progress=False)
    assert calls == ["shard-00001.tfrecord", "shard-00002.tfrecord"]  # shard 0 not rescored
    rows, kept = kept_by_table(out)
    assert len(rows) == 33 and kept == set(sorted(ref, key=lambda k: -ref[k])[:13])


def test_bad_arguments_fail_before_loading_the_model(tmp_path, capsys):
    argv = ["--model", str(tmp_path / "missing"), "--shards", "x", "--out", str(tmp_path / "o")]
    assert filter_lib.main(argv + ["--top-fraction", "1.5"]) == 2
    assert "--top-fraction 1.5: expected a fraction in (0, 1]" in capsys.readouterr().err
    assert filter_lib.main(argv + ["--min-score", "0.2", "--dedup", "0"]) == 2
    assert "--dedup 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        filter_lib.main(argv + ["--min-score", "0.2", "--top-fraction", "0.5"])
