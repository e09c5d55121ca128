"""What an index is built from: image files, TFRecord shards, webdataset tars; and reading an
indexed entry's image back by its stored location.

An entry of a file is its absolute path. An entry of a shard record is a dict
  {"id": "SHARD@OFFSET", "tfrecord": SHARD, "offset": OFFSET, "key": ..., "caption": ...}
  {"id": "TAR:KEY", "tar": TAR, "member": NAME, "key": ..., "caption": ...}
so the image is read back from where it lies (a record by its byte offset, a tar member by name):
nothing is copied into the index, and the server can only open what the index lists.

TFRecord files are read here in pure Python (the framing: length, its CRC, data, data CRC; and
the few `tf.train.Example` fields search needs), so neither indexing nor serving imports
TensorFlow. Record CRCs are not verified: a damaged record fails to decode and is skipped.
Tars are read with `clipjax.data.sources.webdataset_source`, the shard writer's reader.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from clipjax.data import schema
from clipjax.data.webdataset import IMAGE_EXTS, split_member
from clipjax.search.index import entry_id

MAX_RECORD_BYTES = 64 << 20  # a record longer than this is taken as damage, not read


@dataclass(frozen=True)
class IndexItem:
    entry: str | dict[str, Any]  # what the index stores (see the module docstring)
    read: Callable[[], bytes | str]  # the encoded image, or a file path to open

    @property
    def id(self) -> str:
        return entry_id(self.entry)


def file_items(paths: list[str]) -> Iterator[IndexItem]:
    for p in paths:
        yield IndexItem(p, lambda p=p: p)


# ------------------------------------------------------------------ TFRecord framing + Example


def tfrecord_offsets(path: str) -> Iterator[tuple[int, bytes]]:
    """(byte offset, serialized record) of every record of a TFRecord file, in order."""
    with open(path, "rb") as f:
        while True:
            offset = f.tell()
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ValueError(f"{path}: truncated record header at byte {offset}")
            (length,) = struct.unpack("<Q", head[:8])
            if length > MAX_RECORD_BYTES:
                raise ValueError(
                    f"{path}: record at byte {offset} claims {length} bytes (over "
                    f"{MAX_RECORD_BYTES}); not a TFRecord file, or damaged"
                )
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                raise ValueError(f"{path}: truncated record at byte {offset}")
            yield offset, data


def read_record_at(path: str, offset: int) -> bytes:
    """The serialized record starting at `offset` of a TFRecord file."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(12)
        if len(head) < 12:
            raise ValueError(f"{path}: no record at byte {offset}")
        (length,) = struct.unpack("<Q", head[:8])
        if length > MAX_RECORD_BYTES:
            raise ValueError(f"{path}: no record at byte {offset}")
        data = f.read(length)
    if len(data) < length:
        raise ValueError(f"{path}: truncated record at byte {offset}")
    return data


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message; bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def example_bytes_features(serialized: bytes) -> dict[str, bytes]:
    """The first value of each bytes feature of a `tf.train.Example` (ValueError if malformed)."""
    out: dict[str, bytes] = {}
    for n, w, features in _fields(serialized):  # Example.features = 1
        if n != 1 or w != 2:
            continue
        for n2, w2, entry in _fields(features):  # Features.feature = 1 (map entries)
            if n2 != 1 or w2 != 2:
                continue
            name, feature = b"", b""
            for n3, w3, v in _fields(entry):
                if w3 == 2 and n3 == 1:
                    name = v
                elif w3 == 2 and n3 == 2:
                    feature = v
            for n4, w4, blist in _fields(feature):  # Feature.bytes_list = 1
                if n4 == 1 and w4 == 2:
                    values = [v for n5, w5, v in _fields(blist) if n5 == 1 and w5 == 2]
                    if values:
                        out[name.decode("utf-8", "replace")] = values[0]
    return out


def _text(data: bytes | None) -> str:
    return data.decode("utf-8", "replace") if data else ""


def tfrecord_items(shards: list[str]) -> Iterator[IndexItem]:
    """One item per record of the shards (schema: jpg, txt, key), keeping caption and key."""
    for shard in shards:
        shard = os.path.abspath(shard)
        for offset, data in tfrecord_offsets(shard):
            try:
                feats = example_bytes_features(data)
            except ValueError:
                feats = {}
            image = feats.get(schema.IMAGE)
            entry = {
                "id": f"{shard}@{offset}",
                "tfrecord": shard,
                "offset": offset,
                "key": _text(feats.get(schema.KEY)),
                "caption": _text(feats.get(schema.TEXT)),
            }
            yield IndexItem(entry, lambda image=image, i=entry["id"]: _need(image, i))


def _need(image: bytes | None, where: str) -> bytes:
    if image is None:
        raise ValueError(f"{where}: record has no '{schema.IMAGE}' image feature")
    return image


# ------------------------------------------------------------------ webdataset tars


def webdataset_items(patterns: str | list[str]) -> Iterator[IndexItem]:
    """One item per key of webdataset tars (the shard writer's reader), keeping caption and key.
    Only uncompressed tars: their members are read back by name when served. The tars are
    checked here, before the items are iterated."""
    from clipjax.data.sources import webdataset_source

    source = webdataset_source(patterns)
    if source.in_memory:
        raise ValueError(
            f"{patterns}: compressed tars cannot be indexed (their images cannot be read back "
            "by position when served); index uncompressed tars, or write TFRecord shards"
        )
    return _webdataset_items(source)


def _webdataset_items(source: Any) -> Iterator[IndexItem]:
    for item in source:
        tar, _, key = item.origin.rpartition(":")
        caption = item.caption
        entry = {
            "id": item.origin,
            "tar": os.path.abspath(tar),
            "member": key,
            "key": item.key,
            "caption": caption.decode("utf-8", "replace")
            if isinstance(caption, bytes)
            else str(caption),
        }
        yield IndexItem(entry, item.read)


@functools.lru_cache(maxsize=64)
def _tar_members(tar: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(key, lower-case extension) -> (data offset, size) of an uncompressed tar's files, named
    as indexing groups them (`webdataset.split_member`); read once per tar."""
    with tarfile.open(tar, "r:") as t:
        return {split_member(m.name): (m.offset_data, m.size) for m in t if m.isfile()}


def tar_member_image(tar: str, key: str) -> bytes:
    """The image member of `key` in an uncompressed webdataset tar."""
    members = _tar_members(tar)
    for ext in IMAGE_EXTS:
        if (key, ext) in members:
            offset, size = members[(key, ext)]
            if size > MAX_RECORD_BYTES:
                break
            with open(tar, "rb") as f:
                f.seek(offset)
                return f.read(size)
    raise FileNotFoundError(f"{tar}: no readable image member for key {key}")


# ------------------------------------------------------------------ reading an entry back


def entry_image(entry: dict[str, Any]) -> bytes | str:
    """The image of an index entry (`Index.entry(i)`): a file path, or the encoded bytes."""
    if "tfrecord" in entry:
        feats = example_bytes_features(read_record_at(entry["tfrecord"], int(entry["offset"])))
        return _need(feats.get(schema.IMAGE), entry["id"])
    if "tar" in entry:
        return tar_member_image(entry["tar"], entry["member"])
    return entry["path"]


def open_image(data: bytes | str):
    """A PIL image from encoded bytes or a path (the caller closes it)."""
    from PIL import Image

    return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
