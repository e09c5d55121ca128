"""Progress bookkeeping (throughput, time spent waiting for the input pipeline) and the
clustered-batch warning."""

import logging
import os
import time

import numpy as np

from clipjax.train.metrics import Progress


def _slow_batches(n: int, delay: float):
    for i in range(n):
        time.sleep(delay)
        yield i


def test_data_wait_counts_time_blocked_on_the_iterator_not_the_step():
    progress = Progress(total_steps=8, global_batch=4)
    progress.rates(0)
    # Input-bound: every batch takes 50 ms to arrive, the "step" takes no time.
    assert list(progress.timed(_slow_batches(4, 0.05))) == [0, 1, 2, 3]
    input_bound = progress.rates(4)
    # Compute-bound: batches are ready at once, each step takes 50 ms.
    for _ in progress.timed(range(4)):
        time.sleep(0.05)
    compute_bound = progress.rates(8)
    assert input_bound["data_wait_frac"] > 0.8
    assert compute_bound["data_wait_frac"] < 0.2
    assert 30 < compute_bound["images_per_sec"] <= 80  # 4 steps of 4 images in ~0.2 s
    line = progress.line(8, {"loss": 1.0, "lr": 1e-3, **compute_bound})
    assert "img/s" in line and "data wait " in line


def test_eta_is_known_from_the_first_progress_line():
    progress = Progress(total_steps=101, global_batch=4)
    progress.first_step_done(1, step_seconds=0.5)  # the first step ran in 0.5 s after compiling
    assert progress.rates(1)["eta_sec"] == 100 * 0.5
    time.sleep(0.1)
    later = progress.rates(11)["eta_sec"]  # from here the measured rate: ~10 ms a step
    assert 90 * 0.005 < later < 90 * 0.05
    assert "ETA ?" not in progress.line(11, {"loss": 1.0, "lr": 1e-3, "eta_sec": later})


def test_cluster_watch_warns_on_clustered_batches_only():
    """Batches of one label warn (once); random batches of the same labels do not."""
    from clipjax.losses.pairs import equal_pair_share
    from clipjax.train.hooks import ClusterWatch

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 64)

    def share(batch_labels):
        return float(equal_pair_share(np.asarray(batch_labels, np.int32)[:, None]))

    for order, clustered in ((labels, True), (rng.permutation(labels), False)):
        watch = ClusterWatch()
        warnings = []
        for i in range(0, len(order), 32):
            batch = {"label": order[i : i + 32], "text": np.zeros((32, 4), np.int32)}
            watch.observe(batch)
            warnings.append(watch.check({"batch/same_label": share(batch["label"])}))
        found = [w for w in warnings if w]
        assert len(found) == (1 if clustered else 0), found
        if clustered:
            assert "share a label" in found[0]
            assert "data.read_windows" in found[0]


def _varied_demo_shards(root, sort_by_class: bool) -> str:
    """Demo shapes without labels, captions in varied wordings (almost none identical), written
    in class order (one shard) or by make_shards' default shuffle."""
    import io

    from PIL import Image

    from clipjax.data import demo, writer

    prefixes = ("", "look: ", "here is ", "photo: ", "we see ", "snapshot, ", "found ", "new: ")
    suffixes = ("", " today", " again", " up close", " in the lab", " for you", " indeed", " now")
    items, labels = [], []
    for i in range(12 * 40):
        rng = np.random.default_rng([7, i])
        ex = demo.sample_example(rng)
        caption = prefixes[rng.integers(8)] + ex["caption"] + suffixes[rng.integers(8)]

        def read(ex=ex, rng=rng) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(demo.draw_example(ex, rng, 16)).save(buf, format="PNG")
            return buf.getvalue()

        items.append(writer.SourceItem(f"{i:05d}", f"demo[{i}]", caption, read))
        labels.append(ex["label"])
    if sort_by_class:
        items = [items[i] for i in np.argsort(labels, kind="stable")]
    out = os.path.join(root, "sorted" if sort_by_class else "shuffled")
    writer.write_shards(
        items,
        out,
        source={"kind": "test-varied-demo", "sorted": sort_by_class},
        shard_size=len(items),
        progress=False,
        shuffle_seed=None if sort_by_class else 0,
    )
    return os.path.join(out, "*.tfrecord")


def test_cluster_watch_sees_sorted_captions_without_labels_or_repeats(tmp_path, caplog):
    """Class-sorted shards, no labels, almost no identical captions: the identical-caption share
    stays low, yet the warning fires (from caption word overlap within vs across batches). The
    same records shuffled by make_shards do not warn, and neither does a collapsed model (every
    text cosine ~1) on them: the measure reads the captions, not the embeddings."""
    from types import SimpleNamespace

    from clipjax.data.train_pipeline import TrainPipeline
    from clipjax.train.hooks import ClusterWatch

    for sort_by_class in (True, False):
        pipe = TrainPipeline(
            _varied_demo_shards(str(tmp_path), sort_by_class),
            global_batch=16,
            image_size=16,
            context_length=32,
            shuffle_buffer=16,  # smaller than a class (40)
            process_index=0,
            process_count=1,
        )
        watch = ClusterWatch()
        run = SimpleNamespace(config=SimpleNamespace(log_every=5), total=100, preempted=False)
        shares = []
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clipjax.train.hooks"):
            for step, (batch, _) in enumerate(pipe, start=1):
                assert "label" not in batch
                watch.observe(batch)
                _, counts = np.unique(batch["text"], axis=0, return_counts=True)
                shares.append(float(np.sum(counts * (counts - 1)) / (16 * 15)))
                run.step = step
                # a collapsed model's figures: every caption embedded alike
                run.metrics = {"batch/same_caption": shares[-1], "batch/text_cos": 0.9999}
                run.last_metrics = dict(run.metrics)
                watch.after_step(run)
                if step == 30:
                    break
        warnings = [r.getMessage() for r in caplog.records if r.name == "clipjax.train.hooks"]
        assert np.mean(shares) < 0.05  # identical captions alone would not tell
        if sort_by_class:
            assert len(warnings) == 1, warnings
            assert "one category" in warnings[0] and "data.read_windows" in warnings[0]
            assert "make_shards" in warnings[0] and "loss.positives=auto" in warnings[0]
        else:
            assert warnings == [], warnings
        assert "batch/caption_overlap" in run.metrics  # logged at log steps
