"""The resumable tf.data training pipeline over paired image-text TFRecord shards.

Training order is a pure function of (seed, epoch, host): each epoch permutes the shard list with a
stateless seed, interleaves records deterministically, shuffles with a seeded buffer and numbers
the shuffled records 0, 1, 2, ... (their *position*). Augmentation seeds derive from
(seed, epoch, host, position) through stateless ops. The reader's state after a batch is
{epoch, offset = last position in the batch + 1, skipped}, so resuming rebuilds that epoch and
skips `offset` records *before* decoding. Batches never straddle epochs (the remainder of an
epoch is dropped); a record that cannot be used (corrupt image, missing image, empty or non-UTF-8
caption) is dropped deterministically and counted in `skipped`. A record with several captions
(see `schema`) gives one per epoch, drawn from (seed, epoch, host, position) like its augmentation
(or by `caption_ratio` over named caption fields), so a resumed run draws the same.

Class-sorted shards (records written in category order) make batches of one category. Without
re-writing them, `read_windows=W` reads every shard as W windows of consecutive records, starting at
evenly spaced record positions, and interleaves the windows of the epoch's files (in a seeded
order) record by record, so consecutive records come from W places in each shard before the
shuffle buffer mixes them. The price is I/O: window k skips k/W of its shard by reading it, so an
epoch reads each shard about (W + 1) / 2 times (bytes only; images are decoded once).

Multi-host: host i reads shards[i::n]; with fewer shards than hosts every host reads all shards
and keeps records i::n (a record-level split). Each host has its own state; `gather_state` collects
them into one JSON-able dict for the checkpoint and `TrainPipeline(..., state=...)` picks its own.

A state saved by n processes restores on m != n processes (a preempted slice or a requeued job
that comes back another size) without losing or repeating a record: the rest of every old host's
epoch (its order rebuilt from (seed, epoch, old host, n)) is *carried*: the m new hosts read the
old hosts' remaining records, interleaved, and keep every m-th one (each carried record keeps its
old augmentation seed); after that, the new hosts start the next epoch with their own split. The
carried part costs every new host a read (not a decode) of all remaining bytes. A second change
of process count before the carried records are used up restarts the carry: some records are
then seen twice (a warning says so), none are lost.

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

from clipjax.data import records, schema, webdataset
from clipjax.data.shards import (
    ShardInfo,
    count_records,
    host_batch_size,
    list_shards,
    process_info,
    record_counts,
    validate_shards,
)
from clipjax.data.stream import NumpyStream

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: no carried records
DEFAULT_SHUFFLE_BUFFER = 5_000  # encoded records (not decoded images)
_HOST_STRIDE = 1 << 20  # epoch and host share one seed word: epoch * stride + host
_CAPTION_SALT = 0x5EED_CA97  # caption draws: the augmentation key xor this, and the position


def gather_state(local_state: dict) -> dict:
    """One JSON-able data state for the checkpoint: every host's {epoch, offset, skipped} (and,
    while records are carried over from another process count, its position in them).

    A collective when there are several processes (call it on all of them at the same step).
    A mixture's state (clipjax.data.mixture) is gathered by its own rules.
    """
    import jax

    if "sources" in local_state:
        from clipjax.data.mixture import gather_mixture_state

        return gather_mixture_state(local_state)
    carry = local_state.get("carry")
    row = np.array(
        [
            local_state["epoch"],
            local_state["offset"],
            local_state["skipped"],
            -1 if carry is None else carry["offset"],
        ],
        np.int64,
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, 4)
    else:
        rows = row[None]
    hosts = []
    for epoch, offset, skipped, carry_offset in rows.tolist():
        host = {"seed": local_state["seed"], "epoch": epoch, "offset": offset, "skipped": skipped}
        if carry is not None and carry_offset >= 0:  # the old hosts are the same on every host
            host["carry"] = dict(carry, offset=carry_offset)
        hosts.append(host)
    return combine_states(hosts)


def combine_states(host_states: Sequence[dict]) -> dict:
    """The checkpoint's data state from every host's own `state()`, in process order."""
    hosts, carry = [], None
    for local in host_states:
        host = {k: int(local[k]) for k in ("epoch", "offset", "skipped")}
        if local.get("carry") is not None:
            host["carry_offset"] = int(local["carry"]["offset"])
            carry = {k: local["carry"][k] for k in ("process_count", "hosts")}
        hosts.append(host)
    out = {
        "version": STATE_VERSION,
        "seed": host_states[0]["seed"],
        "process_count": len(hosts),
        "hosts": hosts,
    }
    if carry is not None:
        out["carry"] = carry
    return out


def _check_sizes(
    image_size: int, context_length: int, shuffle_buffer: int, read_windows: int
) -> None:
    """TrainPipeline's sizes are positive (a context holds at least start and end tokens)."""
    if image_size < 1 or context_length < 2 or shuffle_buffer < 1 or read_windows < 1:
        raise ValueError(
            f"bad pipeline sizes: image_size={image_size}, "
            f"context_length={context_length}, shuffle_buffer={shuffle_buffer}, "
            f"read_windows={read_windows}"
        )


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
        caption_ratio: dict[str, float] | None = None,
    ):
        self.process_index, self.process_count = process_info(process_index, process_count)
        self.batch_size = host_batch_size(global_batch, self.process_count)
        _check_sizes(image_size, context_length, shuffle_buffer, read_windows)
        self.all_files = list_shards(shards)
        self.tars = webdataset.all_tars(self.all_files)
        self.files, self.record_split = self._split(self.process_index, self.process_count)
        if self.record_split:
            log.warning(
                "%d shards for %d hosts: every host reads all shards and keeps every %d-th record",
                len(self.all_files),
                self.process_count,
                self.process_count,
            )
        validate = webdataset.validate_tars if self.tars else validate_shards
        self.info = validate(self.files)
        self.caption_weights = records.caption_weights(self.info, caption_ratio)
        self.image_size, self.context_length = image_size, context_length
        self.seed, self.shuffle_buffer = int(seed), shuffle_buffer
        self.crop_scale = tuple(crop_scale)
        self.cycle_length = max(1, cycle_length)  # capped per host by its number of files
        self.prefetch, self.threads = prefetch, threads
        self.read_windows = int(read_windows)
        self._window_tables: dict[tuple[str, ...], tuple] = {}
        self._check_epoch_holds_a_batch()
        self._state = {"seed": self.seed, "epoch": 0, "offset": 0, "skipped": 0}
        if state is not None:
            self.restore(state)

    def _check_epoch_holds_a_batch(self) -> None:
        """An epoch without one full batch would make the endless stream spin: refuse it when
        the writer's manifests (or img2dataset's stats) tell the counts (else counting means
        reading the shards)."""
        known = self.count_records(self.files, manifest_only=True)
        if known is None:
            return
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

    def count_records(self, files: Sequence[str], manifest_only: bool = False) -> int | None:
        """Records in `files` (TFRecords: the writer's manifest; tars: img2dataset's stats)."""
        if self.tars:
            return webdataset.count_samples(files, manifest_only)
        return count_records(files, manifest_only)

    # -- state ----------------------------------------------------------------------------
    def state(self) -> dict:
        """This host's position after the last batch yielded (a copy)."""
        return _copy(self._state)

    def restore(self, state: dict) -> None:
        """Continue from a state from `gather_state` (or this host's own `state()`), saved with
        this or another process count."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state has seed {state.get('seed')}, pipeline has {self.seed}")
        if "sources" in state:
            raise ValueError(
                f"the data state is of a mixture of sources {list(state['sources'])}, but "
                "config.data.train is now one glob; resume with the data config the run started "
                "with"
            )
        try:
            if "hosts" not in state:  # one host's own state()
                self._state = self.local_state(state, state.get("carry"))
            elif state.get("process_count") == self.process_count:
                local = state["hosts"][self.process_index]
                carry = state.get("carry")
                if carry is not None and local.get("carry_offset", -1) >= 0:
                    carry = dict(carry, offset=local["carry_offset"])
                else:
                    carry = None
                self._state = self.local_state(local, carry)
            else:
                self._state = self.resized_state(state)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(
                f"bad data state {state!r}: expected keys epoch, offset, skipped ({e})"
            ) from None

    def local_state(self, local: dict, carry: dict | None) -> dict:
        out = {
            "seed": self.seed,
            "epoch": int(local["epoch"]),
            "offset": int(local["offset"]),
            "skipped": int(local["skipped"]),
        }
        if carry is not None:
            out["carry"] = {
                "process_count": int(carry["process_count"]),
                "hosts": [
                    {"epoch": int(h["epoch"]), "offset": int(h["offset"])} for h in carry["hosts"]
                ],
                "offset": int(carry["offset"]),
            }
        return out

    def resized_state(self, state: dict) -> dict:
        """This host's start after a change of process count: the old hosts' remaining records
        carried, then the epoch after the newest old one."""
        old_count, hosts = int(state["process_count"]), state["hosts"]
        if len(hosts) != old_count:
            raise ValueError(f"{len(hosts)} host states for {old_count} processes")
        if "carry" in state:
            log.warning(
                "the process count changed again (%s -> %d) before the records carried over "
                "from %d processes were used up: the carry restarts from its beginning, so some "
                "of those records are seen twice this epoch (none are lost)",
                old_count,
                self.process_count,
                state["carry"]["process_count"],
            )
            carry = dict(state["carry"], offset=0)
        else:
            log.warning(
                "data state saved by %d processes, resumed on %d: the rest of each old host's "
                "epoch is read by every host, each keeping its share (every record once), then "
                "the next epoch starts with the new split",
                old_count,
                self.process_count,
            )
            carry = {
                "process_count": old_count,
                "hosts": [{"epoch": h["epoch"], "offset": h["offset"]} for h in hosts],
                "offset": 0,
            }
        total_skipped = sum(int(h["skipped"]) for h in hosts)
        local = {
            "epoch": max(int(h["epoch"]) for h in hosts) + 1,
            "offset": 0,
            "skipped": total_skipped if self.process_index == 0 else 0,
        }
        return self.local_state(local, carry)

    # -- tf.data graph --------------------------------------------------------------------
    def _split(self, host: int, count: int) -> tuple[list[str], bool]:
        """(the shards host `host` of `count` reads, whether hosts split records instead)."""
        if len(self.all_files) < count:
            return self.all_files, True
        return self.all_files[host::count], False

    def _window_table(self, files: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(file, first record, record count) of every non-empty read window of `files`."""
        key = tuple(files)
        if key not in self._window_tables:
            paths, firsts, sizes = [], [], []
            counts = webdataset.sample_counts(files) if self.tars else record_counts(files)
            for path, count in zip(files, counts):
                bounds = np.linspace(0, count, self.read_windows + 1).astype(np.int64)
                keep = bounds[1:] > bounds[:-1]
                paths += [path] * int(keep.sum())
                firsts.append(bounds[:-1][keep])
                sizes.append((bounds[1:] - bounds[:-1])[keep])
            self._window_tables[key] = (paths, np.concatenate(firsts), np.concatenate(sizes))
        return self._window_tables[key]

    def _records(self, epoch, files: list[str]):
        """The epoch's serialized records of `files`: shards (or read windows) in a (seed, epoch)
        order, interleaved record by record."""
        import tensorflow as tf

        def permuted(*columns):
            order = tf.argsort(
                tf.random.stateless_uniform(
                    [len(columns[0])], seed=tf.stack([tf.constant(self.seed, tf.int64), epoch])
                )
            )
            return tuple(tf.gather(tf.constant(c), order) for c in columns)

        file_records = webdataset.tar_dataset if self.tars else tf.data.TFRecordDataset
        if self.read_windows == 1:
            sources = tf.data.Dataset.from_tensor_slices(permuted(files)[0])
            read, cycle = file_records, max(1, min(self.cycle_length, len(files)))
        else:
            windows = self._window_table(files)
            sources = tf.data.Dataset.from_tensor_slices(permuted(*windows))

            def read(path, first, count):
                return file_records(path).skip(first).take(count)

            cycle = min(self.cycle_length * self.read_windows, len(windows[0]))
        return sources.interleave(
            records.traced(read),
            cycle_length=cycle,
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def _host_stream(self, epoch, host: int, count: int):
        """Host `host` of `count`'s epoch: (position, serialized record, augmentation key) in its
        shuffled order. A function of (seed, epoch, host, count) only, so any host can rebuild
        another's (the carry after a change of process count)."""
        import tensorflow as tf

        epoch = tf.cast(epoch, tf.int64)
        files, record_split = self._split(host, count)
        key_host = 0 if record_split else host
        keys = tf.random.stateless_uniform(
            [3],
            seed=tf.stack([tf.constant(self.seed, tf.int64), epoch * _HOST_STRIDE + key_host]),
            dtype=tf.int64,
            minval=None,
            maxval=None,
        )
        # The read order depends on (seed, epoch) only, so a record-level split sees one stream.
        ds = self._records(epoch, files)
        if record_split:
            ds = ds.shard(count, host)
        ds = ds.shuffle(
            self.shuffle_buffer,
            seed=tf.math.floormod(keys[0], 1 << 62),
            reshuffle_each_iteration=False,
        )
        return ds.enumerate().map(records.traced(lambda pos, rec: (pos, rec, keys[1])))

    def epoch_records(self, epoch, skip):
        """This host's epoch from position `skip`: (tags {_epoch, _pos, _carried=False},
        serialized record, augmentation key)."""
        import tensorflow as tf

        ds = self._host_stream(epoch, self.process_index, self.process_count).skip(skip)
        return ds.map(
            records.traced(
                lambda pos, rec, key: (_tags(tf.cast(epoch, tf.int64), pos, False), rec, key)
            )
        )

    def carried_records(self, carry: dict):
        """This host's share of the old hosts' remaining records, tagged {_epoch=-1, _pos=position
        in the share, _carried=True}."""
        import tensorflow as tf

        old = carry["process_count"]
        streams = [
            self._host_stream(h["epoch"], i, old).skip(h["offset"])
            for i, h in enumerate(carry["hosts"])
        ]
        ds = tf.data.Dataset.choose_from_datasets(
            streams, tf.data.Dataset.range(old).repeat(), stop_on_empty_dataset=False
        )
        ds = ds.shard(self.process_count, self.process_index).enumerate().skip(carry["offset"])
        return ds.map(
            records.traced(
                lambda cpos, item: (_tags(tf.constant(-1, tf.int64), cpos, True), item[1], item[2])
            )
        )

    def _batches(self, ds):
        return decode_batches(
            ds,
            self.info,
            self.image_size,
            self.crop_scale,
            self.context_length,
            self.batch_size,
            self.caption_weights,
        )

    def dataset(
        self, start_epoch: int = 0, start_offset: int = 0, carry: dict | None = None, gate=None
    ):
        """The endless tf.data.Dataset of batches from (start_epoch, start_offset), after the
        carried records (if any), which share their last batch with that epoch. `gate`: a
        NumpyStream's, applied before the tokenizer (see clipjax.data.stream)."""
        import tensorflow as tf

        first = self.epoch_records(start_epoch, start_offset)
        if carry is not None:
            first = self.carried_records(carry).concatenate(first)
        later = tf.data.Dataset.range(start_epoch + 1, 1 << 40).flat_map(
            records.traced(lambda e: self._batches(self.epoch_records(e, 0)))
        )
        ds = self._batches(first).concatenate(later)
        return finish_batches(ds, self.info, self.context_length, self.prefetch, self.threads, gate)

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """The batches from the current state; close the iterator (`.close()`, or
        `contextlib.closing`) when done with it: that stops the pipeline's threads cleanly."""
        state = dict(self._state)
        with NumpyStream(
            lambda gate: self.dataset(state["epoch"], state["offset"], state.get("carry"), gate)
        ) as stream:
            for batch in stream:
                epochs, positions = batch.pop("_epoch"), batch.pop("_pos")
                carried = batch.pop("_carried")
                state = self._advance(state, epochs, positions, carried)
                self._state = state
                yield batch, _copy(state)

    def _advance(
        self, state: dict, epochs: np.ndarray, positions: np.ndarray, carried: np.ndarray
    ) -> dict:
        """The state after a batch: positions consumed (used or skipped as unusable)."""
        state = _copy(state)
        consumed = 0
        if carried.any():
            last = int(positions[carried][-1])
            consumed += last + 1 - state["carry"]["offset"]
            state["carry"]["offset"] = last + 1
        if not carried.all():
            epoch, last = int(epochs[~carried][-1]), int(positions[~carried][-1])
            first = state["offset"] if epoch == state["epoch"] else 0
            consumed += last + 1 - first
            state.update(epoch=epoch, offset=last + 1)
            state.pop("carry", None)  # the carried records are used up
        state["skipped"] += consumed - self.batch_size
        return state


def _tags(epoch, pos, carried) -> dict:
    """A record's place in its source: epoch (-1: carried), position, carried."""
    return {"_epoch": epoch, "_pos": pos, "_carried": carried}


def decode_batches(
    ds,
    info: ShardInfo,
    size: int,
    crop_scale,
    context_length: int,
    batch: int,
    caption_weights: list[float] | None = None,
):
    """(tags, serialized record, augmentation key) -> decoded, augmented batches of `batch`
    (unusable records dropped; the tags, whose `_pos` seeds the augmentation and the caption
    draw, ride along). `caption_weights`: per caption field, see `records.pick_caption`."""
    import tensorflow as tf

    from clipjax.data.transforms import decode_train_transform

    def parse(tags, rec, key):
        ex = records.parse_record(rec, info)
        if not info.has_tokens:  # pre-tokenized ids are the first caption's
            seed = tf.stack([tf.bitwise.bitwise_xor(key, _CAPTION_SALT), tags["_pos"]])
            ex = records.pick_caption(ex, seed, caption_weights)
        return tags, ex, key

    ds = ds.map(records.traced(parse))
    ds = ds.filter(records.traced(lambda t, ex, key: records.usable(ex, info)))

    def decode(tags, ex, aug_key):
        seed = tf.random.stateless_uniform(
            [2], seed=tf.stack([aug_key, tags["_pos"]]), dtype=tf.int32, minval=None, maxval=None
        )
        image = decode_train_transform(ex[schema.IMAGE], size, seed, crop_scale=crop_scale)
        out = {"image": image, schema.TEXT: ex[schema.TEXT]} | tags
        return out | records.optional_fields(ex, info, context_length)

    ds = ds.map(records.traced(decode), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()  # undecodable images: dropped, counted from position gaps
    return ds.batch(batch, drop_remainder=True)


def finish_batches(
    ds, info: ShardInfo, context_length: int, prefetch: int, threads: int | None, gate=None
):
    """Decoded batches -> tokenized, prefetched, with the pipeline's tf.data options. `gate`: a
    NumpyStream's, applied before the tokenizer (see clipjax.data.stream)."""
    import tensorflow as tf

    if gate is not None:
        ds = gate(ds)
    ds = ds.map(
        records.traced(lambda b: records.tokenize_batch(b, context_length, info)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.map(records.traced(lambda b: {k: v for k, v in b.items() if k != schema.TEXT}))
    return ds.prefetch(prefetch).with_options(records.dataset_options(threads))


def _copy(state: dict) -> dict:
    out = dict(state)
    if "carry" in out:
        out["carry"] = dict(out["carry"])
    return out
