"""Metric writers: console progress line, TensorBoard event files, metrics.jsonl
(process 0 only)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)
# The progress line goes to its own logger so that CLIs can print it bare.
progress_log = logging.getLogger("clipjax.progress")


def progress_to_stdout(indent: str = "") -> None:
    """Print the progress line bare on stdout (for the CLIs), not through the root logger."""
    import sys

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(indent + "%(message)s"))
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`.

    Only process 0 writes; other processes get a writer whose methods do nothing, so the loop can
    call it unconditionally. TensorFlow is imported lazily (only for the event files).
    """

    def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            # Scalars written as tensor summaries tagged for TensorBoard's scalars plugin (what
            # tensorboard's own tf.summary.scalar does), so the tensorboard package is not needed.
            meta = summary_pb2.SummaryMetadata()
            meta.plugin_data.plugin_name = "scalars"
            self._tf, self._scalar_meta = tf, meta.SerializeToString()
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in scalars.items()}
        record = {"step": int(step), "time": time.time(), **values}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            with self._tb.as_default():
                for k, v in values.items():
                    self._tf.summary.write(
                        k,
                        self._tf.constant(v, self._tf.float32),
                        step=int(step),
                        metadata=self._scalar_meta,
                    )
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """Throughput/ETA bookkeeping and the one-line console summary."""

    def __init__(self, total_steps: int, global_batch: int, start_step: int = 0):
        self.total = int(total_steps)
        self.batch = int(global_batch)
        self._t0 = time.perf_counter()
        self._s0 = int(start_step)
        self._last_t = self._t0
        self._last_s = self._s0
        self._first = True
        self._first_step_s = math.nan
        self._waited = 0.0  # seconds blocked on the input pipeline since the previous rates()

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yields from `batches`, counting the time spent waiting for each item as data wait."""
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self._waited += time.perf_counter() - t
            yield item

    def first_step_done(self, step: int, step_seconds: float = math.nan) -> None:
        """The ETA's rate is counted from here (after the first step's compilation); until a
        step more has run, the ETA assumes `step_seconds` (the first step's run time) a step."""
        self._first = False
        self._t0, self._s0 = time.perf_counter(), step
        self._first_step_s = step_seconds

    def rates(self, step: int) -> dict[str, float]:
        """images/s since the previous call, and the ETA from the rate since the first step
        finished (or, without `first_step_done`, the first call), so that compilation does not
        distort it."""
        now = time.perf_counter()
        if self._first:
            self.first_step_done(step)
        dt, ds = now - self._last_t, step - self._last_s
        self._last_t, self._last_s = now, step
        ips = ds * self.batch / dt if dt > 0 and ds > 0 else float("nan")
        wait = self._waited / dt if dt > 0 else float("nan")
        self._waited = 0.0
        elapsed, done = now - self._t0, step - self._s0
        per_step = elapsed / done if done > 0 else self._first_step_s
        eta = (self.total - step) * per_step
        return {
            "images_per_sec": ips,
            "data_wait_frac": wait,
            "eta_sec": eta,
            "elapsed_sec": elapsed,
        }

    def line(self, step: int, m: Mapping[str, Any]) -> str:
        width = len(str(self.total))
        parts = [
            f"step {step:>{width}}/{self.total}",
            f"loss {_scalar(m['loss']):.4f}",
            f"lr {_scalar(m['lr']):.2e}",
        ]
        if "temperature" in m:
            parts.append(f"temp {_scalar(m['temperature']):.4f}")
        parts.append(f"{_scalar(m.get('images_per_sec', float('nan'))):.1f} img/s")
        if "data_wait_frac" in m:
            parts.append(f"data wait {100 * _scalar(m['data_wait_frac']):.0f}%")
        parts.append(f"ETA {format_duration(_scalar(m.get('eta_sec', float('nan'))))}")
        for kind in ("label", "caption"):
            if f"batch/same_{kind}" in m:
                parts.append(f"same-{kind} pairs {100 * _scalar(m[f'batch/same_{kind}']):.0f}%")
                break
        if _scalar(m.get("nonfinite_total", 0)) > 0:
            parts.append(f"skipped {int(_scalar(m['nonfinite_total']))}")
        return " | ".join(parts)
