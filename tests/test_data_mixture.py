"""Weighted mixtures: draw proportions, weight 0, without-replacement epochs, exact resume (also
across a change of process count) and config validation."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clipjax.data import schema
from clipjax.data.mixture import MixturePipeline, combine_mixture_states, mixture_metrics
from clipjax.data.train_pipeline import TrainPipeline, gather_state
from clipjax.train import config as config_lib

SIZES = {"a": 40, "b": 20}  # source a: labels 0..39, source b: 1000..1019
BAD = {3, 10, 1005}  # corrupt images: dropped and counted


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    for name, base in (("a", 0), ("b", 1000)):
        for s in range(2):
            with tf.io.TFRecordWriter(str(d / f"{name}-{s}.tfrecord")) as w:
                for i in range(base + s, base + SIZES[name], 2):
                    image = _jpeg(i)[:30] if i in BAD else _jpeg(i)
                    w.write(schema.make_example(image, f"photo {i}", f"k{i}", label=i))
    return {
        "a": {"shards": str(d / "a-*.tfrecord"), "weight": 3},
        "b": {"shards": str(d / "b-*.tfrecord"), "weight": 1.0},
        "z": {"shards": str(d / "b-*.tfrecord"), "weight": 0},  # left out
    }


def _pipe(data, state=None, resampled=True, index=0, count=1, batch=4, **kw):
    return MixturePipeline(
        data,
        global_batch=batch,
        image_size=8,
        context_length=16,
        seed=1,
        shuffle_buffer=8,
        resampled=resampled,
        state=state,
        process_index=index,
        process_count=count,
        **kw,
    )


def _take(pipe, n):
    it = iter(pipe)
    return [next(it) for _ in range(n)]


def test_draw_proportions_within_sampling_error_and_weight_zero_left_out(data):
    pipe = _pipe(data)
    assert pipe.names == ["a", "b"] and np.allclose(pipe.shares, [0.75, 0.25])
    draws = next(pipe._draws(0, 0).batch(20_000).as_numpy_iterator())
    share = np.mean(draws == 0)
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 20_000)  # 4 sigma: ~0.012
    # the draws from position k continue the same sequence (what a resume relies on)
    later = next(pipe._draws(0, 5000).batch(100).as_numpy_iterator())
    np.testing.assert_array_equal(later, draws[5000:5100])
    run = _take(pipe, 12)
    labels = np.concatenate([b["label"] for b, _ in run])
    state = run[-1][1]
    assert state["seen"] == {"a": int(np.sum(labels < 1000)), "b": int(np.sum(labels >= 1000))}
    metrics = mixture_metrics(gather_state(state))
    assert metrics["data/seen/a"] + metrics["data/seen/b"] == 48
    assert metrics["data/share/a"] == pytest.approx(np.mean(labels < 1000))
    assert metrics["data/skipped"] == state["skipped"]
    again = np.concatenate([b["label"] for b, _ in _take(_pipe(data), 12)])
    np.testing.assert_array_equal(labels, again)  # deterministic in the seed


def test_without_replacement_reads_each_record_at_most_once_per_epoch(data):
    run = _take(_pipe(data, resampled=False), 18)  # a (3/4 of the draws) ends after ~53
    epoch0 = [b["label"] for b, s in run if s["mix_epoch"] == 0]
    labels = np.concatenate(epoch0)
    assert len(set(labels)) == len(labels)
    assert run[-1][1]["mix_epoch"] == 1
    # the epoch ends when the first source runs out, before the other is read through
    assert len(labels) < sum(SIZES.values()) - len(BAD)
    capped = _take(_pipe(data, resampled=False, epoch_samples=16), 5)
    assert all(s["mix_pos"] <= 16 for _, s in capped)
    assert [s["mix_epoch"] for _, s in capped][-1] >= 1


@pytest.mark.parametrize("resampled", [True, False])
def test_resume_mid_epoch_yields_exactly_the_same_batches(data, resampled):
    run = _take(_pipe(data, resampled=resampled), 18)
    epochs = [s["mix_epoch"] for _, s in run]
    # without replacement: also from the last batch of mixture epoch 0 (epoch 1 is ahead)
    for k in (3, 12 if resampled else epochs.index(1)):
        state = gather_state(run[k - 1][1])
        assert state["sources"] == ["a", "b"] and state["process_count"] == 1
        resumed = _take(_pipe(data, state=state, resampled=resampled), 4)
        for (b, s), (rb, rs) in zip(run[k : k + 4], resumed):
            assert rs == s
            for key in b:
                np.testing.assert_array_equal(rb[key], b[key], err_msg=f"resume at {k}: {key}")


def test_resume_on_another_process_count_carries_each_source(data):
    """Saved by 2 hosts, resumed on 1: while a source's old-host records are carried, none of
    them was seen before; resuming inside the carried records is exact."""
    old = [_take(_pipe(data, index=i, count=2), 2) for i in range(2)]
    seen = {int(x) for run in old for b, _ in run for x in b["label"]}
    state = combine_mixture_states([run[-1][1] for run in old])
    new = _take(_pipe(data, state=state), 4)
    assert all(s["sources"][n].get("carry") for _, s in new[:1] for n in ("a", "b"))
    for (b, s), prev in zip(new, [state] + [s for _, s in new]):
        carrying = [
            n for n in ("a", "b") if prev is state or prev["sources"][n]["carry"]["offset"] >= 0
        ]
        if set(carrying) == {"a", "b"}:
            assert not seen & {int(x) for x in b["label"]}
    assert sum(new[-1][1]["seen"].values()) == 2 * 2 * 2 + 4 * 4  # the old hosts' counts too
    mid = gather_state(new[1][1])
    resumed = _take(_pipe(data, state=mid), 2)
    for (b, s), (rb, rs) in zip(new[2:], resumed):
        assert rs == s
        np.testing.assert_array_equal(rb["label"], b["label"])


def test_bad_mixture_configs_name_the_key(data):
    def check(train, match, **data_kw):
        c = config_lib.base_config()
        c.data.train = train
        c.batch_size, c.num_steps, c.optimizer.warmup_steps = 8, 10, 1
        for k, v in data_kw.items():
            c.data[k] = v
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate(c, 1)

    a = data["a"]["shards"]
    check({"a": {"shards": a, "wieght": 1}}, r"config\.data\.train\.a\.wieght: unknown source")
    check({"a": {"shards": a, "weight": -1}}, r"config\.data\.train\.a\.weight=-1")
    check({"a": {"shards": a, "weight": 0}}, r"config\.data\.train: every source has weight 0")
    check({"a": {"shards": a + "x"}}, r"config\.data\.train\.a\.shards=.* matches no files")
    check({"a": {"shards": a, "read_windows": 0}}, r"config\.data\.train\.a\.read_windows=0")
    check({"a": {"shards": a}}, r"config\.data\.epoch_samples", epoch_samples=-1)
    with pytest.raises(ValueError, match="single shard glob"):
        _pipe(data, state={"seed": 1, "epoch": 0, "offset": 0, "skipped": 0})
    mixed = {"seed": 1, "process_count": 1, "sources": ["a", "b"], "hosts": []}
    with pytest.raises(ValueError, match=r"mixture of sources \['a', 'b'\], but config.data.train"):
        TrainPipeline(
            a, global_batch=4, image_size=8, seed=1, state=mixed, process_index=0, process_count=1
        )
