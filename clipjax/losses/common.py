"""Shared pieces of the sharded losses: batch-axis bookkeeping, ring permutation, online LSE."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from clipjax.parallel.mesh import BATCH_AXES  # noqa: F401  (the losses' default batch axes)


def as_axes(batch_axes: str | Sequence[str]) -> tuple[str, ...]:
    return (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)


def batch_axis_size(mesh: Mesh, batch_axes: Sequence[str]) -> int:
    """Number of batch shards: the product of the batch axes' sizes (checked to exist)."""
    missing = [a for a in batch_axes if a not in mesh.shape]
    if missing:
        raise ValueError(
            f"loss batch_axes {tuple(batch_axes)}: axes {missing} are not in the mesh "
            f"(mesh axes: {tuple(mesh.axis_names)})"
        )
    return math.prod(mesh.shape[a] for a in batch_axes)


def check_divisible(size: int, n: int, what: str) -> None:
    if size % n:
        raise ValueError(f"{what} ({size}) must be divisible by the number of batch shards ({n})")


def check_pair(img: jax.Array, txt: jax.Array) -> None:
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(
            f"expected image and text embeddings of equal shape [B, D], "
            f"got {img.shape} and {txt.shape}"
        )


def ring_perm(n: int) -> list[tuple[int, int]]:
    """Shift every block one shard forward along the (flattened) batch axes."""
    return [(i, (i + 1) % n) for i in range(n)]


def tile_size(rows: int, tile: int | None) -> int:
    """Largest divisor of `rows` that is <= tile (all rows when tile is None)."""
    if tile is None or tile >= rows:
        return max(rows, 1)
    t = max(int(tile), 1)
    while rows % t:
        t -= 1
    return t


def to_tiles(x: jax.Array, t: int) -> jax.Array:
    return x.reshape((x.shape[0] // t, t) + x.shape[1:])


def from_tiles(x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _finite_or_zero(m: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(m), m, 0.0)


def block_lse(s: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(max, sum exp(s - max)) along `axis`; rows that are all -inf give (-inf, 0)."""
    m = s.max(axis)
    l = jnp.exp(s - jnp.expand_dims(_finite_or_zero(m), axis)).sum(axis)
    return m, l


def lse_combine(
    m: jax.Array, l: jax.Array, m2: jax.Array, l2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Merge two online log-sum-exp states (max, scaled sum)."""
    m_out = jnp.maximum(m, m2)
    ref = _finite_or_zero(m_out)
    return m_out, l * jnp.exp(m - ref) + l2 * jnp.exp(m2 - ref)


def queue_mask(queue) -> jax.Array:
    """[K] bool: which queue slots hold an entry (slots fill in order from 0)."""
    k = queue.image.shape[0]
    return jnp.arange(k) < queue.count
