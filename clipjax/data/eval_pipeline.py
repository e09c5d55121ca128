"""Deterministic evaluation batches over TFRecord shards: every record once, no augmentation."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np

from clipjax.data import records, schema
from clipjax.data.shards import (
    count_records,
    host_batch_size,
    list_shards,
    process_info,
    validate_shards,
)
from clipjax.data.stream import NumpyStream

log = logging.getLogger(__name__)


class EvalPipeline:
    """Deterministic evaluation batches: every record exactly once, no augmentation.

    Yields dicts of numpy arrays of a fixed host batch b = global_batch / process_count:
    'image' float32 [b,S,S,3] (resize + centre crop), 'text' int32 [b,L] (the first caption),
    'texts' int32 [b,C,L] (every caption of the record, all-zero rows past its own; C is the
    most any record of the batch has), 'mask' bool [b] (False on padding), 'key' and 'caption'
    (the first; str object arrays), and 'label' int32 [b] when the shards carry labels.
    Records are split i::n across hosts; every host yields `num_batches` batches (padding with
    masked rows) so global arrays line up. Several captions of one image are a record's list
    (or records sharing a `key`: retrieval groups by key). Unusable records are dropped and
    counted in `skipped` once iteration finishes.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        global_batch: int,
        image_size: int,
        context_length: int = 77,
        threads: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index, self.process_count = process_info(process_index, process_count)
        self.batch_size = host_batch_size(global_batch, self.process_count)
        self.files = list_shards(shards)
        self.info = validate_shards(self.files)
        self.image_size, self.context_length, self.threads = image_size, context_length, threads
        self.num_records = count_records(self.files)
        per_host = math.ceil(self.num_records / self.process_count)
        self.num_batches = max(1, math.ceil(per_host / self.batch_size))
        self.skipped = 0

    def dataset(self, gate=None):
        import tensorflow as tf

        from clipjax.data import transforms
        from clipjax.data.tokenizer import tokenize_tf

        info, size = self.info, self.image_size
        ds = tf.data.TFRecordDataset(list(self.files))
        ds = ds.shard(self.process_count, self.process_index)
        ds = ds.map(records.traced(lambda rec: records.parse_record(rec, info)))
        ds = ds.filter(records.traced(lambda ex: records.usable(ex, info)))

        def decode(ex):
            out = {
                "image": transforms.eval_transform(transforms.decode_image(ex[schema.IMAGE]), size),
                "caption": ex[schema.TEXT],
                schema.CAPTIONS: ex[schema.CAPTIONS],
                "key": ex[schema.KEY],
            }
            return out | records.optional_fields(ex, info, self.context_length)

        ds = ds.map(records.traced(decode), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors().padded_batch(self.batch_size)  # captions padded with ""
        if gate is not None:  # a NumpyStream's, before the tokenizer (clipjax.data.stream)
            ds = gate(ds)

        def tokenize(b):
            captions = b.pop(schema.CAPTIONS)
            if info.has_tokens:  # the shards' own ids are the first caption's
                b["text"] = b.pop(schema.TOKENS)
                b["texts"] = b["text"][:, None, :]
                return b
            ids = tokenize_tf(tf.reshape(captions, [-1]), self.context_length)
            ids *= tf.cast(tf.reshape(captions, [-1, 1]) != "", tf.int32)  # absent: zero rows
            b["texts"] = tf.reshape(ids, [tf.shape(captions)[0], -1, self.context_length])
            b["text"] = b["texts"][:, 0]  # the first caption (`caption`; usable: never "")
            return b

        ds = ds.map(
            records.traced(tokenize), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        return ds.prefetch(2).with_options(records.dataset_options(self.threads))

    def _pad(self, batch: dict[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
        b = self.batch_size
        if batch is None:  # an all-padding batch
            batch = {
                "image": np.zeros((0, self.image_size, self.image_size, 3), np.float32),
                "text": np.zeros((0, self.context_length), np.int32),
                "texts": np.zeros((0, 1, self.context_length), np.int32),
                "caption": np.zeros((0,), object),
                "key": np.zeros((0,), object),
            }
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
        """The padded batches; an iterator left before the end should be closed (`.close()`):
        that stops the pipeline's threads cleanly (clipjax.data.stream)."""
        yielded = real = 0
        with NumpyStream(self.dataset) as stream:
            for batch in stream:
                n = len(batch["image"])
                real += n
                yielded += 1
                if yielded > self.num_batches:
                    raise RuntimeError(
                        f"eval shards hold more records than counted "
                        f"({self.num_records}); did a manifest go stale?"
                    )
                yield self._pad(batch, n)
        for _ in range(self.num_batches - yielded):
            yield self._pad(None, 0)
        mine = len(range(self.process_index, self.num_records, self.process_count))
        self.skipped = mine - real
        if self.skipped:
            log.warning("eval: skipped %d unusable records on this host", self.skipped)
