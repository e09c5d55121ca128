"""Several captions per image: shard schema, per-epoch draws in training (deterministic,
resumable, covering), caption ratios, eval pipeline layout, retrieval both ways, make_shards."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from clipjax.data import make_shards, records, schema
from clipjax.data.eval_pipeline import EvalPipeline
from clipjax.data.mixture import MixturePipeline, gather_mixture_state
from clipjax.data.tokenizer import tokenize
from clipjax.data.train_pipeline import TrainPipeline
from clipjax.evaluate.retrieval import _unpack, retrieval_metrics

L = 16


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 0)).save(out, format="PNG")
    return out.getvalue()


def write_records(path, examples) -> str:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as w:
        for ex in examples:
            w.write(ex)
    return str(path)


def read_examples(pattern):
    import glob

    import tensorflow as tf

    out = []
    for path in sorted(glob.glob(pattern)):
        for rec in tf.data.TFRecordDataset(path).as_numpy_iterator():
            f = tf.train.Example.FromString(rec).features.feature
            out.append(
                {
                    k: [v.decode() for v in f[k].bytes_list.value]
                    for k in f
                    if schema.is_caption_field(k) or k == schema.KEY
                }
            )
    return out


def drawn(pipe, n_batches, table):
    """(record, caption) of every row of the first `n_batches` batches, and the states."""
    rows, states = [], []
    for i, (batch, state) in enumerate(pipe):
        if i == n_batches:
            break
        rows += [table[tuple(t)] for t in batch["text"].tolist()]
        states.append(state)
    return rows, states


def test_caption_draw_is_seeded_uniform_and_covers_every_caption():
    import tensorflow as tf

    ex = {
        schema.CAPTIONS: tf.constant(["a", "b", "c", "d"]),
        schema.CAPTION_FIELD: tf.constant([0, 0, 0, 1]),
    }

    def draws(weights, n=400):
        seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([tf.constant(7, tf.int64), i]))
        picked = seeds.map(lambda seed: records.pick_caption(ex, seed, weights)[schema.TEXT])
        return [t.decode() for t in picked.as_numpy_iterator()]

    uniform = draws(None)
    assert uniform == draws(None)  # a function of the seed
    counts = {c: uniform.count(c) for c in "abcd"}
    assert all(70 < v < 130 for v in counts.values()), counts  # 100 each expected (sd 8.7)
    by_field = draws([1.0, 3.0])  # field 1 ("d") three times as likely as field 0 (a, b, c)
    assert 260 < by_field.count("d") < 340 and {"a", "b", "c"} <= set(by_field)
    assert set(draws([1.0, 0.0])) == {"a", "b", "c"}
    empty = {schema.CAPTIONS: tf.constant([], tf.string), schema.CAPTION_FIELD: tf.constant([])}
    empty[schema.CAPTION_FIELD] = tf.cast(empty[schema.CAPTION_FIELD], tf.int32)
    assert records.pick_caption(empty, tf.constant([1, 2]))[schema.TEXT].numpy() == b""


def test_one_caption_per_record_per_epoch_deterministic_and_resumable(tmp_path):
    n, c = 8, 3
    texts = [[f"record {r} caption {j}" for j in range(c)] for r in range(n)]
    path = write_records(
        tmp_path / "list.tfrecord",
        [schema.make_example(png(r * 20), texts[r], f"k{r}") for r in range(n)],
    )
    table = {
        tuple(ids): (r, j) for r in range(n) for j, ids in enumerate(tokenize(texts[r], L).tolist())
    }
    args = dict(global_batch=4, image_size=8, context_length=L, seed=3, shuffle_buffer=8)
    args |= dict(process_index=0, process_count=1)
    epochs = 4
    rows, states = drawn(TrainPipeline(path, **args), 2 * epochs, table)
    per_epoch = [dict(rows[e * n : (e + 1) * n]) for e in range(epochs)]
    assert all(sorted(ep) == list(range(n)) for ep in per_epoch)  # each record once an epoch
    assert len({j for ep in per_epoch for j in ep.values()}) == c  # all captions in use
    changed = sum(
        per_epoch[e][r] != per_epoch[e + 1][r] for e in range(epochs - 1) for r in range(n)
    )
    assert changed > n  # drawn anew each epoch (2/3 of 24 draws expected to change)
    resumed, _ = drawn(TrainPipeline(path, **args, state=states[2]), 3, table)
    assert resumed == rows[3 * 4 : 6 * 4]  # a resume mid-epoch 1 draws the same captions


def test_named_caption_fields_mixed_by_ratio(tmp_path):
    n = 8
    examples = [
        schema.make_example(
            png(r),
            {"txt": f"original {r}", **({"txt_synthetic": f"synthetic {r}"} if r < 7 else {})},
            f"k{r}",
        )
        for r in range(n)
    ]
    path = write_records(tmp_path / "named.tfrecord", examples)
    names = [f"original {r}" for r in range(n)] + [f"synthetic {r}" for r in range(n)]
    table = {tuple(ids): name for name, ids in zip(names, tokenize(names, L).tolist())}
    args = dict(global_batch=4, image_size=8, context_length=L, process_index=0, process_count=1)
    pipe = TrainPipeline(path, **args, caption_ratio={"txt": 1.0, "txt_synthetic": 3.0})
    assert pipe.info.caption_fields == ("txt", "txt_synthetic")
    rows, _ = drawn(pipe, 12, table)
    assert all(name == "original 7" for name in rows if name.endswith(" 7"))  # no synthetic
    share = np.mean([name.startswith("synthetic") for name in rows if not name.endswith(" 7")])
    assert 0.6 < share < 0.9  # 3:1 over 42 draws (sd 0.07)
    only, _ = drawn(TrainPipeline(path, **args, caption_ratio={"txt": 1.0}), 4, table)
    assert all(name.startswith("original") for name in only)
    with pytest.raises(ValueError, match=r"txt_recap.*caption fields are \['txt', 'txt_synth"):
        TrainPipeline(path, **args, caption_ratio={"txt_recap": 1.0})


@pytest.mark.parametrize(
    "spec, error",
    [
        ("txt=1,caption=2", "bad entry 'caption=2'"),
        ("txt=0", "bad entry 'txt=0'"),
        ("txt=x", "bad entry"),
        ("txt=1,txt=2", "given twice"),
    ],
)
def test_caption_ratio_spec_errors(spec, error):
    assert records.parse_caption_ratio("txt=0.7, txt_synthetic=0.3") == {
        "txt": 0.7,
        "txt_synthetic": 0.3,
    }
    assert records.parse_caption_ratio("") is None
    with pytest.raises(ValueError, match=error):
        records.parse_caption_ratio(spec)


def test_eval_pipeline_gives_every_caption_and_single_caption_shards_unchanged(tmp_path):
    path = write_records(
        tmp_path / "mixed.tfrecord",
        [
            schema.make_example(png(0), ["a red thing", "a thing", "red"], "k0"),
            schema.make_example(png(9), "one caption", "k1"),
        ],
    )
    (batch,) = EvalPipeline(
        path, global_batch=4, image_size=8, context_length=L, process_index=0, process_count=1
    )
    assert batch["texts"].shape == (4, 3, L) and batch["text"].shape == (4, L)
    np.testing.assert_array_equal(batch["texts"][0], tokenize(["a red thing", "a thing", "red"], L))
    np.testing.assert_array_equal(batch["texts"][1, 0], tokenize(["one caption"], L)[0])
    assert not batch["texts"][1, 1:].any() and not batch["texts"][2:].any()
    np.testing.assert_array_equal(batch["text"][:2], batch["texts"][:2, 0])
    assert list(batch["caption"][:2]) == ["a red thing", "one caption"]
    assert _unpack(batch)[1].shape == (4, 3, L)  # retrieval reads every caption


def test_retrieval_with_several_captions_matches_hand_computation():
    images = np.array([[1.0, 0.0], [0.0, 1.0]])
    # captions 0 and 1 belong to image 0 (caption 1 is closer to image 1), caption 2 to image 1
    texts = np.array([[0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    m = retrieval_metrics(images, texts, np.array([0, 0, 1]), ks=(1, 2))
    # image 0: own caption 0 scores 0.8, best of all -> hit@1; image 1: own caption 2 scores 0.8,
    # caption 1 scores 1.0 -> rank 1 (hit@2 only)
    assert m["image_to_text/R@1"] == 0.5 and m["image_to_text/R@2"] == 1.0
    # caption 0 -> image 0 (0.8 > 0.6) hit; caption 1 -> image 1 wins (1 > 0): miss@1;
    # caption 2 -> image 1 (0.8 > 0.6) hit
    assert m["text_to_image/R@1"] == pytest.approx(2 / 3) and m["text_to_image/R@2"] == 1.0
    assert m["num_images"] == 2 and m["num_texts"] == 3


def test_make_shards_from_caption_lists_and_coco(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (img / name).write_bytes(png(len(name) + ord(name[0])))
    rows = [
        {"image": "a.png", "captions": ["first of a", "second of a"]},
        {"image": "b.png", "caption": "only b", "caption_synthetic": "recaptioned b"},
        {"image": "c.png", "captions": ["good", ""]},  # a bad caption: the record is skipped
    ]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "lists")
    argv = ["--captions", str(caps), "--images", str(img), "--keep-order", "--no-progress"]
    assert make_shards.main(["--out", out] + argv) == 0
    got = read_examples(out + "/*.tfrecord")
    assert got == [
        {"key": ["a.png"], "txt": ["first of a", "second of a"]},
        {"key": ["b.png"], "txt": ["only b"], "txt_synthetic": ["recaptioned b"]},
    ]
    manifest = json.load(open(out + "/manifest.json"))
    assert "txt caption 2 of 2: empty caption" in manifest["shards"][0]["skipped"][0]["reason"]

    coco = {
        "images": [{"id": 7, "file_name": "a.png"}, {"id": 3, "file_name": "b.png"}],
        "annotations": [
            {"image_id": 3, "caption": "b one"},
            {"image_id": 7, "caption": "a one"},
            {"image_id": 3, "caption": "b two"},
        ],
    }
    (tmp_path / "captions_train2017.json").write_text(json.dumps(coco))
    out = str(tmp_path / "coco")
    argv = ["--coco", str(tmp_path / "captions_train2017.json"), "--images", str(img)]
    assert make_shards.main(["--out", out, "--keep-order", "--no-progress"] + argv) == 0
    assert read_examples(out + "/*.tfrecord") == [
        {"key": ["a.png"], "txt": ["a one"]},
        {"key": ["b.png"], "txt": ["b one", "b two"]},
    ]
    coco["annotations"].append({"image_id": 99, "caption": "orphan"})
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    argv = ["--coco", str(tmp_path / "bad.json"), "--images", str(img), "--no-progress"]
    assert make_shards.main(["--out", str(tmp_path / "bad")] + argv) == 2


def test_config_rejects_a_bad_caption_ratio():
    from clipjax.train.config import ConfigError, base_config, validate

    c = base_config()
    c.data.caption_ratio = "txt=0.7,txt_synthetic=0.3"
    validate(c, num_devices=1, check_files=False)
    c.data.caption_ratio = "txt=0.7,synthetic=0.3"
    with pytest.raises(ConfigError, match=r"data.caption_ratio=.*bad entry 'synthetic=0.3'"):
        validate(c, num_devices=1, check_files=False)


def test_a_mixture_draws_captions_over_the_union_of_its_sources_fields(tmp_path):
    n = 8
    named = [
        schema.make_example(
            png(r), {"txt": f"a original {r}", "txt_synthetic": f"a synth {r}"}, f"a{r}"
        )
        for r in range(n)
    ]
    plain = [
        schema.make_example(png(r), [f"b first {r}", f"b second {r}"], f"b{r}") for r in range(n)
    ]
    sources = {
        "a": {"shards": write_records(tmp_path / "a.tfrecord", named), "weight": 1.0},
        "b": {"shards": write_records(tmp_path / "b.tfrecord", plain), "weight": 1.0},
    }
    names = [f"a original {r}" for r in range(n)] + [f"a synth {r}" for r in range(n)]
    names += [f"b first {r}" for r in range(n)] + [f"b second {r}" for r in range(n)]
    table = {tuple(ids): name for name, ids in zip(names, tokenize(names, L).tolist())}
    args = dict(global_batch=4, image_size=8, context_length=L, process_index=0, process_count=1)
    pipe = MixturePipeline(sources, **args, caption_ratio={"txt": 1.0, "txt_synthetic": 3.0})
    assert pipe.info.caption_fields == ("txt", "txt_synthetic")
    rows, states = drawn(pipe, 16, table)
    from_a = [name for name in rows if name.startswith("a ")]
    from_b = [name for name in rows if name.startswith("b ")]
    assert from_a and from_b
    assert 0.55 < np.mean([" synth " in name for name in from_a]) < 0.95  # 3:1 for a's fields
    assert {name.split()[1] for name in from_b} == {"first", "second"}  # b: its txt list
    again, _ = drawn(
        MixturePipeline(
            sources,
            **args,
            caption_ratio={"txt": 1.0, "txt_synthetic": 3.0},
            state=gather_mixture_state(states[5]),
        ),
        4,
        table,
    )
    assert again == rows[6 * 4 : 10 * 4]  # resumed: the same sources and captions
