"""Approximate nearest-neighbour search over an index's embeddings with faiss (faiss-cpu).

Picked by size and a memory budget, as autofaiss does:
  fewer than `EXACT_BELOW` vectors      no approximate index: exact search is fast enough
  float32 codes fit the budget          IVF{nlist},Flat: exact distances in the probed lists
  otherwise                             IVF{nlist},PQ{m} (m bytes a vector, the largest m that
                                        fits), its candidates re-ranked exactly
with nlist a power of two near sqrt(N). HNSW is available through `factory="HNSW32"` (any faiss
factory string works), but is not picked: on a few CPU cores it builds far slower than IVF, and
IVF's inverted lists can be memory-mapped.

When built, the search setting (nprobe, or efSearch for HNSW) is tuned up until recall@10
against exact search reaches `target_recall` on held-out queries: sampled rows that were not used
to train the quantizer, each searched with itself excluded from both result lists. The recall,
the setting, the build time and the index's size are stored in ann.json. The held-out queries
are image embeddings; text embeddings lie elsewhere in the space (CLIP's modality gap), so their
recall can differ: raise `target_recall` for a margin.

The approximate index covers the first `count` rows of the index. `extend` adds later rows (a
grown collection) without retraining, and `search` answers rows past `count` exactly, so a stale
approximate index is never wrong, only slower. The file is opened memory-mapped (IVF's inverted
lists stay on disk and are paged in), read-only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clipjax.files import atomic_path, write_text
from clipjax.search.index import exact_topk

log = logging.getLogger(__name__)

ANN_FILE = "ann.faiss"
ANN_META = "ann.json"
EXACT_BELOW = 100_000
DEFAULT_MEMORY_BUDGET = 4 << 30
TARGET_RECALL = 0.95
RERANK = 10  # PQ: candidates re-ranked exactly = RERANK * k
_ID_BYTES = 8


@dataclass
class AnnMeta:
    factory: str
    count: int  # rows of the index covered
    dim: int
    nprobe: int  # IVF lists probed (efSearch for HNSW)
    recall_at_10: float  # measured at build (or at the last `extend`)
    recall_queries: int
    build_s: float
    file_bytes: int
    trained_on: int  # rows the quantizer was trained on
    rerank: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def choose_factory(n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """The faiss factory string for `n` vectors of `dim` within `memory_budget` bytes."""
    nlist = int(2 ** round(math.log2(max(16.0, math.sqrt(n)))))
    nlist = max(16, min(nlist, 65536, max(16, n // 39)))  # faiss wants >= 39 points a list
    overhead = nlist * dim * 4
    if n * (dim * 4 + _ID_BYTES) + overhead <= memory_budget:
        return f"IVF{nlist},Flat"
    for m in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32):
        if m >= 1 and dim % m == 0 and n * (m + _ID_BYTES) + overhead <= memory_budget:
            return f"IVF{nlist},PQ{m}"
    raise ValueError(
        f"{n} vectors of dimension {dim} do not fit a memory budget of {memory_budget} bytes "
        f"even as IVF-PQ{max(1, dim // 32)}; raise --memory-budget"
    )


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("approximate search needs faiss-cpu (pip install faiss-cpu)") from e
    return faiss


def _set_param(index: Any, value: int) -> None:
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = value
    elif hasattr(faiss.downcast_index(index), "hnsw"):
        faiss.downcast_index(index).hnsw.efSearch = value


def _param_steps(index: Any, k: int) -> list[int]:
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    top = ivf.nlist if ivf is not None else 4096
    steps, v = [], 1 if ivf is not None else max(16, k)
    while v < top:
        steps.append(v)
        v *= 2
    return steps + [top]


class AnnIndex:
    """A faiss index over the first `meta.count` rows of an index directory's embeddings."""

    def __init__(self, index: Any, meta: AnnMeta):
        self.index = index
        self.meta = meta
        _set_param(index, meta.nprobe)

    @classmethod
    def load(cls, index_dir: str, mmap: bool = True) -> AnnIndex | None:
        """The approximate index of `index_dir`, or None if it has none."""
        path = os.path.join(index_dir, ANN_META)
        if not os.path.isfile(path):
            return None
        faiss = _faiss()
        with open(path, encoding="utf-8") as f:
            try:
                meta = AnnMeta(**json.load(f))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: not an approximate-index record ({e})") from e
        flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        index = faiss.read_index(os.path.join(index_dir, ANN_FILE), flags)
        if index.ntotal != meta.count or index.d != meta.dim:
            raise ValueError(
                f"{index_dir}: {ANN_FILE} holds {index.ntotal} x {index.d} vectors but {ANN_META} "
                f"says {meta.count} x {meta.dim}; rebuild it with `search ann`"
            )
        return cls(index, meta)

    def search(
        self, embeddings: np.ndarray, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of `queries` [Q, D] over all rows of `embeddings` [N, D] (the index's): rows
        the faiss index covers approximately, later rows exactly. -> (scores, ids) [Q, k]."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        count = self.meta.count
        fetch = k * RERANK if self.meta.rerank else k
        scores, ids = self.index.search(queries, min(fetch, max(count, 1)))
        if self.meta.rerank:
            scores, ids = _rerank(embeddings, queries, ids, k)
        if embeddings.shape[0] > count:  # rows added since the faiss index was last extended
            ts, ti = exact_topk(embeddings[count:], queries, k)
            scores = np.concatenate([scores, ts.astype(np.float32)], axis=1)
            ids = np.concatenate([ids, ti + count], axis=1)
        order = np.argsort(-np.where(ids < 0, -np.inf, scores), axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _rerank(
    embeddings: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of the candidate ids (-1 = none), best k first."""
    safe = np.where(ids < 0, 0, ids)
    vecs = embeddings[safe.reshape(-1)].astype(np.float32).reshape(*ids.shape, -1)
    exact = np.einsum("qcd,qd->qc", vecs, queries)
    exact = np.where(ids < 0, -np.inf, exact)
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, 1), np.take_along_axis(ids, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of `truth` found in the same row of `found`."""
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size)


def _held_out_recall(
    ann: AnnIndex, embeddings: np.ndarray, rows: np.ndarray, truth: np.ndarray, k: int
) -> float:
    _, ids = ann.search(embeddings, embeddings[rows], k + 1)
    found = np.stack([_drop(r, row)[:k] for r, row in zip(ids, rows)])
    return recall_at_k(found, truth)


def _drop(ids: np.ndarray, row: int) -> np.ndarray:
    return ids[ids != row] if (ids == row).any() else ids[:-1]


def _ground_truth(embeddings: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    truth = []
    for start in range(0, len(rows), 256):  # bounded [256, N] score blocks
        part = rows[start : start + 256]
        _, ids = exact_topk(embeddings, embeddings[part].astype(np.float32), k + 1)
        truth.extend(_drop(r, row)[:k] for r, row in zip(ids, part))
    return np.stack(truth)


def build_ann(
    index_dir: str,
    embeddings: np.ndarray,
    *,
    factory: str | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    target_recall: float = TARGET_RECALL,
    recall_queries: int = 500,
    train_size: int | None = None,
    seed: int = 0,
) -> AnnMeta:
    """Build, tune and write the approximate index of `index_dir` over all rows of `embeddings`."""
    faiss = _faiss()
    n, dim = embeddings.shape
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    if n < 100:
        raise ValueError(f"{index_dir}: {n} vectors are too few for an approximate index")
    factory = factory or choose_factory(n, dim, memory_budget)
    t0 = time.perf_counter()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"faiss factory string {factory!r} not understood ({e})") from e
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    ivf = faiss.try_extract_index_ivf(index)
    # IVF: 64 points a list; PQ's 256-centroid codebooks want >= 39 * 256 points
    train_n = train_size or (min(n, max(64 * ivf.nlist, 40 * 256)) if ivf is not None else n)
    train_rows = np.sort(order[:train_n])
    ivf_pq = faiss.downcast_index(ivf) if ivf is not None else None
    if hasattr(ivf_pq, "do_polysemous_training"):
        ivf_pq.do_polysemous_training = False  # minutes of annealing, for codes we re-rank
    if not index.is_trained:
        index.train(np.ascontiguousarray(embeddings[train_rows], dtype=np.float32))
    for start in range(0, n, 65536):
        index.add(np.ascontiguousarray(embeddings[start : start + 65536], dtype=np.float32))
    build_s = time.perf_counter() - t0
    rerank = "PQ" in factory.upper() and "FLAT" not in factory.upper().split(",")[-1]
    meta = AnnMeta(factory, n, dim, 1, 0.0, 0, build_s, 0, int(train_n), rerank)
    ann = AnnIndex(index, meta)
    held = order[train_n:] if n - train_n >= recall_queries else order
    rows = np.sort(held[:recall_queries])
    meta.recall_queries = len(rows)
    truth = _ground_truth(embeddings, rows, 10)
    for value in _param_steps(index, 10):
        _set_param(index, value)
        meta.nprobe = value
        meta.recall_at_10 = _held_out_recall(ann, embeddings, rows, truth, 10)
        if meta.recall_at_10 >= target_recall:
            break
    log.info(
        "%s: %s over %d vectors, built in %.1f s; recall@10 %.3f at nprobe %d",
        index_dir,
        factory,
        n,
        build_s,
        meta.recall_at_10,
        meta.nprobe,
    )
    _write(index_dir, index, meta)
    return meta


def extend_ann(index_dir: str, embeddings: np.ndarray, recall_queries: int = 200) -> AnnMeta:
    """Add the rows of `embeddings` past the approximate index's count (no retraining), re-measure
    recall at the same setting, and write it back."""
    faiss = _faiss()
    ann = AnnIndex.load(index_dir, mmap=False)
    if ann is None:
        raise FileNotFoundError(f"{index_dir}: has no approximate index; build one with `ann`")
    meta = ann.meta
    if embeddings.shape[0] < meta.count or embeddings.shape[1] != meta.dim:
        raise ValueError(
            f"{index_dir}: the approximate index covers {meta.count} x {meta.dim} vectors, the "
            f"index holds {embeddings.shape}; rebuild it with `ann`"
        )
    new = embeddings[meta.count :]
    if not len(new):
        return meta
    t0 = time.perf_counter()
    for start in range(0, len(new), 65536):
        ann.index.add(np.ascontiguousarray(new[start : start + 65536], dtype=np.float32))
    meta.count = int(ann.index.ntotal)
    if meta.count > 4 * meta.trained_on and faiss.try_extract_index_ivf(ann.index) is not None:
        log.warning(
            "%s: the approximate index now holds %d vectors, its lists were trained on %d; "
            "rebuild it (`ann`) if recall drops",
            index_dir,
            meta.count,
            meta.trained_on,
        )
    rows = np.sort(np.random.default_rng(1).permutation(meta.count)[:recall_queries])
    truth = _ground_truth(embeddings, rows, 10)
    meta.recall_at_10 = _held_out_recall(ann, embeddings, rows, truth, 10)
    meta.recall_queries = len(rows)
    log.info(
        "%s: added %d vectors in %.1f s; recall@10 now %.3f",
        index_dir,
        len(new),
        time.perf_counter() - t0,
        meta.recall_at_10,
    )
    _write(index_dir, ann.index, meta)
    return meta


def _write(index_dir: str, index: Any, meta: AnnMeta) -> None:
    faiss = _faiss()
    path = os.path.join(index_dir, ANN_FILE)
    with atomic_path(path) as tmp:
        faiss.write_index(index, tmp)
        meta.file_bytes = os.path.getsize(tmp)
    write_text(os.path.join(index_dir, ANN_META), meta.to_json())
