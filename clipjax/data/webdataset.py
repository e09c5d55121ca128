"""Webdataset tars (img2dataset's default output) read as they are: member groups, sample counts,
and the tf.data reader the training pipeline interleaves like TFRecord files.

A tar (plain, or gzipped: `.tar.gz` / `.tgz`) holds samples as consecutive members sharing a
key: `{key}.jpg|jpeg|png|webp` (the image), `{key}.txt` (the caption), optionally `{key}.json`
(img2dataset's metadata: width, height, url, ...) and `{key}.cls` (an integer label). Each sample
becomes a serialized tf.train.Example of the shard schema (`jpg`, `txt`, `key`, plus `width` /
`height` from the JSON and `label` from `.cls`), so everything downstream of reading (shuffle,
positions, exact resume, parsing, skipping of unusable records) is the TFRecord path's. A sample
without an image or caption, or with a member over the size cap, becomes a record without an
image: the pipeline drops it and counts it as skipped; a tar that breaks off mid-stream ends
there with a warning, the break counted as one skipped record.

The reader is a Python generator per tar (tarfile streams the members, so gzipped tars need no
index), fed to tf.data by `Dataset.from_generator`; decoding stays in the tf graph. Sample counts
come from img2dataset's `{shard}_stats.json` ("successes") or `{shard}.parquet` (rows with status
"success") next to the tar, without reading it; otherwise by reading the tar's member headers.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from clipjax.data import schema
from clipjax.data.shards import ShardInfo

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_MEMBER_BYTES = 64 << 20  # a member larger than this is skipped, unread
_TRAIN_EXTS = (*IMAGE_EXTS, "txt", "json", "cls")


def is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def all_tars(files: Sequence[str]) -> bool:
    """True when `files` are all webdataset tars, False when none is; ValueError when mixed."""
    tars = [f for f in files if is_tar(f)]
    if tars and len(tars) != len(files):
        other = next(f for f in files if not is_tar(f))
        raise ValueError(
            f"shards mix webdataset tars ({tars[0]}) and other files ({other}); expected one "
            f"kind per source: TFRecord shards or tars ({', '.join(TAR_SUFFIXES)})"
        )
    return bool(tars)


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: the key is the path up to the first dot of the base."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def member_groups(
    tar: tarfile.TarFile,
    wanted: Sequence[str],
    read: Callable[[tarfile.TarFile, tarfile.TarInfo], Any],
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """(key, {ext: read(tar, member) or None}, problem) for each run of consecutive members with
    one key. Members whose extension is not `wanted` map to None; a wanted member over
    `max_member_bytes` (by its header) is not read, maps to None and sets `problem`. `read` is
    called while the member is current, so streamed (compressed) tars work."""
    key, parts, problem = None, {}, None
    for member in tar:
        if not member.isfile():
            continue
        k, ext = split_member(member.name)
        if k != key and key is not None:
            yield key, parts, problem
            parts, problem = {}, None
        key = k
        if ext not in wanted:
            parts[ext] = None
        elif member.size > max_member_bytes:
            problem = (
                f"member {member.name} is {member.size} bytes, over the cap of {max_member_bytes}"
            )
            parts[ext] = None
        else:
            parts[ext] = read(tar, member)
    if key is not None:
        yield key, parts, problem


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    return tar.extractfile(member).read()


def _metadata(raw: bytes | None) -> tuple[int, int]:
    """(width, height) from img2dataset's JSON member; -1 where absent or unreadable."""
    if not raw:
        return -1, -1
    try:
        meta = json.loads(raw)
        return int(meta.get("width") or -1), int(meta.get("height") or -1)
    except (ValueError, TypeError, AttributeError):
        return -1, -1


def sample_example(key: str, parts: dict[str, Any], problem: str | None) -> bytes:
    """One sample as a serialized tf.train.Example in the shard schema; a sample that cannot be
    used (no image or caption, a member over the cap, a bad .cls) gets no image bytes, so the
    pipeline drops it and counts it."""
    import tensorflow as tf

    image = next((parts[e] for e in IMAGE_EXTS if parts.get(e)), None)
    caption, label = parts.get("txt"), None
    if parts.get("cls") is not None:
        try:
            label = int(parts["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            image = None
    if problem or image is None or caption is None:
        image = b""
    width, height = _metadata(parts.get("json"))

    def b(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    feature = {
        schema.IMAGE: b(image),
        schema.TEXT: b(caption or b""),
        schema.KEY: b(key.encode("utf-8", "surrogateescape")),
        "width": i(width),
        "height": i(height),
    }
    if label is not None:
        feature[schema.LABEL] = i(label)
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def tar_examples(path: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[bytes]:
    """The tar's samples, in member order, as serialized Examples (see `sample_example`)."""
    n = 0
    try:
        with tarfile.open(path, "r|*") as tar:
            for key, parts, problem in member_groups(
                tar, _TRAIN_EXTS, read_member, max_member_bytes
            ):
                n += 1
                yield sample_example(key, parts, problem)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        log.warning("%s: unreadable after %d samples (%s); the rest of it is skipped", path, n, e)
        yield sample_example(f"{path}:broken", {}, str(e))


def tar_dataset(path):
    """tf.data.Dataset of one tar's serialized Examples (`path`: a string tensor or str)."""
    import tensorflow as tf

    def gen(p):
        yield from tar_examples(p.decode() if isinstance(p, bytes) else p)

    return tf.data.Dataset.from_generator(
        gen, args=(path,), output_signature=tf.TensorSpec([], tf.string)
    )


# -- sizes ---------------------------------------------------------------------------------------


def _stem(path: str) -> str:
    for suffix in TAR_SUFFIXES:
        if path.lower().endswith(suffix):
            return path[: -len(suffix)]
    return path


def stats_count(path: str) -> int | None:
    """The tar's sample count from img2dataset's `_stats.json` or `.parquet` beside it (None when
    neither is there or readable)."""
    from clipjax.files import read_text_if_exists

    stem = _stem(path)
    text = read_text_if_exists(stem + "_stats.json")
    if text is not None:
        try:
            return int(json.loads(text)["successes"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unparsable %s_stats.json", stem)
    if os.path.exists(stem + ".parquet"):
        try:
            import pyarrow.parquet as pq

            status = pq.read_table(stem + ".parquet", columns=["status"]).column("status")
            return sum(1 for s in status.to_pylist() if s == "success")
        except ImportError:
            return None
        except Exception as e:  # pyarrow raises its own error types
            log.warning("ignoring unreadable %s.parquet (%s)", stem, e)
    return None


def scan_count(path: str) -> int:
    """Samples in the tar by reading its member headers (and, gzipped, decompressing it)."""
    try:
        with tarfile.open(path, "r|*") as tar:
            return sum(1 for _ in member_groups(tar, (), read_member))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable tar ({e})") from None


def sample_counts(files: Sequence[str], stats_only: bool = False) -> list[int | None]:
    """Samples of each tar: img2dataset's stats, else a header scan (`stats_only`: None)."""
    out = []
    for path in files:
        count = stats_count(path)
        if count is None and not stats_only:
            count = scan_count(path)
        out.append(count)
    return out


def count_samples(files: Sequence[str], stats_only: bool = False) -> int | None:
    counts = sample_counts(files, stats_only)
    return None if None in counts else sum(counts)


# -- validation ----------------------------------------------------------------------------------


def validate_tars(files: Sequence[str]) -> ShardInfo:
    """Read the first sample of each tar; ValueError naming the file if it is no tar or its first
    sample lacks an image or caption member. Cheap: one sample per file."""
    if not files:
        raise ValueError("no tar files to validate")
    empty, labels = [], []
    for path in files:
        try:
            with tarfile.open(path, "r|*") as tar:
                first = next(member_groups(tar, (), read_member), None)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(
                f"shard {path}: unreadable tar ({e}); expected a webdataset tar (plain or "
                "gzipped) of KEY.jpg + KEY.txt members"
            ) from None
        if first is None:
            empty.append(path)
            continue
        key, parts, _ = first
        if not any(e in parts for e in IMAGE_EXTS) or "txt" not in parts:
            raise ValueError(
                f"shard {path}: first sample {key!r} has members {sorted(parts)}; expected "
                f"an image ({'/'.join(IMAGE_EXTS)}) and a caption (txt), as img2dataset writes"
            )
        labels.append("cls" in parts)
    if len(empty) == len(files):
        raise ValueError(f"all {len(files)} tars are empty (e.g. {files[0]})")
    if empty:
        log.warning("%d empty tars (e.g. %s)", len(empty), empty[0])
    return ShardInfo(tuple(files), bool(labels) and all(labels), False, tuple(empty))
