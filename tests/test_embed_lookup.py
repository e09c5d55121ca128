"""The token-embedding lookup with the gathered table gradient (clipjax.models.embed_lookup)
against jnp.take: value and gradient, on a batch split over 8 devices; the compiled gradient has
no vocabulary-sized all-reduce; large batches keep the dense form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clipjax.models.embed_lookup import embedding_lookup, gathered_grad_is_smaller
from clipjax.models.sharding import model_mesh
from clipjax.parallel.mesh import batch_sharding, make_mesh

V, W = 1000, 16


def loss_of(lookup):
    def loss(table, ids, weights):
        return jnp.sum(jnp.tanh(lookup(table, ids)) * weights)

    return loss


def sharded_grad(mesh, lookup, table, ids, weights):
    """value_and_grad under jit with the batch split over the mesh, traced in model_mesh."""
    rep = NamedSharding(mesh, P())
    fn = jax.value_and_grad(loss_of(lookup))

    def traced(*args):
        with model_mesh(mesh):
            return fn(*args)

    jitted = jax.jit(
        traced,
        in_shardings=(rep, batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=(rep, rep),
    )
    return jitted, jitted(table, ids, weights)


def dense_all_reduces(hlo: str) -> list[str]:
    """The compiled program's all-reduces with a [V, W] (table-sized) operand."""
    return [line for line in hlo.splitlines() if " all-reduce(" in line and f"[{V},{W}]" in line]


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(V, W)).astype(np.float32)
    ids = rng.integers(0, V, size=(16, 8)).astype(np.int32)
    ids[:, 0] = 7  # repeated rows: their cotangents must add up
    weights = rng.normal(size=(16, 8, W)).astype(np.float32)
    return table, ids, weights


def test_value_and_grad_match_take(inputs):
    table, ids, weights = inputs
    mesh = make_mesh({"data": 8})
    assert gathered_grad_is_smaller(V, W, ids.size)
    want_v, want_g = jax.value_and_grad(loss_of(lambda t, i: jnp.take(t, i, axis=0)))(
        table, ids, weights
    )
    jitted, (v, g) = sharded_grad(mesh, embedding_lookup, table, ids, weights)
    np.testing.assert_allclose(v, want_v, rtol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(g)[7]).sum() > 0
    hlo = jitted.lower(table, ids, weights).compile().as_text()
    assert not dense_all_reduces(hlo), dense_all_reduces(hlo)
    assert "all-gather" in hlo


def test_dense_form_for_large_batches(inputs):
    table, _, _ = inputs
    rng = np.random.default_rng(1)
    n = 2 * V * W // (W + 1) + 8  # more ids than the dense all-reduce is worth
    ids = rng.integers(0, V, size=(8, n // 8 + 1)).astype(np.int32)
    weights = rng.normal(size=ids.shape + (W,)).astype(np.float32)
    assert not gathered_grad_is_smaller(V, W, ids.size)
    mesh = make_mesh({"data": 8})
    want = jax.grad(loss_of(lambda t, i: jnp.take(t, i, axis=0)))(table, ids, weights)
    jitted, (_, g) = sharded_grad(mesh, embedding_lookup, table, ids, weights)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)
    hlo = jitted.lower(table, ids, weights).compile().as_text()
    assert dense_all_reduces(hlo)


def test_plain_take_without_mesh(inputs):
    table, ids, _ = inputs
    np.testing.assert_array_equal(embedding_lookup(table, ids), jnp.take(table, ids, axis=0))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: embedding_lookup(t, ids).sum()))(table))
    assert "custom_vjp" not in jaxpr
