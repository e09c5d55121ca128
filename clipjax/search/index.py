"""On-disk image-embedding index and exact top-k search.

An index is a directory:
  meta.json             format version, embedding dim, storage dtype, model fingerprint, chunk list
  chunk-NNNNN.npy       [n, D] L2-normalised embeddings (float16 or float32)
  chunk-NNNNN.jsonl     the n entries, one JSON value per line, in the same order: an image
                        file's path (a string), or an object for a record of a shard
                        ({"id", "caption", "key", and "tfrecord" + "offset" or "tar" + "member"},
                        see `clipjax.search.sources`)
  ann.faiss, ann.json   optional approximate index of the first rows (`clipjax.search.ann`)
  .lock                 held (flock) by the run writing the index
Paths are stored losslessly: JSON escapes control characters (a name may hold '\r' or '\n'), and
names that are not UTF-8 (decoded by Python with surrogateescape) come back as the same str, whose
os.fsencode is the original bytes. Version-1 indexes (chunk-NNNNN.paths, one path per line) are
still read; version 2 wrote paths only. Chunks are written whole (temp file, then rename)
before meta.json lists them, so a killed indexing run loses at most the chunk in progress (its
unlisted files are removed by the next run) and a later run continues from the rest. One writer
at a time: a second one is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipjax.files import atomic_path, write_text

log = logging.getLogger(__name__)

INDEX_FORMAT = "clipjax-image-index"
INDEX_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: chunk paths as plain lines (.paths); 2: paths only
META_FILE = "meta.json"
LOCK_FILE = ".lock"
PATHS_JSONL = "jsonl"  # a chunk's 'paths' entry: its paths file is NAME.jsonl
_CHUNK_FILE = re.compile(r"chunk-\d+\.(npy|paths|jsonl)")
STORAGE_DTYPES = ("float16", "float32")


class IndexMismatchError(ValueError):
    """The index was built with a different model (or embedding size) than the one given."""


class IndexBusyError(RuntimeError):
    """Another process is writing the index (it holds the index's lock file)."""


@dataclass
class IndexMeta:
    dim: int
    dtype: str
    model_fingerprint: str
    model_path: str = ""
    image_size: int = 0
    # {'name': str, 'count': int, 'paths': 'jsonl'}; no 'paths': a version-1 chunk (NAME.paths)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason (unreadable images)

    @property
    def count(self) -> int:
        return sum(c["count"] for c in self.chunks)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "dim": self.dim,
                "dtype": self.dtype,
                "model_fingerprint": self.model_fingerprint,
                "model_path": self.model_path,
                "image_size": self.image_size,
                "count": self.count,
                "chunks": self.chunks,
                "failed": self.failed,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> "IndexMeta":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if d.get("format") != INDEX_FORMAT:
            raise ValueError(
                f"{where}: not a clipjax image index (format={d.get('format')!r}, "
                f"expected {INDEX_FORMAT!r})"
            )
        if d.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{where}: index version {d.get('version')} is not supported (this clipjax "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}); rebuild the index "
                f"with this clipjax or use the clipjax that wrote it"
            )
        return cls(
            dim=int(d["dim"]),
            dtype=d["dtype"],
            model_fingerprint=d["model_fingerprint"],
            model_path=d.get("model_path", ""),
            image_size=int(d.get("image_size", 0)),
            chunks=list(d["chunks"]),
            failed=dict(d.get("failed", {})),
        )


def meta_path(index_dir: str) -> str:
    return os.path.join(index_dir, META_FILE)


def read_meta(index_dir: str) -> IndexMeta:
    path = meta_path(index_dir)
    if not os.path.isfile(path):
        what = "directory has no" if os.path.isdir(index_dir) else "does not exist; expected a"
        raise FileNotFoundError(f"{index_dir}: {what} clipjax image index ({META_FILE} missing)")
    with open(path, encoding="utf-8") as f:
        return IndexMeta.from_json(f.read(), path)


class IndexWriter:
    """Appends chunks of (paths, embeddings) to a new or existing index directory.

    Holds the index's lock from construction to `close()` (or the end of a `with` block), so two
    runs cannot interleave chunks; a second writer gets IndexBusyError at once.
    """

    def __init__(
        self,
        index_dir: str,
        *,
        dim: int,
        dtype: str,
        model_fingerprint: str,
        model_path: str = "",
        image_size: int = 0,
    ):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"index dtype {dtype!r} not supported; expected one of {STORAGE_DTYPES}"
            )
        self.index_dir = index_dir
        if not os.path.exists(meta_path(index_dir)):
            _check_new_index_dir(index_dir)
            os.makedirs(index_dir, exist_ok=True)
        self._lock = _acquire_lock(index_dir)
        try:
            if os.path.exists(meta_path(index_dir)):
                meta = read_meta(index_dir)
                check_compatible(meta, model_fingerprint, dim, where=index_dir)
                if meta.dtype != dtype:
                    raise ValueError(
                        f"{index_dir}: index stores {meta.dtype}, but {dtype} was "
                        f"requested; use the same --float16 setting as when it was "
                        f"created, or a new --out"
                    )
                self.meta = meta
                self._remove_unlisted_chunks()
            else:
                _check_new_index_dir(index_dir)  # nothing appeared before the lock was taken
                self.meta = IndexMeta(
                    dim=dim,
                    dtype=dtype,
                    model_fingerprint=model_fingerprint,
                    model_path=model_path,
                    image_size=image_size,
                )
                self._write_meta()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the lock; the writer cannot add chunks afterwards."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()  # closing the descriptor releases the flock

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def indexed_paths(self) -> set[str]:
        """Ids (paths) already in the index (or recorded as unreadable), to skip when resuming."""
        done = set(self.meta.failed)
        for chunk in self.meta.chunks:
            done.update(entry_id(e) for e in _read_paths(self.index_dir, chunk))
        return done

    def add_chunk(
        self,
        paths: Sequence[str | dict[str, Any]],
        embeddings: np.ndarray,
        failed: dict[str, str] | None = None,
    ) -> None:
        """Persist one chunk, then record it (and any unreadable entries) in meta.json. An entry
        is an image file's path or a shard record's dict (with a str "id")."""
        if self._lock is None:
            raise ValueError(f"{self.index_dir}: the index writer is closed")
        embeddings = np.asarray(embeddings)
        if embeddings.shape != (len(paths), self.meta.dim):
            raise ValueError(
                f"chunk embeddings have shape {embeddings.shape}, expected "
                f"({len(paths)}, {self.meta.dim})"
            )
        if paths:
            text = "".join(encode_path(p) + "\n" for p in paths)  # fails before any write
            name = f"chunk-{self._next_chunk_id():05d}"
            with atomic_path(os.path.join(self.index_dir, name + ".npy")) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, embeddings.astype(self.meta.dtype))
            write_text(os.path.join(self.index_dir, f"{name}.{PATHS_JSONL}"), text)
            self.meta.chunks.append({"name": name, "count": len(paths), "paths": PATHS_JSONL})
        if failed:
            self.meta.failed.update(failed)
        if paths or failed:
            self._write_meta()

    def _next_chunk_id(self) -> int:
        ids = [int(c["name"].split("-")[1]) for c in self.meta.chunks]
        return max(ids, default=-1) + 1

    def _write_meta(self) -> None:
        write_text(meta_path(self.index_dir), self.meta.to_json())

    def _remove_unlisted_chunks(self) -> None:
        """Chunk files meta.json does not list are left by a killed run: remove them."""
        listed = {c["name"] for c in self.meta.chunks}
        for f in os.listdir(self.index_dir):
            if _CHUNK_FILE.fullmatch(f) and f.rsplit(".", 1)[0] not in listed:
                log.info("%s: removing %s, left by an interrupted run", self.index_dir, f)
                os.remove(os.path.join(self.index_dir, f))


def _check_new_index_dir(index_dir: str) -> None:
    """A new index goes into a missing or empty directory (a lone lock file is allowed)."""
    if not os.path.exists(index_dir):
        return
    if not os.path.isdir(index_dir) or set(os.listdir(index_dir)) - {LOCK_FILE}:
        raise FileExistsError(
            f"{index_dir}: exists and is not a clipjax image index; choose a new or empty --out"
        )


def _acquire_lock(index_dir: str) -> Any:
    """Open and flock `index_dir/.lock` without waiting; IndexBusyError if another run holds it."""
    path = os.path.join(index_dir, LOCK_FILE)
    f = open(path, "a+b")
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        f.close()
        raise IndexBusyError(
            f"{index_dir}: another index run holds {path}; wait for it to finish, or write to "
            f"another --out"
        ) from None
    except (ImportError, OSError) as e:  # no flock here (some network file systems)
        log.warning("%s: cannot lock %s (%s); make sure no other run writes it", index_dir, path, e)
    return f


def check_compatible(
    meta: IndexMeta, model_fingerprint: str | None, dim: int | None, where: str
) -> None:
    """Raise IndexMismatchError when the index was not built with this model."""
    if dim is not None and meta.dim != dim:
        raise IndexMismatchError(
            f"{where}: index embeddings have dimension {meta.dim}, but the "
            f"model produces {dim}; rebuild the index with this model"
        )
    if model_fingerprint is not None and meta.model_fingerprint != model_fingerprint:
        raise IndexMismatchError(
            f"{where}: index was built with a different model (fingerprint "
            f"{meta.model_fingerprint[:12]}, built from {meta.model_path or 'unknown'}) than the "
            f"one given (fingerprint {model_fingerprint[:12]}); query with the model the index "
            f"was built with, or rebuild the index"
        )


class Index:
    """A loaded index: an [N, D] embedding matrix and N entries, searched exactly.

    `paths[i]` is entry i's id (an image file's path, or a shard record's id); `records` holds
    the shard records' dicts (caption, key, location) when the index has any, else None.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        paths: Sequence[str],
        meta: IndexMeta | None = None,
        records: dict[int, dict[str, Any]] | None = None,
    ):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(paths):
            raise ValueError(f"embeddings {embeddings.shape} do not match {len(paths)} paths")
        self.embeddings = embeddings  # [N, D]
        self.paths = list(paths)
        self.meta = meta
        self.records = records or None

    def entry(self, i: int) -> dict[str, Any]:
        """Entry i as a dict: {"id", and "path" for a file or the record's fields}."""
        if self.records is not None and i in self.records:
            return self.records[i]
        return {"id": self.paths[i], "path": self.paths[i]}

    @classmethod
    def load(cls, index_dir: str, dtype: str | np.dtype = np.float32) -> "Index":
        """Read all chunks. float16 storage is widened to `dtype` (float32 matmul uses BLAS)."""
        meta = read_meta(index_dir)
        mats, paths, records = [], [], {}
        for chunk in meta.chunks:
            npy = os.path.join(index_dir, chunk["name"] + ".npy")
            if not os.path.isfile(npy):
                raise FileNotFoundError(
                    f"{npy}: chunk listed in {meta_path(index_dir)} is "
                    f"missing; the index is damaged, rebuild it"
                )
            mat = np.load(npy)
            chunk_paths = _read_paths(index_dir, chunk)
            if mat.shape != (chunk["count"], meta.dim) or len(chunk_paths) != chunk["count"]:
                raise ValueError(
                    f"{npy}: holds {mat.shape} embeddings and {len(chunk_paths)} "
                    f"paths, expected {chunk['count']} x {meta.dim}"
                )
            mats.append(mat)
            for e in chunk_paths:
                if isinstance(e, dict):
                    records[len(paths)] = e
                paths.append(entry_id(e))
        emb = np.concatenate(mats) if mats else np.zeros((0, meta.dim), meta.dtype)
        emb = np.ascontiguousarray(emb, dtype=dtype)
        return cls(emb, paths, meta, records)

    def __len__(self) -> int:
        return len(self.paths)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine top-k. queries [D] or [Q, D] (normalised) -> (scores, ids), each [Q, k]."""
        return exact_topk(self.embeddings, queries, k)

    def lookup(self, path: str) -> np.ndarray | None:
        """The stored embedding of `path`, if indexed (lets an indexed image be a query)."""
        target = os.path.abspath(path)
        for i, p in enumerate(self.paths):
            if p == target:
                return self.embeddings[i].astype(np.float32)
        return None


def exact_topk(
    embeddings: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of `embeddings` by dot product, best first. One matmul + argpartition."""
    queries = np.asarray(queries, dtype=embeddings.dtype)
    single = queries.ndim == 1
    queries = np.atleast_2d(queries)
    n = embeddings.shape[0]
    k = min(k, n)
    if k <= 0:
        empty = np.zeros((queries.shape[0], 0))
        return (empty[0], empty[0].astype(np.int64)) if single else (empty, empty.astype(np.int64))
    scores = queries @ embeddings.T  # [Q, N]
    if k < n:
        # O(N) selection of the k best, then sort only those k.
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), (queries.shape[0], n))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1)
    top = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    return (top[0], ids[0]) if single else (top, ids)


def encode_path(path: str | dict[str, Any]) -> str:
    """One line of a chunk's paths file: the path as an ASCII JSON string (lossless, see above),
    or a record's dict as one ASCII JSON object."""
    if isinstance(path, dict):
        if not isinstance(path.get("id"), str):
            raise ValueError(f"index record {path!r} has no str 'id'")
        return json.dumps(path, sort_keys=True)
    if not isinstance(path, str):
        raise ValueError(f"image path {path!r} is not a str")
    return json.dumps(path)


def entry_id(entry: str | dict[str, Any]) -> str:
    """The id of a chunk entry: a file's path, or a record's "id"."""
    return entry if isinstance(entry, str) else entry["id"]


def display_path(path: str) -> str:
    """`path` for a terminal or a page: undecodable bytes as \\xNN, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _is_entry(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, dict) and isinstance(x.get("id"), str))


def _read_paths(index_dir: str, chunk: dict[str, Any]) -> list[str | dict[str, Any]]:
    jsonl = chunk.get("paths") == PATHS_JSONL
    p = os.path.join(index_dir, chunk["name"] + (f".{PATHS_JSONL}" if jsonl else ".paths"))
    if not os.path.isfile(p):
        raise FileNotFoundError(
            f"{p}: paths file of a listed chunk is missing; the index is damaged, rebuild it"
        )
    if not jsonl:  # version 1: one path per line ('\n' only: a '\r' belongs to the name)
        with open(p, encoding="utf-8", newline="\n") as f:
            return [line[:-1] if line.endswith("\n") else line for line in f if line != "\n"]
    with open(p, "rb") as f:
        lines = f.read().split(b"\n")
    nonblank = [line for line in lines if line.strip()]
    try:  # one C-level parse: ~10x faster than a json.loads per line
        out = json.loads(b"[" + b",".join(nonblank) + b"]")
        if len(out) == len(nonblank) and all(map(_is_entry, out)):
            return out
    except ValueError:
        pass
    out = []  # damaged: find the line to name
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            path = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            path = None
        if not _is_entry(path):
            raise ValueError(
                f"{p}:{n}: not a JSON string or record; the index is damaged, rebuild it"
            )
        out.append(path)
    return out
