"""The resumable tf.data training pipeline over paired image-text TFRecord shards.

Training order is a pure function of (seed, epoch, host): each epoch permutes the shard list with a
stateless seed, interleaves records deterministically, shuffles with a seeded buffer and numbers
the shuffled records 0, 1, 2, ... (their *position*). Augmentation seeds derive from
(seed, epoch, host, position) through stateless ops. The reader's state after a batch is
{epoch, offset = last position in the batch + 1, skipped}, so resuming rebuilds that epoch and
skips `offset` records *before* decoding. Batches never straddle epochs (the remainder of an
epoch is dropped); a record that cannot be used (corrupt image, missing image, empty or non-UTF-8
caption) is dropped deterministically and counted in `skipped`.

Class-sorted shards (records written in category order) make batches of one category. Without
re-writing them, `read_windows=W` reads every shard as W windows of consecutive records, starting at
evenly spaced record positions, and interleaves the windows of the epoch's files (in a seeded
order) record by record, so consecutive records come from W places in each shard before the
shuffle buffer mixes them. The price is I/O: window k skips k/W of its shard by reading it, so an
epoch reads each shard about (W + 1) / 2 times (bytes only; images are decoded once).

Multi-host: host i reads shards[i::n]; with fewer shards than hosts every host reads all shards
and keeps records i::n (a record-level split). Each host has its own state; `gather_state` collects
them into one JSON-able dict for the checkpoint and `TrainPipeline(..., state=...)` picks its own.

    pipe = TrainPipeline("data/train-*.tfrecord", global_batch=B, image_size=S, seed=seed,
                         state=saved_data_state)            # None for a fresh run
    for batch, data_state in prefetch_to_device(pipe, mesh):  # global jax.Arrays + host state
        ...train_step(state, batch)...
        if time_to_checkpoint:                              # on every process (a collective)
            save(..., data=gather_state(data_state))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from clipjax.data import records, schema
from clipjax.data.shards import (
    count_records,
    host_batch_size,
    list_shards,
    process_info,
    record_counts,
    validate_shards,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_SHUFFLE_BUFFER = 5_000  # encoded records (not decoded images)
_HOST_STRIDE = 1 << 20  # epoch and host share one seed word: epoch * stride + host


def gather_state(local_state: dict) -> dict:
    """One JSON-able data state for the checkpoint: every host's {epoch, offset, skipped}.

    A collective when there are several processes (call it on all of them at the same step).
    """
    import jax

    row = np.array([local_state["epoch"], local_state["offset"], local_state["skipped"]], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, 3)
    else:
        rows = row[None]
    return {
        "version": STATE_VERSION,
        "seed": local_state["seed"],
        "process_count": int(rows.shape[0]),
        "hosts": [{"epoch": int(e), "offset": int(o), "skipped": int(s)} for e, o, s in rows],
    }


class TrainPipeline:
    """Endless, exactly resumable training batches for this host.

    Iterating yields `(batch, state)`: `batch` is a dict of numpy arrays, 'image' float32
    [b, S, S, 3] (random resized crop, CLIP-normalised), 'text' int32 [b, L] and, when the
    shards carry labels, 'label' int32 [b]; b = global_batch / process_count. `state` is this
    host's JSON-able position after that batch: {seed, epoch, offset, skipped}. Checkpoint
    `gather_state(state)`; pass it back as `TrainPipeline(..., state=...)` to continue with
    exactly the batch that would have come next.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        global_batch: int,
        image_size: int,
        context_length: int = 77,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        crop_scale=(0.9, 1.0),
        cycle_length: int = 16,
        read_windows: int = 1,
        prefetch: int = 2,
        threads: int | None = None,
        state: dict | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index, self.process_count = process_info(process_index, process_count)
        self.batch_size = host_batch_size(global_batch, self.process_count)
        if image_size < 1 or context_length < 2 or shuffle_buffer < 1 or read_windows < 1:
            raise ValueError(
                f"bad pipeline sizes: image_size={image_size}, "
                f"context_length={context_length}, shuffle_buffer={shuffle_buffer}, "
                f"read_windows={read_windows}"
            )
        all_files = list_shards(shards)
        self.record_split = len(all_files) < self.process_count
        if self.record_split:
            log.warning(
                "%d shards for %d hosts: every host reads all shards and keeps every %d-th record",
                len(all_files),
                self.process_count,
                self.process_count,
            )
            self.files = all_files
        else:
            self.files = all_files[self.process_index :: self.process_count]
        self.info = validate_shards(self.files)
        self.image_size, self.context_length = image_size, context_length
        self.seed, self.shuffle_buffer = int(seed), shuffle_buffer
        self.crop_scale = tuple(crop_scale)
        self.cycle_length = max(1, min(cycle_length, len(self.files)))
        self.prefetch, self.threads = prefetch, threads
        self.read_windows = int(read_windows)
        self._windows = self._window_table() if self.read_windows > 1 else None
        # An epoch without one full batch would make the endless stream spin: refuse it when
        # the writer's manifests tell the counts (counting img2dataset shards means reading them).
        known = count_records(self.files, manifest_only=True)
        if known is not None:
            mine = (
                len(range(self.process_index, known, self.process_count))
                if self.record_split
                else known
            )
            if mine < self.batch_size:
                raise ValueError(
                    f"host {self.process_index} gets {mine} records per epoch from "
                    f"{len(self.files)} shards, fewer than its batch of "
                    f"{self.batch_size}; use a smaller global batch or more data"
                )
        self._state = {"seed": self.seed, "epoch": 0, "offset": 0, "skipped": 0}
        if state is not None:
            self.restore(state)

    # -- state ----------------------------------------------------------------------------
    def state(self) -> dict:
        """This host's position after the last batch yielded (a copy)."""
        return dict(self._state)

    def restore(self, state: dict) -> None:
        """Continue from a state from `gather_state` (or this host's own `state()`)."""
        if "hosts" in state:
            if state.get("process_count") != self.process_count:
                raise ValueError(
                    f"data state was saved with {state.get('process_count')} processes, now "
                    f"{self.process_count}: the per-host order differs, so the run cannot resume "
                    "exactly; restart the data from a fresh state (state=None)"
                )
            local = state["hosts"][self.process_index]
        else:
            local = state
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state has seed {state.get('seed')}, pipeline has {self.seed}")
        try:
            self._state = {
                "seed": self.seed,
                "epoch": int(local["epoch"]),
                "offset": int(local["offset"]),
                "skipped": int(local["skipped"]),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"bad data state {state!r}: expected keys epoch, offset, skipped ({e})"
            ) from None

    # -- tf.data graph --------------------------------------------------------------------
    def _window_table(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(file, first record, record count) of every non-empty read window."""
        paths, firsts, sizes = [], [], []
        for path, count in zip(self.files, record_counts(self.files)):
            bounds = np.linspace(0, count, self.read_windows + 1).astype(np.int64)
            keep = bounds[1:] > bounds[:-1]
            paths += [path] * int(keep.sum())
            firsts.append(bounds[:-1][keep])
            sizes.append((bounds[1:] - bounds[:-1])[keep])
        return paths, np.concatenate(firsts), np.concatenate(sizes)

    def _records(self, epoch):
        """The epoch's serialized records: shards (or read windows) in a (seed, epoch) order,
        interleaved record by record."""
        import tensorflow as tf

        def permuted(*columns):
            order = tf.argsort(
                tf.random.stateless_uniform(
                    [len(columns[0])], seed=tf.stack([tf.constant(self.seed, tf.int64), epoch])
                )
            )
            return tuple(tf.gather(tf.constant(c), order) for c in columns)

        if self._windows is None:
            sources = tf.data.Dataset.from_tensor_slices(permuted(self.files)[0])
            read, cycle = tf.data.TFRecordDataset, self.cycle_length
        else:
            sources = tf.data.Dataset.from_tensor_slices(permuted(*self._windows))

            def read(path, first, count):
                return tf.data.TFRecordDataset(path).skip(first).take(count)

            cycle = min(self.cycle_length * self.read_windows, len(self._windows[0]))
        return sources.interleave(
            read,
            cycle_length=cycle,
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def _epoch_dataset(self, epoch, start_epoch: int, start_offset: int):
        import tensorflow as tf

        from clipjax.data.transforms import decode_image, train_transform

        info = self.info
        host = 0 if self.record_split else self.process_index
        keys = tf.random.stateless_uniform(
            [3],
            seed=tf.stack([tf.constant(self.seed, tf.int64), epoch * _HOST_STRIDE + host]),
            dtype=tf.int64,
            minval=None,
            maxval=None,
        )
        # The read order depends on (seed, epoch) only, so a record-level split sees one stream.
        ds = self._records(epoch)
        if self.record_split:
            ds = ds.shard(self.process_count, self.process_index)
        ds = ds.shuffle(
            self.shuffle_buffer,
            seed=tf.math.floormod(keys[0], 1 << 62),
            reshuffle_each_iteration=False,
        )
        ds = ds.enumerate()  # position in this epoch's shuffled stream
        ds = ds.skip(
            tf.where(
                tf.equal(epoch, start_epoch),
                tf.constant(start_offset, tf.int64),
                tf.constant(0, tf.int64),
            )
        )
        ds = ds.map(lambda pos, rec: (pos, records.parse_record(rec, info)))
        ds = ds.filter(lambda pos, ex: records.usable(ex, info))
        size, crop_scale, aug_key = self.image_size, self.crop_scale, keys[1]

        def decode(pos, ex):
            seed = tf.random.stateless_uniform(
                [2], seed=tf.stack([aug_key, pos]), dtype=tf.int32, minval=None, maxval=None
            )
            image = train_transform(
                decode_image(ex[schema.IMAGE]), size, seed, crop_scale=crop_scale
            )
            out = {
                "image": image,
                schema.TEXT: ex[schema.TEXT],
                "_epoch": tf.fill([], epoch),
                "_pos": pos,
            }
            return out | records.optional_fields(ex, info, self.context_length)

        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors()  # undecodable images: dropped, counted from position gaps
        return ds.batch(self.batch_size, drop_remainder=True)

    def dataset(self, start_epoch: int = 0, start_offset: int = 0):
        """The endless tf.data.Dataset of batches from (start_epoch, start_offset)."""
        import tensorflow as tf

        ds = tf.data.Dataset.range(start_epoch, 1 << 40).flat_map(
            lambda e: self._epoch_dataset(e, start_epoch, start_offset)
        )
        ds = ds.map(
            lambda b: records.tokenize_batch(b, self.context_length, self.info),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.map(lambda b: {k: v for k, v in b.items() if k not in (schema.TEXT,)})
        return ds.prefetch(self.prefetch).with_options(records.dataset_options(self.threads))

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        state = dict(self._state)
        for batch in self.dataset(state["epoch"], state["offset"]).as_numpy_iterator():
            epoch, last = int(batch.pop("_epoch")[-1]), int(batch.pop("_pos")[-1])
            first = state["offset"] if epoch == state["epoch"] else 0
            state = {
                "seed": self.seed,
                "epoch": epoch,
                "offset": last + 1,
                "skipped": state["skipped"] + (last + 1 - first) - self.batch_size,
            }
            self._state = state
            yield batch, dict(state)
