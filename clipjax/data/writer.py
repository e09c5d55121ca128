"""Write (image, caption[, label]) items into TFRecord shards plus a `manifest.json`.

Items are first put in a seeded shuffled order by default (see `order`; class-sorted shards
make training batches of one category), then item i of that order goes to shard i // shard_size,
so a re-run with the same source and seed finds the same shards and skips those already
complete. Each shard is written under a temporary name and renamed when complete; the manifest
(also replaced atomically) records the order and per shard its count and the items skipped
(unreadable or corrupt image, empty or non-UTF-8 caption) with the reason.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import functools
import io
import itertools
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from clipjax.data import order as order_lib
from clipjax.data import schema
from clipjax.files import atomic_path, write_json

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "clipjax-shards/1"
JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One example from a source; `read()` returns the raw encoded image (may raise OSError)."""

    key: str
    origin: str  # where it came from, named in skip messages (a path, "a.tar:0001.jpg", ...)
    # text, or {caption field: text or list of texts} for several captions (schema: 'txt',
    # 'txt_synthetic', ...); anything else (null, a number, a bare list) is a bad caption
    caption: Any
    read: Callable[[], bytes]
    label: int | None = None


class ImageError(ValueError):
    """An image that cannot be decoded (corrupt, truncated, unknown format)."""


def encode_image(data: bytes, max_side: int | None = None) -> bytes:
    """Validate an encoded image by decoding it fully; return bytes the pipeline can decode.

    JPEG/PNG in RGB or grayscale, upright, without transparency, that fit `max_side` are kept
    byte-for-byte; anything else (other formats, alpha, 16-bit, CMYK, EXIF rotation, too large)
    is brought to RGB by `clipjax.data.image.to_rgb` (the rule every clipjax path follows),
    resized so the long side is `max_side`, and re-encoded as JPEG.
    """
    from PIL import Image

    from clipjax.data.image import exif_orientation, to_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: truncated or corrupt files fail here, not in training
            fmt, mode, size = im.format, im.mode, im.size
            too_big = max_side is not None and max(size) > max_side
            plain = mode in ("RGB", "L") and "transparency" not in im.info
            if fmt in ("JPEG", "PNG") and plain and exif_orientation(im) == 1 and not too_big:
                return data
            im = to_rgb(im)
            if max_side is not None and max(im.size) > max_side:
                scale = max_side / max(im.size)
                new_size = tuple(max(1, round(s * scale)) for s in im.size)
                im = im.resize(new_size, Image.BICUBIC, reducing_gap=3.0)
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=JPEG_QUALITY)
            return out.getvalue()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise ImageError(f"{type(e).__name__}: {e}") from None


def _encode_or_reason(data: bytes, max_side: int | None) -> tuple[bytes | None, str | None]:
    """Process-pool friendly wrapper: never raises, returns (bytes, None) or (None, reason)."""
    try:
        return encode_image(data, max_side), None
    except ImageError as e:
        return None, f"corrupt image ({e})"


def clean_caption(caption: Any) -> str:
    """The caption as stripped text; ValueError if it is not text (null, a number, a list...),
    not UTF-8 or empty."""
    if not isinstance(caption, (str, bytes)):
        kind = "null" if caption is None else f"{type(caption).__name__} {caption!r:.40}"
        raise ValueError(f"caption is {kind}, expected text")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("caption is not valid UTF-8") from None
    caption = caption.strip()
    if not caption:
        raise ValueError("empty caption")
    return caption


def clean_captions(caption: Any) -> str | dict[str, list[str]]:
    """`clean_caption` of one text; of every text of {field: text or list of texts} (a bad one
    is an error naming it), as {field: [texts]}."""
    if not isinstance(caption, dict) or not caption:
        return clean_caption(caption)  # a text, or the error for null, numbers, lists
    out = {}
    for field, texts in caption.items():
        if not schema.is_caption_field(field):
            raise ValueError(f"caption field {field!r}: expected 'txt' or 'txt_<name>'")
        texts = [texts] if isinstance(texts, (str, bytes)) else texts
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError(f"caption field {field!r} is {texts!r:.40}, expected text or a list")
        out[field] = []
        for i, text in enumerate(texts):
            try:
                out[field].append(clean_caption(text))
            except ValueError as e:
                raise ValueError(f"{field} caption {i + 1} of {len(texts)}: {e}") from None
    if schema.TEXT not in out:
        raise ValueError(f"captions {sorted(out)} lack the main field {schema.TEXT!r}")
    return out


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}{schema.SHARD_SUFFIX}"


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, schema.MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: unreadable manifest ({e}); remove it or use a fresh --out"
        ) from e


def _chunks(items: Iterable[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _check_order(out_dir: str, old: dict, new: dict) -> None:
    """Refuse to resume shards written in another order: the output would mix two orders."""
    if old == new:
        return
    same_seed = all(old.get(k) == new.get(k) for k in ("shuffled", "seed", "method"))
    if same_seed and new.get("method") == "permutation":
        raise ValueError(
            f"{out_dir}: its shards were written {order_lib.describe(old)} from a source of "
            f"{old.get('items')} items (digest {old.get('source_digest')}); the source now lists "
            f"{new['items']} (digest {new['source_digest']}), so the same seed would put other "
            "records in each shard; use a fresh --out directory"
        )
    if same_seed and new.get("method") == "buffer":
        raise ValueError(
            f"{out_dir}: its shards were written {order_lib.describe(old)}, this run would use "
            f"{order_lib.describe(new)}; re-run with --shuffle-buffer {old.get('buffer')} to "
            "resume, or use a fresh --out directory"
        )
    hint = f"--seed {old['seed']}" if old.get("shuffled") else "--keep-order"
    raise ValueError(
        f"{out_dir}: its manifest says the shards were written {order_lib.describe(old)}, this "
        f"run would write them {order_lib.describe(new)}; one directory must not mix orders: "
        f"re-run with {hint} to resume, or use a fresh --out directory"
    )


def _start_manifest(
    out_dir: str,
    prefix: str,
    shard_size: int,
    max_side: int | None,
    source: dict,
    classnames: list[str] | None,
    order: dict,
) -> dict:
    settings = {
        "prefix": prefix,
        "shard_size": shard_size,
        "max_side": max_side,
        "source": source,
        "classnames": classnames,
    }
    old = read_manifest(out_dir)
    if old is not None:
        # manifests from before shuffling existed hold shards in source order
        _check_order(out_dir, old.get("order", {"shuffled": False}), order)
        differs = [k for k, v in settings.items() if old.get(k) != v]
        if differs:
            raise ValueError(
                f"{out_dir} holds shards written with different settings "
                f"({', '.join(f'{k}: {old.get(k)!r} now {settings[k]!r}' for k in differs)}); "
                "re-run with the same settings to resume, or use a fresh --out directory"
            )
        old["shards"] = [
            s for s in old.get("shards", []) if os.path.exists(os.path.join(out_dir, s["file"]))
        ]
        old["complete"] = False
        old["order"] = order
        return old
    return {"format": MANIFEST_FORMAT, **settings, "order": order, "shards": [], "complete": False}


def _summarise(manifest: dict) -> None:
    shards = sorted(manifest["shards"], key=lambda s: s["index"])
    manifest["shards"] = shards
    manifest["num_examples"] = sum(s["count"] for s in shards)
    manifest["num_skipped"] = sum(len(s["skipped"]) for s in shards)


def _read_chunk(
    chunk: list[SourceItem],
) -> tuple[list[tuple[SourceItem, Any]], list[bytes], list[dict]]:
    """(item, cleaned caption(s)) pairs and raw image bytes of the usable items; skip records."""
    good, raw, skipped = [], [], []
    for item in chunk:
        try:
            caption = clean_captions(item.caption)
            data = item.read()
        except ValueError as e:
            skipped.append({"key": item.key, "origin": item.origin, "reason": str(e)})
            continue
        except OSError as e:
            skipped.append({"key": item.key, "origin": item.origin, "reason": f"unreadable ({e})"})
            continue
        good.append((item, caption))
        raw.append(data)
    return good, raw, skipped


def _write_shard(
    path: str, good: list[tuple[SourceItem, Any]], encoded: Iterable, skipped: list[dict]
) -> int:
    """Write one shard atomically; images that failed to encode are added to `skipped`."""
    import tensorflow as tf

    count = 0
    with atomic_path(path) as tmp, tf.io.TFRecordWriter(tmp) as w:
        for (item, caption), (image, reason) in zip(good, encoded):
            if image is None:
                skipped.append({"key": item.key, "origin": item.origin, "reason": reason})
                continue
            w.write(schema.make_example(image, caption, item.key, item.label))
            count += 1
    return count


def write_shards(
    items: Iterable[SourceItem],
    out_dir: str,
    *,
    source: dict,
    shard_size: int = 1000,
    max_side: int | None = None,
    workers: int = 1,
    prefix: str = "shard",
    classnames: list[str] | None = None,
    total: int | None = None,
    progress: bool = True,
    shuffle_seed: int | None = 0,
    shuffle_buffer: int = order_lib.DEFAULT_BUFFER,
) -> dict:
    """Write `items` as shards `out_dir/{prefix}-NNNNN.tfrecord`; returns the manifest dict.

    Items are written in a global permutation seeded by `shuffle_seed` (None: source order).
    Sources flagged `in_memory` (items already hold image bytes) get a bounded shuffle instead:
    their files in seeded order plus a `shuffle_buffer`-item buffer (see `order`). The manifest's
    `order` records which; resuming a directory with another order is refused.
    `source` describes where items come from (stored in the manifest; a re-run with a different
    source or settings is refused instead of mixing data). `workers` > 1 decodes/re-encodes images
    in that many processes. Already complete shards are skipped without reading their images.
    """
    _check_write_args(shard_size, max_side, workers)
    from tqdm.auto import tqdm

    items, order, count = order_lib.order_items(items, shuffle_seed, shuffle_buffer)
    total = count if count is not None else total
    os.makedirs(out_dir, exist_ok=True)
    manifest = _start_manifest(out_dir, prefix, shard_size, max_side, source, classnames, order)
    done = {s["index"] for s in manifest["shards"]}
    manifest_path = os.path.join(out_dir, schema.MANIFEST)
    _remove_leftovers(out_dir, prefix)

    pool = None
    if workers > 1:
        pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    encode = functools.partial(_encode_or_reason, max_side=max_side)
    bar = tqdm(total=total, unit="img", desc=f"shards -> {out_dir}", disable=not progress)
    try:
        for index, chunk in enumerate(_chunks(items, shard_size)):
            if index not in done:
                good, raw, skipped = _read_chunk(chunk)
                encoded = pool.map(encode, raw, chunksize=8) if pool else map(encode, raw)
                name = shard_name(prefix, index)
                count = _write_shard(os.path.join(out_dir, name), good, encoded, skipped)
                _record_shard(manifest, manifest_path, index, name, count, skipped)
            bar.update(len(chunk))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    manifest["complete"] = True
    _summarise(manifest)
    write_json(manifest_path, manifest)
    return manifest


def _check_write_args(shard_size: int, max_side: int | None, workers: int) -> None:
    """write_shards' sizes are positive (max_side may be None: no resizing)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def _remove_leftovers(out_dir: str, prefix: str) -> None:
    """Delete the temporary shard files a killed run left in `out_dir`."""
    for name in os.listdir(out_dir):
        if name.startswith("." + prefix + "-") and name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))


def _record_shard(
    manifest: dict, manifest_path: str, index: int, name: str, count: int, skipped: list[dict]
) -> None:
    """Log a written shard's skipped items and add the shard to the manifest on disk (a resume
    then skips it)."""
    for s in skipped:
        log.warning("skipped %s: %s", s["origin"], s["reason"])
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] != index]
    manifest["shards"].append({"index": index, "file": name, "count": count, "skipped": skipped})
    _summarise(manifest)
    write_json(manifest_path, manifest)


def write_record_shards(
    parts: Iterable[Iterable[bytes]],
    out_dir: str,
    *,
    source: dict,
    prefix: str = "shard",
    classnames: list[str] | None = None,
) -> dict:
    """Write already serialized records as shards, part i as `{prefix}-{i:05d}.tfrecord` (kept
    byte for byte: every feature stays), each atomically, then the manifest; returns it."""
    import tensorflow as tf

    os.makedirs(out_dir, exist_ok=True)
    _remove_leftovers(out_dir, prefix)
    manifest = {
        "format": MANIFEST_FORMAT,
        "prefix": prefix,
        "source": source,
        "classnames": classnames,
        "order": {"shuffled": False},
        "shards": [],
        "complete": False,
    }
    for index, records in enumerate(parts):
        name = shard_name(prefix, index)
        count = 0
        with atomic_path(os.path.join(out_dir, name)) as tmp, tf.io.TFRecordWriter(tmp) as w:
            for record in records:
                w.write(record)
                count += 1
        manifest["shards"].append({"index": index, "file": name, "count": count, "skipped": []})
    manifest["complete"] = True
    _summarise(manifest)
    write_json(os.path.join(out_dir, schema.MANIFEST), manifest)
    return manifest
