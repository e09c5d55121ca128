"""Progress bookkeeping: throughput, and time spent waiting for the input pipeline."""

import time

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
