"""Shard lists, validation and the writer's manifest (record counts, class names).

Uses tf.io.gfile, so gs:// and other registered filesystems work. Also the host split every
pipeline shares: which process this is and its share of the global batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from clipjax.data import schema
from clipjax.files import expand_globs, read_text_if_exists, split_patterns

log = logging.getLogger(__name__)


def list_shards(patterns: str | Sequence[str]) -> list[str]:
    """Sorted shard paths from globs / paths (a string may hold several, comma-separated).

    Remote patterns (gs://, ...) go through tf.io.gfile. A pattern matching nothing is an error
    naming it.
    """
    patterns = split_patterns(patterns)
    if not patterns:
        raise ValueError("no shard pattern given; expected a glob like 'data/train-*.tfrecord'")
    files = expand_globs(
        patterns,
        missing=lambda p: ValueError(
            f"shard pattern {p!r} matches no files; expected TFRecord shards written by "
            "clipjax.data.make_shards or img2dataset"
        ),
    )
    files = [f for f in files if not _is_dir(f)]
    if not files:
        raise ValueError(f"shard patterns {patterns} match only directories, no files")
    return sorted(files)


def _is_dir(path: str) -> bool:
    if "://" not in path:
        return os.path.isdir(path)
    import tensorflow as tf

    return tf.io.gfile.isdir(path)


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What `validate_shards` found in the first record of every (non-empty) shard."""

    files: tuple[str, ...]
    has_label: bool
    has_tokens: bool
    empty: tuple[str, ...] = ()
    # `txt` then the named caption fields (`txt_<name>`) of any shard's first record, sorted
    caption_fields: tuple[str, ...] = (schema.TEXT,)


def validate_shards(files: Sequence[str]) -> ShardInfo:
    """Read the first record of each shard; ValueError naming the file if it is unreadable or
    lacks the `jpg` / `txt` features. Cheap: one record per file, no image decoding."""
    import tensorflow as tf

    if not files:
        raise ValueError("no shard files to validate")
    empty, labels, tokens, fields = [], [], [], set()
    for path in files:
        try:
            first = list(tf.data.TFRecordDataset(path).take(1).as_numpy_iterator())
        except (tf.errors.OpError, OSError) as e:
            raise ValueError(
                f"shard {path}: unreadable ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); expected an "
                "uncompressed TFRecord file"
            ) from None
        if not first:
            empty.append(path)
            continue
        try:
            kinds = schema.example_features(first[0])
        except Exception as e:  # protobuf DecodeError and friends
            raise ValueError(
                f"shard {path}: first record is not a tf.train.Example ({e}); "
                "expected TFRecord shards of serialized Examples"
            ) from None
        problems = [
            f"'{k}' ({what})"
            for k, what in (
                (schema.IMAGE, "encoded image bytes"),
                (schema.TEXT, "UTF-8 caption bytes"),
            )
            if kinds.get(k) != "bytes"
        ]
        if problems:
            raise ValueError(
                f"shard {path}: first record lacks {' and '.join(problems)}; it has "
                f"{kinds}. Expected img2dataset-style records with features 'jpg', "
                "'txt' and 'key' (see clipjax.data.schema)"
            )
        labels.append(kinds.get(schema.LABEL) == "int64")
        tokens.append(kinds.get(schema.TOKENS) == "int64")
        fields |= {k for k, v in kinds.items() if schema.is_caption_field(k) and v == "bytes"}
    if len(empty) == len(files):
        raise ValueError(f"all {len(files)} shards are empty (e.g. {files[0]})")
    if empty:
        log.warning("%d empty shards (e.g. %s)", len(empty), empty[0])
    return ShardInfo(
        tuple(files), all(labels), all(tokens), tuple(empty), caption_field_order(fields)
    )


def caption_field_order(fields) -> tuple[str, ...]:
    """A ShardInfo's caption fields from any collection of them: `txt`, then the named ones
    (`txt_<name>`) sorted."""
    return (schema.TEXT,) + tuple(sorted(set(fields) - {schema.TEXT}))


def dataset_classnames(shards: str | Sequence[str]) -> list[str] | None:
    """Class names recorded by the shard writer (manifest.json next to the first shard), or None
    when the shards were not written with labels by make_shards (e.g. img2dataset output)."""
    manifest = os.path.join(os.path.dirname(list_shards(shards)[0]), schema.MANIFEST)
    text = read_text_if_exists(manifest)
    if text is None:
        return None
    try:
        names = json.loads(text).get("classnames")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{manifest}: not a JSON object ({e})") from None
    return list(names) if names else None


def host_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} must be a positive multiple of the "
            f"process count {process_count}"
        )
    return global_batch // process_count


def process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def count_records(files: Sequence[str], manifest_only: bool = False) -> int | None:
    """Records in `files` (see `record_counts`); None when `manifest_only` and one is unknown."""
    counts = record_counts(files, manifest_only)
    return None if None in counts else sum(counts)


def record_counts(files: Sequence[str], manifest_only: bool = False) -> list[int | None]:
    """Records of each file: from a writer's manifest.json next to it when it lists the file,
    otherwise by reading the file (no decoding) or, with `manifest_only`, None."""
    counts, manifests = [], {}
    for path in files:
        directory, name = os.path.split(path)
        if directory not in manifests:
            manifests[directory] = {}
            mpath = os.path.join(directory, schema.MANIFEST)
            text = read_text_if_exists(mpath)
            if text is not None:
                try:
                    m = json.loads(text)
                    manifests[directory] = {s["file"]: s["count"] for s in m.get("shards", [])}
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("ignoring unparsable %s", mpath)
        count = manifests[directory].get(name)
        if count is None and not manifest_only:
            import tensorflow as tf

            count = int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
        counts.append(count)
    return counts
