"""On-disk image-embedding index and exact top-k search.

An index is a directory:
  meta.json             format version, embedding dim, storage dtype, model fingerprint, chunk list
  chunk-NNNNN.npy       [n, D] L2-normalised embeddings (float16 or float32)
  chunk-NNNNN.paths     the n image paths, one per line, in the same order
Chunks are written whole (temp file, then rename) before meta.json lists them, so a killed
indexing run loses at most the chunk in progress and a later run continues from the rest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipjax.files import atomic_path, write_text

log = logging.getLogger(__name__)

INDEX_FORMAT = "clipjax-image-index"
INDEX_VERSION = 1
META_FILE = "meta.json"
STORAGE_DTYPES = ("float16", "float32")


class IndexMismatchError(ValueError):
    """The index was built with a different model (or embedding size) than the one given."""


@dataclass
class IndexMeta:
    dim: int
    dtype: str
    model_fingerprint: str
    model_path: str = ""
    image_size: int = 0
    chunks: list[dict[str, Any]] = field(default_factory=list)  # {'name': str, 'count': int}
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
        if d.get("version") != INDEX_VERSION:
            raise ValueError(
                f"{where}: index version {d.get('version')} is not supported "
                f"(expected {INDEX_VERSION})"
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
    """Appends chunks of (paths, embeddings) to a new or existing index directory."""

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
        else:
            if os.path.exists(index_dir) and (
                not os.path.isdir(index_dir) or os.listdir(index_dir)
            ):
                raise FileExistsError(
                    f"{index_dir}: exists and is not a clipjax image index; "
                    f"choose a new or empty --out"
                )
            os.makedirs(index_dir, exist_ok=True)
            self.meta = IndexMeta(
                dim=dim,
                dtype=dtype,
                model_fingerprint=model_fingerprint,
                model_path=model_path,
                image_size=image_size,
            )
            self._write_meta()

    def indexed_paths(self) -> set[str]:
        """Paths already in the index (or recorded as unreadable), to skip when resuming."""
        done = set(self.meta.failed)
        for chunk in self.meta.chunks:
            done.update(_read_paths(self.index_dir, chunk["name"]))
        return done

    def add_chunk(
        self, paths: Sequence[str], embeddings: np.ndarray, failed: dict[str, str] | None = None
    ) -> None:
        """Persist one chunk, then record it (and any unreadable paths) in meta.json."""
        embeddings = np.asarray(embeddings)
        if embeddings.shape != (len(paths), self.meta.dim):
            raise ValueError(
                f"chunk embeddings have shape {embeddings.shape}, expected "
                f"({len(paths)}, {self.meta.dim})"
            )
        if paths:
            name = f"chunk-{self._next_chunk_id():05d}"
            with atomic_path(os.path.join(self.index_dir, name + ".npy")) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, embeddings.astype(self.meta.dtype))
            write_text(
                os.path.join(self.index_dir, name + ".paths"),
                "".join(_escape(p) + "\n" for p in paths),
            )
            self.meta.chunks.append({"name": name, "count": len(paths)})
        if failed:
            self.meta.failed.update(failed)
        if paths or failed:
            self._write_meta()

    def _next_chunk_id(self) -> int:
        ids = [int(c["name"].split("-")[1]) for c in self.meta.chunks]
        return max(ids, default=-1) + 1

    def _write_meta(self) -> None:
        write_text(meta_path(self.index_dir), self.meta.to_json())


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
    """A loaded index: an [N, D] embedding matrix and N paths, searched exactly."""

    def __init__(self, embeddings: np.ndarray, paths: Sequence[str], meta: IndexMeta | None = None):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(paths):
            raise ValueError(f"embeddings {embeddings.shape} do not match {len(paths)} paths")
        self.embeddings = embeddings  # [N, D]
        self.paths = list(paths)
        self.meta = meta

    @classmethod
    def load(cls, index_dir: str, dtype: str | np.dtype = np.float32) -> "Index":
        """Read all chunks. float16 storage is widened to `dtype` (float32 matmul uses BLAS)."""
        meta = read_meta(index_dir)
        mats, paths = [], []
        for chunk in meta.chunks:
            npy = os.path.join(index_dir, chunk["name"] + ".npy")
            if not os.path.isfile(npy):
                raise FileNotFoundError(
                    f"{npy}: chunk listed in {meta_path(index_dir)} is "
                    f"missing; the index is damaged, rebuild it"
                )
            mat = np.load(npy)
            chunk_paths = _read_paths(index_dir, chunk["name"])
            if mat.shape != (chunk["count"], meta.dim) or len(chunk_paths) != chunk["count"]:
                raise ValueError(
                    f"{npy}: holds {mat.shape} embeddings and {len(chunk_paths)} "
                    f"paths, expected {chunk['count']} x {meta.dim}"
                )
            mats.append(mat)
            paths.extend(chunk_paths)
        emb = np.concatenate(mats) if mats else np.zeros((0, meta.dim), meta.dtype)
        emb = np.ascontiguousarray(emb, dtype=dtype)
        return cls(emb, paths, meta)

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


def _escape(path: str) -> str:
    if "\n" in path:
        raise ValueError(f"image path {path!r} contains a newline; rename the file")
    return path


def _read_paths(index_dir: str, chunk_name: str) -> list[str]:
    p = os.path.join(index_dir, chunk_name + ".paths")
    if not os.path.isfile(p):
        raise FileNotFoundError(
            f"{p}: paths file of a listed chunk is missing; the index is damaged, rebuild it"
        )
    with open(p, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line != "\n"]


def iter_chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
