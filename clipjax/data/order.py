"""The order in which the shard writer visits a source's items: shuffled by a seed by default.

Sources are often sorted by class (class folders, sorted CSVs, per-query scrapes); shards written
in that order make training batches hold one category. Two seeded shuffles:

- a global permutation (numpy `Generator(seed).permutation`) of all items, for sources whose
  items are lazy (the image is read by `item.read()` only when its shard is written), so the
  item list is metadata only;
- for sources whose items already carry their image bytes (`source.in_memory`: tfds, compressed
  webdataset tars), the source's files in a seeded order (`source.shuffled_parts(seed)`, where it
  has files) followed by a seeded shuffle buffer of `buffer_size` items, so memory stays bounded.

Both are deterministic in the seed and the source, so a re-run finds the same records in shard k.
The returned `order` dict is stored in the manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from clipjax.data.writer import SourceItem

DEFAULT_BUFFER = 10_000


def permuted(items: Iterable[SourceItem], seed: int) -> list[SourceItem]:
    """All of `items` in the order of `np.random.default_rng(seed).permutation`."""
    items = list(items)
    perm = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in perm]


def buffer_shuffled(items: Iterable[Any], seed: int, buffer_size: int) -> Iterator[Any]:
    """A seeded shuffle holding at most `buffer_size` items: each new item replaces a random
    one of the buffer, which is yielded; the rest is yielded permuted at the end."""
    rng = np.random.default_rng(seed)
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = int(rng.integers(buffer_size))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def _digest(items: list[SourceItem]) -> str:
    """A short hash of the items' keys and origins in source order: the permutation only gives
    the same shards when the source lists the same items."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\0{it.origin}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def order_items(
    items: Iterable[SourceItem], seed: int | None, buffer_size: int = DEFAULT_BUFFER
) -> tuple[Iterable[SourceItem], dict, int | None]:
    """(items in writing order, the manifest's `order` record, item count when known).

    `seed` None keeps the source order. `items` may be a `sources.Source`, whose `in_memory`
    and `shuffled_parts` select the bounded shuffle; any other iterable is treated as lazy.
    """
    if seed is None:
        return items, {"shuffled": False}, None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(
            f"shuffle seed must be an integer >= 0 (or None to keep the source order), got {seed!r}"
        )
    seed = int(seed)
    if getattr(items, "in_memory", False):
        if buffer_size < 1:
            raise ValueError(f"shuffle buffer must be >= 1, got {buffer_size}")
        parts = getattr(items, "shuffled_parts", None)
        stream = parts(seed) if parts is not None else items
        order = {
            "shuffled": True,
            "seed": seed,
            "method": "buffer",
            "buffer": buffer_size,
            "files_shuffled": parts is not None,
        }
        return buffer_shuffled(stream, seed, buffer_size), order, None
    listed = list(items)
    order = {
        "shuffled": True,
        "seed": seed,
        "method": "permutation",
        "items": len(listed),
        "source_digest": _digest(listed),
    }
    return permuted(listed, seed), order, len(listed)


def describe(order: dict) -> str:
    """`order` in words, for error messages."""
    if not order.get("shuffled"):
        return "in source order"
    how = f" by a {order['buffer']}-item buffer" if order.get("method") == "buffer" else ""
    return f"shuffled with seed {order.get('seed')}{how}"
