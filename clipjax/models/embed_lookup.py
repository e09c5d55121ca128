"""Token-embedding lookup whose table gradient is formed from the batch's gathered rows.

The gradient of `take(table, ids)` w.r.t. a replicated table is a scatter-add of the per-token
cotangents. With the batch split over devices, XLA forms it per device as a dense [V, W] array and
all-reduces that: the whole vocabulary table crosses the interconnect every step, even when the
batch touches a few hundred rows. On CPU multi-process runs (gloo over TCP) that dense all-reduce
of the 49408-row table took seconds per step (benchmarks/RESULTS.md, multi-process on CPU).

`embedding_lookup` instead all-gathers the ids and their cotangents (B*L*(W+1) numbers) and
scatter-adds them on every device, when that message is smaller than the dense all-reduce
(2*V*W, a ring all-reduce moving twice its size): small batches and short contexts, as in tests
and the CPU demo. Large-batch training (B*L beyond ~2V) keeps the dense all-reduce. The value and
gradient are those of `jnp.take(table, ids, axis=0)` either way (up to summation order).

The all-gather needs the mesh, which models do not know: it is placed only inside
`with clipjax.models.sharding.model_mesh(mesh):` (the train step sets it); elsewhere the lookup is
the plain gather.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clipjax.models.sharding import current_mesh


def gathered_grad_is_smaller(vocab: int, width: int, num_ids: int) -> bool:
    """True when all-gathering `num_ids` ids with their width-`width` cotangents moves fewer
    numbers than all-reducing the dense [vocab, width] gradient (2 * vocab * width)."""
    return num_ids * (width + 1) < 2 * vocab * width


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gathered_lookup(table: jax.Array, ids: jax.Array, vocab: int, mesh: Mesh) -> jax.Array:
    return jnp.take(table, ids, axis=0)


def _fwd(table, ids, vocab, mesh):
    return jnp.take(table, ids, axis=0), ids


def _bwd(vocab, mesh, ids, g):
    replicated = NamedSharding(mesh, P())
    ids_all = jax.lax.with_sharding_constraint(ids.reshape(-1), replicated)
    g_all = jax.lax.with_sharding_constraint(g.reshape(-1, g.shape[-1]), replicated)
    # Out-of-range ids read NaN in `take` (its fill mode) and contribute no gradient.
    grad = jnp.zeros((vocab, g.shape[-1]), g.dtype).at[ids_all].add(g_all, mode="drop")
    return grad, None


_gathered_lookup.defvjp(_fwd, _bwd)


def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`jnp.take(table, ids, axis=0)` ([V, W] table, int ids of any shape -> ids.shape + (W,));
    the table gradient is reduced in the smaller of the two forms (see the module docstring)."""
    vocab, width = table.shape
    mesh = current_mesh()
    if mesh is None or mesh.size == 1 or not gathered_grad_is_smaller(vocab, width, ids.size):
        return jnp.take(table, ids, axis=0)
    return _gathered_lookup(table, ids, vocab, mesh)
