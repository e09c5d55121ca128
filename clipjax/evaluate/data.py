"""Evaluation inputs from a spec string: TFRecord shards, an image folder by class, or tfds.

  GLOB or DIR of *.tfrecord   labelled / captioned shards (clipjax.data.eval_pipeline.EvalPipeline)
  DIR of class sub-folders    root/<class>/<image>: labels by sorted folder name
  tfds:NAME[:SPLIT]           a prepared tfds dataset (default split: test)

Every source yields the same batches: 'image' float32 [B,S,S,3], 'text' int32 [B,L], 'label'
int32 [B] (when labelled), 'key' (str), 'mask' bool [B]. Unreadable images are skipped and
counted in `skipped`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipjax.data.stream import closing_iter
from clipjax.files import expand_globs

log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """A re-iterable of batches plus what is known about the set."""

    batches: Any  # iterable of batch dicts
    classnames: list[str] | None
    description: str
    skipped_fn: Any = field(default=lambda: 0)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)

    @property
    def skipped(self) -> int:
        return int(self.skipped_fn())


class SourceBatches:
    """Batches from a clipjax.data.sources.Source, images preprocessed with PIL in threads."""

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        image_size: int,
        context_length: int,
        limit: int | None = None,
        threads: int = 8,
    ):
        self.source, self.batch_size, self.image_size = source, batch_size, image_size
        self.context_length, self.limit, self.threads = context_length, limit, threads
        self.skipped = 0

    def _load(self, item: Any) -> np.ndarray | None:
        import io

        from PIL import Image

        from clipjax.data.image import preprocess

        try:
            with Image.open(io.BytesIO(item.read())) as im:
                return preprocess(im, self.image_size)
        except Exception as e:  # corrupt / truncated / unsupported files are skipped
            log.warning("skipping unreadable image %s: %s", item.origin, e)
            return None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        from clipjax.data.tokenizer import tokenize

        self.skipped = 0
        items, n = [], 0
        with ThreadPoolExecutor(self.threads) as pool:
            for item in self.source:
                if self.limit is not None and n >= self.limit:
                    break
                items.append(item)
                n += 1
                if len(items) == self.batch_size:
                    yield from self._batch(pool, items, tokenize)
                    items = []
            if items:
                yield from self._batch(pool, items, tokenize)

    def _batch(self, pool, items, tokenize) -> Iterator[dict[str, np.ndarray]]:
        images = list(pool.map(self._load, items))
        keep = [i for i, im in enumerate(images) if im is not None]
        self.skipped += len(items) - len(keep)
        if not keep:
            return
        b, k = self.batch_size, len(keep)
        captions = [_as_str(items[i].caption) for i in keep]
        batch = {
            "image": np.zeros((b, self.image_size, self.image_size, 3), np.float32),
            "text": np.zeros((b, self.context_length), np.int32),
            "key": np.array([items[i].key for i in keep] + [""] * (b - k), dtype=object),
            "mask": np.arange(b) < k,
        }
        batch["image"][:k] = np.stack([images[i] for i in keep])
        batch["text"][:k] = tokenize(captions, context_length=self.context_length)
        if items[0].label is not None:
            batch["label"] = np.zeros(b, np.int32)
            batch["label"][:k] = [items[i].label for i in keep]
        yield batch


def _as_str(caption: str | bytes) -> str:
    return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


def shard_files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        spec = os.path.join(spec, "*.tfrecord")
    return expand_globs([spec])


def open_eval_data(
    spec: str,
    *,
    image_size: int,
    context_length: int,
    batch_size: int,
    limit: int | None = None,
    tfds_fields: dict[str, str] | None = None,
    data_dir: str | None = None,
) -> EvalData:
    """Open `spec` (see module docstring) as evaluation batches; errors name the spec.
    `data_dir`: where tfds datasets are prepared (default: tfds's own default)."""
    sizes = dict(batch_size=batch_size, image_size=image_size, context_length=context_length)
    if spec.startswith("tfds:"):
        return _open_tfds(spec, sizes, limit, tfds_fields, data_dir)
    files = shard_files(spec)
    if files:
        return _open_shards(files, sizes, limit)
    if os.path.isdir(spec):
        from clipjax.data.sources import class_folder_source

        source = class_folder_source(spec)
        batches = SourceBatches(source, limit=limit, **sizes)
        return EvalData(
            batches, source.classnames, f"class folders {spec}", lambda: batches.skipped
        )
    raise ValueError(
        f"--data {spec!r}: matches no files; expected a glob or directory of "
        f"*.tfrecord shards, a directory with one sub-folder per class, or "
        f"tfds:NAME[:SPLIT]"
    )


def _open_tfds(
    spec: str,
    sizes: dict[str, int],
    limit: int | None,
    tfds_fields: dict[str, str] | None,
    data_dir: str | None,
) -> EvalData:
    """A `tfds:NAME[:SPLIT]` spec (split default 'test'), captioned by its labels unless
    `tfds_fields` names a text field."""
    from clipjax.data.sources import tfds_source

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise ValueError(f"--data {spec!r}: expected tfds:NAME or tfds:NAME:SPLIT")
    name, split = parts[1], parts[2] if len(parts) == 3 else "test"
    fields = dict(tfds_fields or {})
    fields.setdefault("image_field", "image")
    if "text_field" not in fields:
        fields.setdefault("label_field", "label")
    source = tfds_source(name, split, data_dir=data_dir, **fields)
    batches = SourceBatches(source, limit=limit, **sizes)
    return EvalData(batches, source.classnames, f"tfds {name} {split}", lambda: batches.skipped)


def _open_shards(files: list[str], sizes: dict[str, int], limit: int | None) -> EvalData:
    """TFRecord shards through the EvalPipeline; class names from their manifests."""
    from clipjax.data.eval_pipeline import EvalPipeline
    from clipjax.data.shards import dataset_classnames

    pipeline = EvalPipeline(
        files,
        global_batch=sizes["batch_size"],
        image_size=sizes["image_size"],
        context_length=sizes["context_length"],
    )
    batches = pipeline if limit is None else _limited(pipeline, limit)
    return EvalData(
        batches,
        dataset_classnames(files),
        f"{len(files)} TFRecord shards",
        lambda: pipeline.skipped,
    )


class _limited:
    """The first `limit` real examples of a batch iterable (later rows masked out)."""

    def __init__(self, batches: Any, limit: int):
        self.batches, self.limit = batches, limit

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        seen = 0
        with closing_iter(self.batches) as batches:  # left early: close the pipeline
            for batch in batches:
                if seen >= self.limit:
                    break
                mask = np.asarray(batch["mask"]).copy()
                real = np.flatnonzero(mask)
                mask[real[self.limit - seen :]] = False
                seen += int(mask.sum())
                yield {**batch, "mask": mask}
