"""tf.data pipelines over paired image-text TFRecord shards: training (resumable) and evaluation.

Training order is a pure function of (seed, epoch, host): each epoch permutes the shard list with a
stateless seed, interleaves records deterministically, shuffles with a seeded buffer and numbers
the shuffled records 0, 1, 2, ... (their *position*). Augmentation seeds derive from
(seed, epoch, host, position) through stateless ops. The reader's state after a batch is
{epoch, offset = last position in the batch + 1, skipped}, so resuming rebuilds that epoch and
skips `offset` records *before* decoding. Batches never straddle epochs (the remainder of an
epoch is dropped); a record that cannot be used (corrupt image, missing image, empty or non-UTF-8
caption) is dropped deterministically and counted in `skipped`.

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

import dataclasses
import functools
import json
import logging
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from clipjax.data import schema

log = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_SHUFFLE_BUFFER = 5_000  # encoded records (not decoded images)
_HOST_STRIDE = 1 << 20  # epoch and host share one seed word: epoch * stride + host


# ---------------------------------------------------------------------------------------------
# Shard lists and validation
# ---------------------------------------------------------------------------------------------

def list_shards(patterns: str | Sequence[str]) -> list[str]:
    """Sorted shard paths from globs / paths (a string may hold several, comma-separated).

    Uses tf.io.gfile, so gs:// and other registered filesystems work. A pattern matching nothing
    is an error naming it.
    """
    import tensorflow as tf

    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    patterns = [p.strip() for p in patterns]
    if not patterns:
        raise ValueError("no shard pattern given; expected a glob like 'data/train-*.tfrecord'")
    files: set[str] = set()
    for p in patterns:
        matches = tf.io.gfile.glob(p)
        if not matches:
            raise ValueError(f"shard pattern {p!r} matches no files; expected TFRecord shards "
                             "written by clipjax.data.make_shards or img2dataset")
        files.update(m for m in matches if not tf.io.gfile.isdir(m))
    if not files:
        raise ValueError(f"shard patterns {patterns} match only directories, no files")
    return sorted(files)


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What `validate_shards` found in the first record of every (non-empty) shard."""

    files: tuple[str, ...]
    has_label: bool
    has_tokens: bool
    empty: tuple[str, ...] = ()


def validate_shards(files: Sequence[str]) -> ShardInfo:
    """Read the first record of each shard; ValueError naming the file if it is unreadable or
    lacks the `jpg` / `txt` features. Cheap: one record per file, no image decoding."""
    import tensorflow as tf

    if not files:
        raise ValueError("no shard files to validate")
    empty, labels, tokens = [], [], []
    for path in files:
        try:
            first = list(tf.data.TFRecordDataset(path).take(1).as_numpy_iterator())
        except (tf.errors.OpError, OSError) as e:
            raise ValueError(f"shard {path}: unreadable ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); expected an "
                             "uncompressed TFRecord file") from None
        if not first:
            empty.append(path)
            continue
        try:
            kinds = schema.example_features(first[0])
        except Exception as e:  # protobuf DecodeError and friends
            raise ValueError(f"shard {path}: first record is not a tf.train.Example ({e}); "
                             "expected TFRecord shards of serialized Examples") from None
        problems = [f"'{k}' ({what})" for k, what in
                    ((schema.IMAGE, "encoded image bytes"), (schema.TEXT, "UTF-8 caption bytes"))
                    if kinds.get(k) != "bytes"]
        if problems:
            raise ValueError(f"shard {path}: first record lacks {' and '.join(problems)}; it has "
                             f"{kinds}. Expected img2dataset-style records with features 'jpg', "
                             "'txt' and 'key' (see clipjax.data.schema)")
        labels.append(kinds.get(schema.LABEL) == "int64")
        tokens.append(kinds.get(schema.TOKENS) == "int64")
    if len(empty) == len(files):
        raise ValueError(f"all {len(files)} shards are empty (e.g. {files[0]})")
    if empty:
        log.warning("%d empty shards (e.g. %s)", len(empty), empty[0])
    return ShardInfo(tuple(files), all(labels), all(tokens), tuple(empty))


def dataset_classnames(shards: str | Sequence[str]) -> list[str] | None:
    """Class names recorded by the shard writer (manifest.json next to the first shard), or None
    when the shards were not written with labels by make_shards (e.g. img2dataset output)."""
    import tensorflow as tf

    manifest = os.path.join(os.path.dirname(list_shards(shards)[0]), schema.MANIFEST)
    if not tf.io.gfile.exists(manifest):
        return None
    with tf.io.gfile.GFile(manifest) as f:
        try:
            return json.load(f).get("classnames")
        except ValueError as e:
            raise ValueError(f"{manifest}: not valid JSON ({e})") from None


def host_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"global batch {global_batch} must be a positive multiple of the "
                         f"process count {process_count}")
    return global_batch // process_count


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


# ---------------------------------------------------------------------------------------------
# Record parsing (shared by train and eval)
# ---------------------------------------------------------------------------------------------

def _parse(serialized, info: ShardInfo):
    """Parse with defaults so a record missing a feature is filtered out, not an error."""
    import tensorflow as tf

    spec = {
        schema.IMAGE: tf.io.FixedLenFeature([], tf.string, default_value=""),
        schema.TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
        schema.KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    if info.has_label:
        spec[schema.LABEL] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    if info.has_tokens:
        spec[schema.TOKENS] = tf.io.VarLenFeature(tf.int64)
    ex = tf.io.parse_single_example(serialized, spec)
    if info.has_tokens:
        ex[schema.TOKENS] = tf.sparse.to_dense(ex[schema.TOKENS])
    return ex


def _usable(ex, info: ShardInfo):
    """True for records with an image, a non-empty valid UTF-8 caption (and label/tokens)."""
    import tensorflow as tf

    txt = ex[schema.TEXT]
    # Transcoding replaces invalid bytes by U+FFFD, so it is the identity exactly on valid UTF-8.
    valid = tf.equal(tf.strings.unicode_transcode(txt, "UTF-8", "UTF-8", errors="replace",
                                                  replacement_char=0xFFFD), txt)
    ok = (tf.strings.length(ex[schema.IMAGE]) > 0) & valid & (
        tf.strings.length(tf.strings.strip(txt)) > 0)
    if info.has_label:
        ok &= ex[schema.LABEL] >= 0
    if info.has_tokens:
        ok &= tf.size(ex[schema.TOKENS]) > 0
    return ok


def _optional_fields(ex: dict, info, context_length: int) -> dict:
    """The label and pre-tokenized ids of a parsed record, where the shards have them."""
    import tensorflow as tf

    out = {}
    if info.has_label:
        out["label"] = tf.cast(ex[schema.LABEL], tf.int32)
    if info.has_tokens:
        out[schema.TOKENS] = _fit_tokens(ex[schema.TOKENS], context_length)
    return out


def _fit_tokens(ids, context_length: int):
    """Pre-tokenized ids -> int32 [L]: zero-padded, or truncated keeping the end token last."""
    import tensorflow as tf
    from clipjax.data.tokenizer import EOT_ID

    ids = tf.cast(ids, tf.int32)
    n = tf.size(ids)
    truncated = tf.concat([ids[:context_length - 1], [EOT_ID]], 0)
    padded = tf.pad(ids, [[0, tf.maximum(context_length - n, 0)]])
    out = tf.cond(n > context_length, lambda: truncated, lambda: padded[:context_length])
    return tf.ensure_shape(out, [context_length])


def _tokenize_batch(batch, context_length: int, info: ShardInfo):
    from clipjax.data.tokenizer import tokenize_tf

    if info.has_tokens:
        batch["text"] = batch.pop(schema.TOKENS)
    else:
        batch["text"] = tokenize_tf(batch[schema.TEXT], context_length)
    return batch


def train_image(encoded, size: int, seed, scale=(0.9, 1.0)):
    """Decode + random resized crop + CLIP normalisation: float32 [size, size, 3].

    The crop window is `transforms.random_resized_crop_box(seed, scale)` (as in
    `transforms.train_transform`); the resize is cheaper than that function's antialiased bicubic
    (TF's ScaleAndTranslate kernel, which took over half the per-image time): a crop more than
    twice the output is first shrunk by the integer factor k = floor(short side / size) with an
    area (k x k mean) filter, then resized with plain bicubic, whose scale is then in (0.5, 1] or
    an upscale, where aliasing is negligible (the < k trailing rows/columns of the window that
    do not fill a block are dropped: a marginally smaller random crop). Normalisation is one fused multiply-add over
    full-shape constants (TF's CPU kernels broadcast a trailing dim of 3 slowly).
    """
    import tensorflow as tf
    from clipjax.data import transforms

    image = transforms.decode_image(encoded)
    begin, crop_size = transforms.random_resized_crop_box(tf.shape(image), seed, scale)
    crop = tf.cast(tf.slice(image, begin, crop_size), tf.float32)
    k = tf.maximum(tf.minimum(crop_size[0], crop_size[1]) // size, 1)
    crop = tf.cond(k > 1, lambda: _area_shrink(crop, k), lambda: crop)
    resized = tf.image.resize(crop, [size, size], method="bicubic", antialias=False)
    mul, add = _normalize_constants(size)
    out = tf.clip_by_value(resized, 0.0, 255.0) * mul + add
    out.set_shape([size, size, 3])
    return out


def _area_shrink(image, k):
    """Mean over k x k blocks (trailing rows/columns that do not fill a block are dropped)."""
    import tensorflow as tf

    h, w = tf.shape(image)[0] // k * k, tf.shape(image)[1] // k * k
    blocks = tf.reshape(image[:h, :w], [h // k, k, w // k, k, 3])
    return tf.reduce_mean(blocks, axis=[1, 3])


@functools.lru_cache(maxsize=8)
def _normalize_constants(size: int):
    """(1 / (255 std), -mean / std) broadcast to [size, size, 3] float32 (numpy)."""
    from clipjax.data import transforms

    mean = np.asarray(transforms.CLIP_MEAN, np.float32)
    std = np.asarray(transforms.CLIP_STD, np.float32)
    shape = (size, size, 3)
    return (np.broadcast_to(1.0 / (255.0 * std), shape).copy(),
            np.broadcast_to(-mean / std, shape).copy())


def _options(threads: int | None):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    if threads is not None:
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
    return options


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def gather_state(local_state: dict) -> dict:
    """One JSON-able data state for the checkpoint: every host's {epoch, offset, skipped}.

    A collective when there are several processes (call it on all of them at the same step).
    """
    import jax

    row = np.array([local_state["epoch"], local_state["offset"], local_state["skipped"]],
                   np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, 3)
    else:
        rows = row[None]
    return {"version": STATE_VERSION, "seed": local_state["seed"],
            "process_count": int(rows.shape[0]),
            "hosts": [{"epoch": int(e), "offset": int(o), "skipped": int(s)} for e, o, s in rows]}


class TrainPipeline:
    """Endless, exactly resumable training batches for this host.

    Iterating yields `(batch, state)`: `batch` is a dict of numpy arrays, 'image' float32
    [b, S, S, 3] (random resized crop, CLIP-normalised), 'text' int32 [b, L] and, when the
    shards carry labels, 'label' int32 [b]; b = global_batch / process_count. `state` is this
    host's JSON-able position after that batch: {seed, epoch, offset, skipped}. Checkpoint
    `gather_state(state)`; pass it back as `TrainPipeline(..., state=...)` to continue with
    exactly the batch that would have come next.
    """

    def __init__(self, shards: str | Sequence[str], *, global_batch: int, image_size: int,
                 context_length: int = 77, seed: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, crop_scale=(0.9, 1.0),
                 cycle_length: int = 16, prefetch: int = 2, threads: int | None = None,
                 state: dict | None = None, process_index: int | None = None,
                 process_count: int | None = None):
        self.process_index, self.process_count = _process_info(process_index, process_count)
        self.batch_size = host_batch_size(global_batch, self.process_count)
        if image_size < 1 or context_length < 2 or shuffle_buffer < 1:
            raise ValueError(f"bad pipeline sizes: image_size={image_size}, "
                             f"context_length={context_length}, shuffle_buffer={shuffle_buffer}")
        all_files = list_shards(shards)
        self.record_split = len(all_files) < self.process_count
        if self.record_split:
            log.warning("%d shards for %d hosts: every host reads all shards and keeps every "
                        "%d-th record", len(all_files), self.process_count, self.process_count)
            self.files = all_files
        else:
            self.files = all_files[self.process_index::self.process_count]
        self.info = validate_shards(self.files)
        self.image_size, self.context_length = image_size, context_length
        self.seed, self.shuffle_buffer = int(seed), shuffle_buffer
        self.crop_scale = tuple(crop_scale)
        self.cycle_length = max(1, min(cycle_length, len(self.files)))
        self.prefetch, self.threads = prefetch, threads
        # An epoch without one full batch would make the endless stream spin: refuse it when
        # the writer's manifests tell the counts (counting img2dataset shards means reading them).
        known = count_records(self.files, manifest_only=True)
        if known is not None:
            mine = (len(range(self.process_index, known, self.process_count))
                    if self.record_split else known)
            if mine < self.batch_size:
                raise ValueError(f"host {self.process_index} gets {mine} records per epoch from "
                                 f"{len(self.files)} shards, fewer than its batch of "
                                 f"{self.batch_size}; use a smaller global batch or more data")
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
                    "exactly; restart the data from a fresh state (state=None)")
            local = state["hosts"][self.process_index]
        else:
            local = state
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state has seed {state.get('seed')}, pipeline has {self.seed}")
        try:
            self._state = {"seed": self.seed, "epoch": int(local["epoch"]),
                           "offset": int(local["offset"]), "skipped": int(local["skipped"])}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad data state {state!r}: expected keys epoch, offset, skipped "
                             f"({e})") from None

    # -- tf.data graph --------------------------------------------------------------------
    def _epoch_dataset(self, epoch, start_epoch: int, start_offset: int):
        import tensorflow as tf

        info, n = self.info, len(self.files)
        host = 0 if self.record_split else self.process_index
        keys = tf.random.stateless_uniform(
            [3], seed=tf.stack([tf.constant(self.seed, tf.int64), epoch * _HOST_STRIDE + host]),
            dtype=tf.int64, minval=None, maxval=None)
        # The file order depends on (seed, epoch) only, so a record-level split sees one stream.
        order = tf.argsort(tf.random.stateless_uniform(
            [n], seed=tf.stack([tf.constant(self.seed, tf.int64), epoch])))
        files = tf.data.Dataset.from_tensor_slices(tf.gather(tf.constant(self.files), order))
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=self.cycle_length,
                              block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
        if self.record_split:
            ds = ds.shard(self.process_count, self.process_index)
        ds = ds.shuffle(self.shuffle_buffer, seed=tf.math.floormod(keys[0], 1 << 62),
                        reshuffle_each_iteration=False)
        ds = ds.enumerate()  # position in this epoch's shuffled stream
        ds = ds.skip(tf.where(tf.equal(epoch, start_epoch), tf.constant(start_offset, tf.int64),
                              tf.constant(0, tf.int64)))
        ds = ds.map(lambda pos, rec: (pos, _parse(rec, info)))
        ds = ds.filter(lambda pos, ex: _usable(ex, info))
        size, scale, aug_key = self.image_size, self.crop_scale, keys[1]

        def decode(pos, ex):
            seed = tf.random.stateless_uniform([2], seed=tf.stack([aug_key, pos]),
                                               dtype=tf.int32, minval=None, maxval=None)
            image = train_image(ex[schema.IMAGE], size, seed, scale=scale)
            out = {"image": image, schema.TEXT: ex[schema.TEXT],
                   "_epoch": tf.fill([], epoch), "_pos": pos}
            return out | _optional_fields(ex, info, self.context_length)

        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors()  # undecodable images: dropped, counted from position gaps
        return ds.batch(self.batch_size, drop_remainder=True)

    def dataset(self, start_epoch: int = 0, start_offset: int = 0):
        """The endless tf.data.Dataset of batches from (start_epoch, start_offset)."""
        import tensorflow as tf

        ds = tf.data.Dataset.range(start_epoch, 1 << 40).flat_map(
            lambda e: self._epoch_dataset(e, start_epoch, start_offset))
        ds = ds.map(lambda b: _tokenize_batch(b, self.context_length, self.info),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.map(lambda b: {k: v for k, v in b.items() if k not in (schema.TEXT,)})
        return ds.prefetch(self.prefetch).with_options(_options(self.threads))

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        state = dict(self._state)
        for batch in self.dataset(state["epoch"], state["offset"]).as_numpy_iterator():
            epoch, last = int(batch.pop("_epoch")[-1]), int(batch.pop("_pos")[-1])
            first = state["offset"] if epoch == state["epoch"] else 0
            state = {"seed": self.seed, "epoch": epoch, "offset": last + 1,
                     "skipped": state["skipped"] + (last + 1 - first) - self.batch_size}
            self._state = state
            yield batch, dict(state)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def count_records(files: Sequence[str], manifest_only: bool = False) -> int | None:
    """Records in `files`: from a writer's manifest.json next to them when it lists the file,
    otherwise by reading the file (no decoding) or, with `manifest_only`, None."""
    import tensorflow as tf

    total, manifests = 0, {}
    for path in files:
        directory, name = os.path.split(path)
        if directory not in manifests:
            manifests[directory] = {}
            mpath = os.path.join(directory, schema.MANIFEST)
            if tf.io.gfile.exists(mpath):
                try:
                    with tf.io.gfile.GFile(mpath) as f:
                        m = json.load(f)
                    manifests[directory] = {s["file"]: s["count"] for s in m.get("shards", [])}
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring unparsable %s", mpath)
        count = manifests[directory].get(name)
        if count is None and manifest_only:
            return None
        if count is None:
            count = int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
        total += count
    return total


class EvalPipeline:
    """Deterministic evaluation batches: every record exactly once, no augmentation.

    Yields dicts of numpy arrays of a fixed host batch b = global_batch / process_count:
    'image' float32 [b,S,S,3] (resize + centre crop), 'text' int32 [b,L], 'mask' bool [b]
    (False on padding), 'key' and 'caption' (str object arrays), and 'label' int32 [b] when the
    shards carry labels. Records are split i::n across hosts; every host yields `num_batches`
    batches (padding with masked rows) so global arrays line up. Several captions of one image
    are records sharing a `key` (group by key for retrieval). Unusable records are dropped and
    counted in `skipped` once iteration finishes.
    """

    def __init__(self, shards: str | Sequence[str], *, global_batch: int, image_size: int,
                 context_length: int = 77, threads: int | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        self.process_index, self.process_count = _process_info(process_index, process_count)
        self.batch_size = host_batch_size(global_batch, self.process_count)
        self.files = list_shards(shards)
        self.info = validate_shards(self.files)
        self.image_size, self.context_length, self.threads = image_size, context_length, threads
        self.num_records = count_records(self.files)
        per_host = math.ceil(self.num_records / self.process_count)
        self.num_batches = max(1, math.ceil(per_host / self.batch_size))
        self.skipped = 0

    def dataset(self):
        import tensorflow as tf
        from clipjax.data import transforms

        info, size = self.info, self.image_size
        ds = tf.data.TFRecordDataset(list(self.files))
        ds = ds.shard(self.process_count, self.process_index)
        ds = ds.map(lambda rec: _parse(rec, info)).filter(lambda ex: _usable(ex, info))

        def decode(ex):
            out = {"image": transforms.eval_transform(transforms.decode_image(ex[schema.IMAGE]),
                                                      size),
                   "caption": ex[schema.TEXT], "key": ex[schema.KEY]}
            return out | _optional_fields(ex, info, self.context_length)

        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors().batch(self.batch_size)

        def tokenize(b):
            b[schema.TEXT] = b["caption"]
            b = _tokenize_batch(b, self.context_length, info)
            b.pop(schema.TEXT, None)
            return b

        ds = ds.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(2).with_options(_options(self.threads))

    def _pad(self, batch: dict[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
        b = self.batch_size
        if batch is None:  # an all-padding batch
            batch = {"image": np.zeros((0, self.image_size, self.image_size, 3), np.float32),
                     "text": np.zeros((0, self.context_length), np.int32),
                     "caption": np.zeros((0,), object), "key": np.zeros((0,), object)}
            if self.info.has_label:
                batch["label"] = np.zeros((0,), np.int32)
        out = {}
        for k, v in batch.items():
            if v.dtype.kind in "SO":
                v = np.array([x.decode("utf-8") for x in v] + [""] * (b - len(v)), dtype=object)
            else:
                v = np.concatenate([v, np.zeros((b - len(v),) + v.shape[1:], v.dtype)])
            out[k] = v
        out["mask"] = np.arange(b) < n
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        yielded = real = 0
        for batch in self.dataset().as_numpy_iterator():
            n = len(batch["image"])
            real += n
            yielded += 1
            if yielded > self.num_batches:
                raise RuntimeError(f"eval shards hold more records than counted "
                                   f"({self.num_records}); did a manifest go stale?")
            yield self._pad(batch, n)
        for _ in range(self.num_batches - yielded):
            yield self._pad(None, 0)
        mine = len(range(self.process_index, self.num_records, self.process_count))
        self.skipped = mine - real
        if self.skipped:
            log.warning("eval: skipped %d unusable records on this host", self.skipped)


# ---------------------------------------------------------------------------------------------
# Host batches -> global jax.Arrays
# ---------------------------------------------------------------------------------------------

def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, Any]:
    """Host-local numpy batch -> global jax.Arrays split over the mesh's batch axes
    ('data', 'fsdp'). String entries (keys, captions) stay on the host and are left out."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from clipjax.parallel.mesh import BATCH_AXES

    sharding = NamedSharding(mesh, P(BATCH_AXES))
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in batch.items() if v.dtype.kind not in "SOU"}


def prefetch_to_device(batches: Iterable, mesh, size: int = 2) -> Iterator:
    """Keep `size` batches in flight on the devices. Items may be batch dicts or
    (batch, state) pairs as yielded by TrainPipeline; the shape of items is preserved."""
    queue: deque = deque()

    def put(item):
        if isinstance(item, tuple):
            return (to_global(item[0], mesh),) + tuple(item[1:])
        return to_global(item, mesh)

    it = iter(batches)
    for item in it:
        queue.append(put(item))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
