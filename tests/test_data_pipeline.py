"""Train/eval pipelines: exact resume (across epochs), host splits, bad data, eval coverage."""

import io

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clipjax.data import schema
from clipjax.data.eval_pipeline import EvalPipeline
from clipjax.data.shards import list_shards, validate_shards
from clipjax.data.train_pipeline import TrainPipeline, combine_states, gather_state
from clipjax.parallel.mesh import make_mesh
from clipjax.parallel.placement import prefetch_to_device, to_global

N_RECORDS, N_SHARDS = 32, 3
BAD = {5: "corrupt", 11: "empty", 17: "utf8", 23: "noimage", 29: "corrupt"}
GOOD = sorted(set(range(N_RECORDS)) - set(BAD))


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _record(i: int) -> bytes:
    """Record i: label = i (so batches reveal which records they hold); some are bad."""
    kind = BAD.get(i)
    image, caption = _jpeg(i), f"a photo number {i}"
    if kind == "corrupt":
        image = image[:40]
    elif kind == "noimage":
        image = b""
    if kind == "empty":
        caption = "  "
    ex = tf.train.Example.FromString(schema.make_example(image, caption, f"k{i}", label=i))
    if kind == "utf8":
        ex.features.feature["txt"].bytes_list.value[0] = b"caf\xe9 \xff"
    return ex.SerializeToString()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    paths = [str(d / f"train-{s:05d}.tfrecord") for s in range(N_SHARDS)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for i in range(N_RECORDS):
        writers[i % N_SHARDS].write(_record(i))
    for w in writers:
        w.close()
    return str(d / "train-*.tfrecord")


def _train(shards, state=None, seed=3, batch=4, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return TrainPipeline(
        shards,
        global_batch=batch,
        image_size=8,
        context_length=16,
        seed=seed,
        shuffle_buffer=16,
        state=state,
        **kw,
    )


def _take(pipe, n):
    it = iter(pipe)
    return [next(it) for _ in range(n)]


def test_epochs_cover_good_records_once_and_count_skips(shards):
    run = _take(_train(shards), 14)
    per_epoch = len(GOOD) // 4  # 27 usable records -> 6 full batches; the remainder is dropped
    epochs = [s["epoch"] for _, s in run]
    assert epochs == [0] * per_epoch + [1] * per_epoch + [2] * 2
    for e in range(2):
        labels = np.concatenate([b["label"] for b, s in run if s["epoch"] == e])
        assert len(set(labels)) == len(labels) == 4 * per_epoch
        assert set(labels) <= set(GOOD)
    b, s = run[0]
    assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
    assert b["text"].shape == (4, 16) and b["text"].dtype == np.int32
    assert set(b) == {"image", "text", "label"}
    # skipped = unusable records that fell inside the consumed part of each epoch
    last_e0 = [s for _, s in run if s["epoch"] == 0][-1]
    assert last_e0["skipped"] == last_e0["offset"] - 4 * per_epoch
    assert 1 <= last_e0["skipped"] <= len(BAD)
    # epochs are shuffled differently; another seed gives another order
    l0 = np.concatenate([b["label"] for b, _ in run[:per_epoch]])
    l1 = np.concatenate([b["label"] for b, _ in run[per_epoch : 2 * per_epoch]])
    assert not np.array_equal(l0, l1)
    other = np.concatenate([b["label"] for b, _ in _take(_train(shards, seed=4), 2)])
    assert not np.array_equal(l0[:8], other)


def test_resume_yields_exactly_the_same_batches(shards):
    run = _take(_train(shards), 16)
    for k in (3, 5, 6, 11):  # mid-epoch, last batch of epoch 0, first of epoch 1, ...
        state = gather_state(run[k - 1][1])
        assert (
            state["process_count"] == 1 and state["hosts"][0]["offset"] == run[k - 1][1]["offset"]
        )
        resumed = _take(_train(shards, state=state), 4)
        for (b, s), (rb, rs) in zip(run[k : k + 4], resumed):
            assert rs == s
            assert b.keys() == rb.keys()
            for key in b:
                np.testing.assert_array_equal(rb[key], b[key], err_msg=f"resume at {k}: {key}")


def test_restore_guards(shards):
    state = gather_state(_take(_train(shards), 1)[0][1])
    with pytest.raises(ValueError, match="bad data state"):
        _train(shards, state={**state, "hosts": [{"epoch": 0}]})
    with pytest.raises(ValueError, match="seed"):
        _train(shards, state=state, seed=99)
    with pytest.raises(ValueError, match="multiple of the process count"):
        _train(shards, batch=5, process_index=0, process_count=2)


def _labels(pipe, n):
    return np.concatenate([b["label"] for b, _ in _take(pipe, n)])


@pytest.mark.parametrize("num_hosts", [2, 4])  # 4 hosts > 3 shards: record-level split
def test_hosts_read_disjoint_data(shards, num_hosts):
    per_host = [
        _labels(_train(shards, batch=2 * num_hosts, process_index=i, process_count=num_hosts), 2)
        for i in range(num_hosts)
    ]
    flat = np.concatenate(per_host)
    assert len(set(flat)) == len(flat)
    if num_hosts == 2:  # shard split: host 0 has shards 0 and 2, host 1 shard 1
        assert {x % N_SHARDS for x in per_host[1]} == {1}
        assert {x % N_SHARDS for x in per_host[0]} <= {0, 2}


def test_bad_shard_inputs_are_clear_errors(shards, tmp_path):
    with pytest.raises(ValueError, match="matches no files"):
        list_shards(str(tmp_path / "nope-*.tfrecord"))
    junk = tmp_path / "junk.tfrecord"
    junk.write_bytes(b"this is not a tfrecord file at all")
    with pytest.raises(ValueError, match="junk.tfrecord: unreadable"):
        validate_shards([str(junk)])
    nojpg = tmp_path / "nojpg.tfrecord"
    ex = tf.train.Example(
        features=tf.train.Features(
            feature={"txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"hi"]))}
        )
    )
    with tf.io.TFRecordWriter(str(nojpg)) as w:
        w.write(ex.SerializeToString())
    with pytest.raises(ValueError, match=r"nojpg.tfrecord: first record lacks 'jpg'"):
        _train(str(nojpg))
    info = validate_shards(list_shards(shards))
    assert info.has_label and not info.has_tokens


def test_eval_every_example_once_with_mask(shards):
    hosts = [
        EvalPipeline(
            shards,
            global_batch=6,
            image_size=8,
            context_length=16,
            process_index=i,
            process_count=2,
        )
        for i in range(2)
    ]
    outs = [list(h) for h in hosts]
    assert len(outs[0]) == len(outs[1]) == hosts[0].num_batches == 6  # ceil(16 / 3)
    keys, labels = [], []
    for batches in outs:
        for b in batches:
            assert b["image"].shape == (3, 8, 8, 3) and b["mask"].shape == (3,)
            m = b["mask"]
            assert not np.any(b["image"][~m]) and all(k == "" for k in b["key"][~m])
            keys += list(b["key"][m])
            labels += list(b["label"][m])
            assert all(c.startswith("a photo number") for c in b["caption"][m])
    assert sorted(labels) == GOOD and sorted(keys) == sorted(f"k{i}" for i in GOOD)
    assert hosts[0].skipped + hosts[1].skipped == len(BAD)
    # deterministic: a second pass is identical
    again = list(hosts[0])
    for a, b in zip(outs[0], again):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_to_global_and_prefetch(shards):
    mesh = make_mesh({"data": -1, "fsdp": 2})
    pipe = _train(shards, batch=8)
    local = _take(pipe, 3)
    out = list(prefetch_to_device(iter(local), mesh, size=2))
    assert len(out) == 3
    for (g, s), (b, s0) in zip(out, local):
        assert s == s0 and set(g) == set(b)
        assert g["image"].shape == (8, 8, 8, 3)
        assert g["image"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
        assert len(g["image"].addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(g["text"]), b["text"])
    eval_batch = next(
        iter(
            EvalPipeline(
                shards,
                global_batch=8,
                image_size=8,
                context_length=16,
                process_index=0,
                process_count=1,
            )
        )
    )
    g = to_global(eval_batch, mesh)
    assert "key" not in g and "caption" not in g and g["mask"].dtype == bool


def test_pretokenized_ids_are_used_padded_and_truncated(tmp_path):
    path = str(tmp_path / "tok.tfrecord")
    short = [49406, 5, 6, 49407]
    long = [49406] + list(range(100, 120)) + [49407]  # 22 ids > context 16
    with tf.io.TFRecordWriter(path) as w:
        for i, ids in enumerate((short, long)):
            w.write(schema.make_example(_jpeg(i), "ignored caption", f"t{i}", tokens=ids))
    batch = next(
        iter(
            EvalPipeline(
                path,
                global_batch=2,
                image_size=8,
                context_length=16,
                process_index=0,
                process_count=1,
            )
        )
    )
    np.testing.assert_array_equal(batch["text"][0], short + [0] * 12)
    np.testing.assert_array_equal(batch["text"][1], long[:15] + [49407])
    train_batch, _ = next(iter(_train(path, batch=2)))
    assert sorted(map(tuple, train_batch["text"])) == sorted(map(tuple, batch["text"]))


def test_read_windows_mix_a_class_sorted_shard(tmp_path):
    """One shard written in class order (4 classes x 30): with a shuffle buffer smaller than a
    class, plain reading gives batches of one class; 6 read windows give mixed batches, every
    record still once per epoch, and resuming mid-epoch is exact."""
    path = str(tmp_path / "sorted.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for i in range(120):
            w.write(schema.make_example(_jpeg(i), f"class {i // 30}", f"k{i}", label=i))

    def pipe(windows, state=None):
        return TrainPipeline(
            path,
            global_batch=8,
            image_size=8,
            context_length=16,
            seed=1,
            shuffle_buffer=8,
            read_windows=windows,
            state=state,
            process_index=0,
            process_count=1,
        )

    def classes_per_batch(run):
        return np.mean([len(set(b["label"] // 30)) for b, _ in run])

    plain, windowed = _take(pipe(1), 15), _take(pipe(6), 15)
    assert classes_per_batch(plain) < 2 and classes_per_batch(windowed) >= 3
    labels = np.concatenate([b["label"] for b, _ in windowed])
    assert sorted(labels) == list(range(120))
    resumed = _take(pipe(6, state=gather_state(windowed[6][1])), 3)
    for (b, s), (rb, rs) in zip(windowed[7:10], resumed):
        assert rs == s
        np.testing.assert_array_equal(rb["label"], b["label"])


def _carry_split(batch_labels, carried_left, fresh):
    """Split a batch that ends the carried records into (carried part, next-epoch part): the
    next-epoch part is a non-empty suffix equal to the start of that epoch's own stream (`fresh`,
    whose labels are distinct, so the split is unique)."""
    for k in range(len(batch_labels)):
        head, tail = batch_labels[:k], batch_labels[k:]
        if set(head) <= carried_left and list(tail) == list(fresh[: len(tail)]):
            return head, tail
    raise AssertionError(f"{batch_labels} is not carried records followed by {fresh}")


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_resume_on_another_process_count_sees_every_record_once(shards, before, after):
    """Checkpointed by `before` hosts, resumed on `after`: the rest of the epoch is read by the
    new hosts, every usable record exactly once, then the next epoch starts with the new split."""
    batch = 6  # global; a multiple of every process count here
    old = [
        _take(_train(shards, batch=batch, process_index=i, process_count=before), 2)
        for i in range(before)
    ]
    seen = [int(x) for run in old for b, _ in run for x in b["label"]]
    state = combine_states([run[-1][1] for run in old])
    left = set(GOOD) - set(seen)
    assert len(seen) == len(set(seen)) and left
    next_epoch = max(h["epoch"] for h in state["hosts"]) + 1
    carried = []
    for j in range(after):
        pipe = _train(shards, batch=batch, state=state, process_index=j, process_count=after)
        fresh_state = {"seed": 3, "epoch": next_epoch, "offset": 0, "skipped": 0}
        fresh = _labels(
            _train(shards, batch=batch, state=fresh_state, process_index=j, process_count=after), 1
        )
        for b, s in pipe:
            labels = [int(x) for x in b["label"]]
            if "carry" in s:  # a batch of carried records only
                carried += labels
                continue
            head, tail = _carry_split(labels, left, fresh)
            carried += head
            assert s["epoch"] == next_epoch and s["offset"] >= len(tail)
            break
    assert sorted(carried) == sorted(left), "every remaining record exactly once"


def test_resume_inside_the_carried_records_is_exact(shards):
    old = _take(_train(shards, batch=6, process_index=0, process_count=1), 1)
    state = combine_states([old[-1][1]])
    new = [_train(shards, batch=6, state=state, process_index=j, process_count=2) for j in (0, 1)]
    run = [_take(p, 3) for p in new]
    assert all("carry" in s for r in run for _, s in r[:1])
    mid = combine_states([r[0][1] for r in run])  # saved by the 2 new hosts while carrying
    for j in (0, 1):
        resumed = _take(_train(shards, batch=6, state=mid, process_index=j, process_count=2), 2)
        for (b, s), (rb, rs) in zip(run[j][1:], resumed):
            assert rs == s
            for key in b:
                np.testing.assert_array_equal(rb[key], b[key])
