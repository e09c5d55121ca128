"""Progress bookkeeping (throughput, time spent waiting for the input pipeline) and the
clustered-batch warning."""

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
