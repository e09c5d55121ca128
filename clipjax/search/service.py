"""The search service without HTTP: indexes and one model loaded once, queries by text, image,
embedding or indexed id, thumbnails and originals by id, per-stage latency metrics.

`clipjax.search.server` puts it behind HTTP. Every image a client can get is an entry of a
loaded index, asked for by (index name, row number): no path or URL from a request is opened.
Uploaded images are bounded in bytes and pixels before they are decoded, then brought to the
model's input by the project's one image rule (`clipjax.data.image.preprocess`).
"""

from __future__ import annotations

import collections
import io
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipjax.search.ann import AnnIndex
from clipjax.search.index import Index, check_compatible, display_path

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 16 << 20
MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 500
TEXT_BATCH = 16  # text queries waiting together are encoded as one batch of up to this many
THUMB_CACHE = 2048
STAGES = ("encode_text", "encode_image", "search", "thumbnail", "original")
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}


class QueryError(ValueError):
    """A request the service cannot answer as asked (the client's fault: HTTP 4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Collection:
    name: str
    path: str
    index: Index
    ann: AnnIndex | None

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ann is not None:
            scores, ids = self.ann.search(self.index.embeddings, query[None], k)
            return scores[0], ids[0]
        return self.index.search(query, k)

    def describe(self) -> dict[str, Any]:
        ann = self.ann.meta if self.ann else None
        return {
            "name": self.name,
            "count": len(self.index),
            "dim": self.index.embeddings.shape[1],
            "search": ann.factory if ann else "exact",
            "recall_at_10": ann.recall_at_10 if ann else 1.0,
        }


class Metrics:
    """Prometheus histograms of per-stage latency, and request counters."""

    def __init__(self):
        self._lock = threading.Lock()
        self._hist = {s: [0] * (len(_BUCKETS) + 1) for s in STAGES + ("request",)}
        self._sum = dict.fromkeys(self._hist, 0.0)
        self.requests: collections.Counter = collections.Counter()

    def observe(self, stage: str, seconds: float) -> None:
        i = next((j for j, b in enumerate(_BUCKETS) if seconds <= b), len(_BUCKETS))
        with self._lock:
            self._hist[stage][i] += 1
            self._sum[stage] += seconds

    def count(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def render(self) -> str:
        lines = [
            "# HELP clipjax_search_stage_seconds Latency of each stage of serving a request.",
            "# TYPE clipjax_search_stage_seconds histogram",
        ]
        with self._lock:
            for stage, counts in self._hist.items():
                total = 0
                for b, c in zip(_BUCKETS + (float("inf"),), counts):
                    total += c
                    le = "+Inf" if b == float("inf") else repr(b)
                    lines.append(
                        f'clipjax_search_stage_seconds_bucket{{stage="{stage}",le="{le}"}} {total}'
                    )
                lines.append(
                    f'clipjax_search_stage_seconds_sum{{stage="{stage}"}} {self._sum[stage]}'
                )
                lines.append(f'clipjax_search_stage_seconds_count{{stage="{stage}"}} {total}')
            lines += [
                "# HELP clipjax_search_requests_total Requests by route and status.",
                "# TYPE clipjax_search_requests_total counter",
            ]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(
                    f'clipjax_search_requests_total{{route="{route}",status="{status}"}} {n}'
                )
        return "\n".join(lines) + "\n"


class _TextBatcher:
    """Encodes text queries on one thread; queries that arrive while a batch runs are encoded
    together in the next (up to TEXT_BATCH), so concurrent clients share the model's work."""

    def __init__(self, one: Any, many: Any, tokenize: Any):
        self._one, self._many, self._tokenize = one, many, tokenize
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="text-encoder", daemon=True).start()

    def encode(self, text: str) -> np.ndarray:
        future: Future = Future()
        self._queue.put((text, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            pending = [self._queue.get()]
            while len(pending) < TEXT_BATCH:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                tokens = self._tokenize([t for t, _ in pending])
                encoder = self._one if len(pending) == 1 else self._many
                emb = encoder.texts(tokens)
                for (_, f), e in zip(pending, emb):
                    f.set_result(e)
            except Exception as e:  # delivered to the waiting requests, not lost on this thread
                for _, f in pending:
                    f.set_exception(e)


class SearchService:
    """Indexes (name -> Collection) and the model that encodes queries, loaded once."""

    def __init__(
        self,
        index_dirs: Sequence[str],
        model_path: str,
        *,
        trust_torchscript: bool = False,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        max_upload_pixels: int = MAX_UPLOAD_PIXELS,
    ):
        from clipjax.evaluate.embed import Encoder
        from clipjax.export.load import load, model_fingerprint

        if not index_dirs:
            raise ValueError("serve: give at least one --index")
        self.max_upload_bytes = max_upload_bytes
        self.max_upload_pixels = max_upload_pixels
        self.metrics = Metrics()
        self.collections: dict[str, Collection] = {}
        for d in index_dirs:
            index = Index.load(d)  # fails before the model is loaded
            ann = AnnIndex.load(d)  # built by `index` above EXACT_BELOW rows, or by `ann`
            name = os.path.basename(os.path.normpath(d)) or "index"
            base, n = name, 2
            while name in self.collections:
                name, n = f"{base}-{n}", n + 1
            self.collections[name] = Collection(name, d, index, ann)
        if any(c.ann is not None for c in self.collections.values()):
            import faiss

            # Queries run concurrently in the server's thread pool: one OpenMP thread each,
            # or faiss's spinning thread teams oversubscribe the cores (much slower under load).
            faiss.omp_set_num_threads(1)
        model, params, self._preprocess = load(model_path, trust_torchscript=trust_torchscript)
        fingerprint = model_fingerprint(model.config, params)
        for c in self.collections.values():
            check_compatible(c.index.meta, fingerprint, model.config.embed_dim, where=c.path)
        self.config = model.config
        one = Encoder(model, params, batch_size=1)
        many = Encoder(model, one.params, batch_size=TEXT_BATCH)  # params shared, not copied
        self._image_encoder = one
        self._texts = _TextBatcher(one, many, self._tokenize)
        self._thumbs: collections.OrderedDict = collections.OrderedDict()
        self._thumb_lock = threading.Lock()
        # Compile every encoder now, not on the first request.
        many.texts(self._tokenize(["warm-up"] * 2))
        self.encode_text("warm-up")
        size = model.config.image_size
        one.images(np.zeros((1, size, size, 3), np.float32))

    def _tokenize(self, texts: list[str]) -> np.ndarray:
        from clipjax.data.tokenizer import tokenize

        return tokenize(texts, self.config.context_length)

    # -------------------------------------------------------------- queries

    def collection(self, name: str | None) -> Collection:
        if name is None or name == "":
            return next(iter(self.collections.values()))
        if name not in self.collections:
            raise QueryError(
                f"no index named {name!r}; loaded: {', '.join(self.collections)}", status=404
            )
        return self.collections[name]

    def encode_text(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise QueryError("the text query is empty")
        if len(text) > 2000:
            raise QueryError(f"the text query is {len(text)} characters; at most 2000")
        t0 = time.perf_counter()
        emb = self._texts.encode(text)
        self.metrics.observe("encode_text", time.perf_counter() - t0)
        return _unit(emb)

    def encode_image(self, data: bytes) -> np.ndarray:
        """An uploaded image's embedding; QueryError if it is too large or not an image."""
        from PIL import Image

        if len(data) > self.max_upload_bytes:
            raise QueryError(
                f"the image is {len(data)} bytes; at most {self.max_upload_bytes}", status=413
            )
        t0 = time.perf_counter()
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > self.max_upload_pixels:
                    raise QueryError(
                        f"the image is {w} x {h} pixels; at most {self.max_upload_pixels} pixels",
                        status=413,
                    )
                x = self._preprocess(im)  # to_rgb + resize + crop: the project's image rule
        except QueryError:
            raise
        except Exception as e:  # PIL raises many types for undecodable data
            raise QueryError(f"not a readable image ({type(e).__name__})") from None
        emb = self._image_encoder.images(x[None])[0]
        self.metrics.observe("encode_image", time.perf_counter() - t0)
        return _unit(emb)

    def embedding_query(self, values: Any, collection: Collection) -> np.ndarray:
        dim = collection.index.embeddings.shape[1]
        try:
            v = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            raise QueryError("the embedding must be a list of numbers") from None
        if v.shape != (dim,) or not np.all(np.isfinite(v)) or not np.any(v):
            raise QueryError(f"the embedding must be {dim} finite numbers, not all zero")
        return _unit(v)

    def row(self, collection: Collection, row: Any) -> int:
        if isinstance(row, str) and row.isdigit():
            row = int(row)
        if (
            isinstance(row, bool)
            or not isinstance(row, int)
            or not 0 <= row < len(collection.index)
        ):
            raise QueryError(
                f"no entry {row!r} in index {collection.name!r} (0..{len(collection.index) - 1})",
                status=404,
            )
        return row

    def search(
        self,
        collection: Collection,
        query: np.ndarray,
        *,
        k: int = 20,
        offset: int = 0,
        dedup: float | None = None,
    ) -> list[dict[str, Any]]:
        """Results offset..offset+k, best first; with `dedup`, a result whose cosine with a
        better one is above it is hidden."""
        if not 1 <= k <= MAX_K or not 0 <= offset <= 10 * MAX_K:
            raise QueryError(f"k must be in 1..{MAX_K} and offset in 0..{10 * MAX_K}")
        if dedup is not None and not 0 < dedup <= 1:
            raise QueryError(f"dedup must be a cosine in (0, 1], got {dedup}")
        want = offset + k
        t0 = time.perf_counter()
        fetch = want if dedup is None else 3 * want
        scores, ids = collection.search(query, fetch)
        if dedup is not None:
            scores, ids = _dedup(collection.index.embeddings, scores, ids, dedup)
        self.metrics.observe("search", time.perf_counter() - t0)
        return [
            self.result(collection, int(i), float(s))
            for s, i in zip(scores[offset:want], ids[offset:want])
        ]

    def result(self, collection: Collection, row: int, score: float) -> dict[str, Any]:
        entry = collection.index.entry(row)
        ident = display_path(entry["id"])
        if "path" in entry:
            name = display_path(os.path.basename(entry["path"]))
        else:  # a shard record: its key, else its location
            name = display_path(entry.get("key") or ident)
        return {
            "id": row,
            "score": round(score, 6),
            "name": name,
            "path": ident,
            "caption": entry.get("caption"),
            "key": entry.get("key"),
            "thumbnail": f"/api/thumb/{collection.name}/{row}",
            "file": f"/api/file/{collection.name}/{row}",
        }

    # -------------------------------------------------------------- images by id

    def thumbnail(self, collection: Collection, row: int) -> bytes:
        from clipjax.search.html import thumbnail_jpeg

        key = (collection.name, row)
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        t0 = time.perf_counter()
        data = thumbnail_jpeg(self._image_source(collection, row))
        self.metrics.observe("thumbnail", time.perf_counter() - t0)
        if data is None:
            raise QueryError(f"entry {row} of {collection.name!r} is not readable", status=404)
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data

    def original(self, collection: Collection, row: int) -> tuple[bytes, str]:
        """The indexed image's bytes and its content type (only image formats are served)."""
        from PIL import Image

        t0 = time.perf_counter()
        source = self._image_source(collection, row)
        try:
            if isinstance(source, str):
                with open(source, "rb") as f:
                    source = f.read()
            with Image.open(io.BytesIO(source)) as im:
                kind = _CONTENT_TYPES.get(im.format or "")
        except Exception:
            kind = None
        if kind is None:
            raise QueryError(f"entry {row} of {collection.name!r} is not readable", status=404)
        self.metrics.observe("original", time.perf_counter() - t0)
        return source, kind

    def _image_source(self, collection: Collection, row: int) -> str | bytes:
        from clipjax.search.sources import entry_image

        try:
            return entry_image(collection.index.entry(row))
        except (OSError, ValueError):
            raise QueryError(
                f"entry {row} of {collection.name!r} is not readable", status=404
            ) from None


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _dedup(
    embeddings: np.ndarray, scores: np.ndarray, ids: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Drop each result whose cosine with an earlier kept result is above `threshold`."""
    if len(ids) == 0:
        return scores, ids
    vecs = embeddings[ids].astype(np.float32)
    sims = vecs @ vecs.T
    keep: list[int] = []
    for j in range(len(ids)):
        if not keep or sims[j, keep].max() <= threshold:
            keep.append(j)
    return scores[keep], ids[keep]
