"""Host-local batches <-> global jax.Arrays split over the mesh's batch axes.

Every process feeds its own rows (its share of the global batch); `to_global` assembles them into
one array whose leading dimension is sharded over BATCH_AXES, and `fetch_local` gives a process
its rows back in the order it fed them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clipjax.parallel.mesh import batch_sharding


def to_global(batch: Mapping[str, np.ndarray] | np.ndarray, mesh: Mesh | None) -> Any:
    """A host-local array, or a dict of them, -> global array(s) split over the batch axes.

    String entries of a dict (keys, captions) stay on the host and are left out. Without a mesh
    the arrays go to the default device as they are.
    """
    if isinstance(batch, Mapping):
        return {k: to_global(v, mesh) for k, v in batch.items() if v.dtype.kind not in "SOU"}
    if mesh is None:
        return jnp.asarray(batch)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), batch)


def fetch_local(x: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded global array (all rows on a single host).

    Pairs with `to_global`: the rows come back in the order this host fed them in.
    """
    if x.is_fully_addressable:
        return np.asarray(x)
    seen, parts = set(), []
    for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
        start = shard.index[0].start or 0
        if start not in seen:  # replicas of the same rows on other local devices
            seen.add(start)
            parts.append(np.asarray(shard.data))
    return np.concatenate(parts)


def prefetch_to_device(batches: Iterable, mesh: Mesh, size: int = 2) -> Iterator:
    """Keep `size` batches in flight on the devices. Items may be batch dicts or
    (batch, state) pairs as yielded by TrainPipeline; the shape of items is preserved. Close the
    generator when done early: that closes `batches`' iterator."""
    queue: deque = deque()

    def put(item):
        if isinstance(item, tuple):
            return (to_global(item[0], mesh),) + tuple(item[1:])
        return to_global(item, mesh)

    items = iter(batches)
    try:
        for item in items:
            queue.append(put(item))
            if len(queue) > size:
                yield queue.popleft()
    finally:  # closing this generator closes the source (and its pipeline) too
        if hasattr(items, "close"):
            items.close()
    while queue:
        yield queue.popleft()
