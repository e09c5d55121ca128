"""Embed an image collection (files, or the records of TFRecord / webdataset shards, see
`clipjax.search.sources`) into an index, resumably and incrementally.

Images are processed in chunks; each finished chunk is persisted before the next starts, so a
killed run resumes where it stopped, and re-running on a grown collection embeds only new files.
Unreadable images are skipped, recorded in the index, and not retried. Any file name works
(see `clipjax.search.index`), and the index is locked while a run writes it.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipjax.files import expand_globs
from clipjax.search.index import IndexWriter, display_path
from clipjax.search.sources import IndexItem, file_items, open_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def list_images(spec: str) -> list[str]:
    """Absolute paths of the images under a directory (recursively) or matching a glob."""
    if os.path.isdir(spec):
        found = [
            os.path.join(root, f)
            for root, _, files in os.walk(spec)
            for f in files
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not found:
            raise ValueError(
                f"--images {spec}: directory holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
    else:
        found = expand_globs(
            [spec],
            files_only=True,
            recursive=True,
            missing=lambda p: ValueError(
                f"--images {p!r}: matches no files; expected a directory or a glob of images"
            ),
        )
    return sorted(os.path.abspath(p) for p in found)


def load_image(path: str | bytes, preprocess: Callable) -> np.ndarray:
    """`preprocess` of the image in a file (path) or of encoded bytes."""
    with open_image(path) as im:
        return preprocess(im)


@dataclass
class BuildStats:
    total: int  # images found
    already: int  # in the index before this run (or recorded as unreadable)
    added: int
    failed: int
    index_size: int


def build_index(
    out: str,
    paths: Sequence[str] | Iterable[IndexItem],
    *,
    model: Any,
    params: Any,
    preprocess: Callable,
    fingerprint: str,
    model_path: str = "",
    float16: bool = False,
    batch_size: int = 64,
    chunk_size: int = 1024,
    mesh: Any = None,
    progress: bool = True,
    threads: int = 8,
) -> BuildStats:
    """Add every image file path (or `IndexItem` of a shard record) not yet in the index at
    `out` (created if missing). Items are read in a stream, `chunk_size` at a time."""
    from clipjax.evaluate.embed import Encoder

    cfg = model.config
    writer = IndexWriter(
        out,
        dim=cfg.embed_dim,
        dtype="float16" if float16 else "float32",
        model_fingerprint=fingerprint,
        model_path=model_path,
        image_size=cfg.image_size,
    )
    with writer:  # holds the index's lock until the last chunk is recorded
        done = writer.indexed_paths()
        total = len(paths) if isinstance(paths, Sequence) else None
        items = file_items(paths) if isinstance(paths, Sequence) else iter(paths)
        counts = {"seen": 0}

        def todo_items() -> Iterable[IndexItem]:
            for item in items:
                counts["seen"] += 1
                if item.id not in done:
                    yield item

        todo = todo_items()
        encoder = Encoder(model, params, mesh=mesh, batch_size=batch_size)
        bar = _progress(total, progress)
        added = failed = 0
        with ThreadPoolExecutor(threads) as pool:
            while chunk := list(itertools.islice(todo, chunk_size)):
                ok_paths, images, bad = _load_chunk(pool, chunk, preprocess)
                emb = (
                    encoder.images(np.stack(images))
                    if images
                    else np.zeros((0, cfg.embed_dim), np.float32)
                )
                writer.add_chunk(ok_paths, emb, failed=bad)
                added += len(ok_paths)
                failed += len(bad)
                bar.update(len(chunk))
        bar.close()
    seen = counts["seen"]
    if seen - added - failed:
        log.info("%s: %d of %d images were already indexed", out, seen - added - failed, seen)
    return BuildStats(
        total=seen,
        already=seen - added - failed,
        added=added,
        failed=failed,
        index_size=writer.meta.count,
    )


def _load_chunk(
    pool: ThreadPoolExecutor, chunk: Sequence[IndexItem], preprocess: Callable
) -> tuple[list[str | dict], list[np.ndarray], dict[str, str]]:
    """Load and preprocess `chunk`'s images in `pool` -> (readable entries, their images, {id:
    error} of the unreadable ones, which are skipped and counted)."""
    ok_entries, images, bad = [], [], {}
    for item, image, err in pool.map(lambda it: _load(it, preprocess), chunk):
        if image is None:
            log.warning("skipping unreadable image %s (%s)", display_path(item.id), err)
            bad[item.id] = err
        else:
            ok_entries.append(item.entry)
            images.append(image)
    return ok_entries, images, bad


def _load(item: IndexItem, preprocess: Callable) -> tuple[IndexItem, np.ndarray | None, str]:
    """(item, image, "") or (item, None, the error) for a corrupt/unsupported/vanished image."""
    try:
        return item, load_image(item.read(), preprocess), ""
    except Exception as e:
        return item, None, f"{type(e).__name__}: {e}"


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, desc="indexing")
