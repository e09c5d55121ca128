"""Sharded contrastive losses agree with the full-matrix references, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from clipjax.losses import (
    ema_update,
    infonce_gathered,
    infonce_reference,
    infonce_ring,
    queue_init,
    queue_push,
    sigmoid_gathered,
    sigmoid_reference,
    sigmoid_ring,
    token_similarity,
    tokenwise_gathered,
    tokenwise_reference,
)

# (mesh shape, axis names, batch axes): 1-D meshes of 1/2/4/8 shards and a 2-D batch (2, 4).
MESHES = {
    "1": ((1,), ("b",), ("b",)),
    "2": ((2,), ("b",), ("b",)),
    "4": ((4,), ("b",), ("b",)),
    "8": ((8,), ("b",), ("b",)),
    "2x4": ((2, 4), ("data", "fsdp"), ("data", "fsdp")),
}


def mesh_for(key):
    shape, names, axes = MESHES[key]
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names), axes


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def pairs(b, d, seed=0, noise=1.0):
    """Correlated image/text embeddings so the loss is far from log(B)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    img = unit(jax.random.normal(k1, (b, d)))
    txt = unit(img + noise * jax.random.normal(k2, (b, d)))
    return img, txt


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_close(got, want, tol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(g, w) <= tol, (rel_err(g, w), g, w)


def value_and_grads(fn, *args, argnums=(0, 1, 2)):
    return jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))(*args)


LOG_SCALE = jnp.float32(np.log(20.0))


# ---------------------------------------------------------------- softmax InfoNCE


def test_reference_matches_explicit_cross_entropy():
    img, txt = pairs(8, 4)
    logits = np.exp(float(LOG_SCALE)) * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
    labels = np.arange(8)

    def ce(lg):
        lg = lg - lg.max(1, keepdims=True)
        return np.mean(np.log(np.exp(lg).sum(1)) - lg[labels, labels])

    loss, aux = infonce_reference(img, txt, LOG_SCALE)
    np.testing.assert_allclose(loss, 0.5 * (ce(logits) + ce(logits.T)), rtol=1e-5)
    np.testing.assert_allclose(aux["i2t_acc"], np.mean(logits.argmax(1) == labels))
    np.testing.assert_allclose(aux["t2i_acc"], np.mean(logits.argmax(0) == labels))


@pytest.mark.parametrize("mesh_key", list(MESHES))
def test_infonce_impls_agree(mesh_key):
    mesh, axes = mesh_for(mesh_key)
    img, txt = pairs(32, 16, seed=1)
    (ref, ref_aux), ref_g = value_and_grads(infonce_reference, img, txt, LOG_SCALE)
    impls = {
        "gathered": lambda x, y, s: infonce_gathered(x, y, s, mesh, axes),
        "ring": lambda x, y, s: infonce_ring(x, y, s, mesh, axes),
        "ring_tiled": lambda x, y, s: infonce_ring(x, y, s, mesh, axes, tile=3),
    }
    for name, fn in impls.items():
        (val, aux), grads = value_and_grads(fn, img, txt, LOG_SCALE)
        assert rel_err(val, ref) <= 1e-5, name
        assert_close(grads, ref_g)  # d/d image, d/d text, d/d logit_scale
        assert_close(aux, ref_aux)


# ---------------------------------------------------------------- momentum queue


def test_queue_push_is_fifo_and_counts():
    q = queue_init(6, 2)
    rows = lambda start, b: jnp.arange(start, start + b, dtype=jnp.float32)[:, None].repeat(2, 1)
    q = queue_push(q, rows(0, 4), -rows(0, 4))
    assert int(q.ptr) == 4 and int(q.count) == 4
    q = queue_push(q, rows(4, 4), -rows(4, 4))  # wraps: slots 4, 5, 0, 1
    assert int(q.ptr) == 2 and int(q.count) == 6
    np.testing.assert_array_equal(q.image[:, 0], [6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(q.text[:, 0], -np.array([6, 7, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="larger than the queue"):
        queue_push(q, rows(0, 7), rows(0, 7))


def test_ema_update():
    ema = {"w": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    new = ema_update(ema, {"w": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(0.0)}}, 0.75)
    np.testing.assert_allclose(new["w"], [1.5, 1.5])
    np.testing.assert_allclose(new["b"]["c"], 3.0)


def filled_queue(k, d, filled, seed=5):
    img, txt = pairs(filled, d, seed=seed)
    return queue_push(queue_init(k, d), img, txt)


def test_queue_reference_equals_explicit_concatenation():
    img, txt = pairs(8, 8, seed=2)
    q = filled_queue(16, 8, filled=12)

    def concat_loss(x, y, ls):  # only the filled slots, no masking
        s = jnp.exp(ls)
        labels = jnp.arange(8)
        i2t = s * x @ jnp.concatenate([y, q.text[:12]]).T
        t2i = s * y @ jnp.concatenate([x, q.image[:12]]).T
        ce = optax.softmax_cross_entropy_with_integer_labels
        return 0.5 * (ce(i2t, labels).mean() + ce(t2i, labels).mean())

    want, want_g = jax.value_and_grad(concat_loss, argnums=(0, 1, 2))(img, txt, LOG_SCALE)
    (got, _), got_g = value_and_grads(
        lambda x, y, ls: infonce_reference(x, y, ls, queue=q), img, txt, LOG_SCALE
    )
    assert rel_err(got, want) <= 1e-5
    assert_close(got_g, want_g)
    assert float(got) > float(infonce_reference(img, txt, LOG_SCALE)[0])  # more negatives


@pytest.mark.parametrize("mesh_key", ["8", "2x4"])
def test_queue_sharded_impls_agree(mesh_key):
    mesh, axes = mesh_for(mesh_key)
    img, txt = pairs(16, 8, seed=3)
    q = filled_queue(32, 8, filled=20)  # some slots still empty, masked
    empty = queue_init(0, 8)
    (plain, _), plain_g = value_and_grads(infonce_reference, img, txt, LOG_SCALE)
    (ref, _), ref_g = value_and_grads(
        lambda x, y, s: infonce_reference(x, y, s, queue=q), img, txt, LOG_SCALE
    )
    for name, fn in {"gathered": infonce_gathered, "ring": infonce_ring}.items():
        (val, _), grads = value_and_grads(
            lambda x, y, s: fn(x, y, s, mesh, axes, queue=q), img, txt, LOG_SCALE
        )
        assert rel_err(val, ref) <= 1e-5, name
        assert_close(grads, ref_g)
        (val0, _), grads0 = value_and_grads(
            lambda x, y, s: fn(x, y, s, mesh, axes, queue=empty), img, txt, LOG_SCALE
        )
        assert rel_err(val0, plain) <= 1e-5, name  # K = 0 is plain InfoNCE
        assert_close(grads0, plain_g)
    (val, _), grads = value_and_grads(
        lambda x, y, s: infonce_ring(x, y, s, mesh, axes, queue=q, tile=2), img, txt, LOG_SCALE
    )
    assert rel_err(val, ref) <= 1e-5
    assert_close(grads, ref_g)


# ---------------------------------------------------------------- sigmoid (SigLIP)


def test_sigmoid_reference_matches_formula():
    img, txt = pairs(6, 4, seed=4)
    s, bias = 10.0, -3.0
    lg = s * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T + bias
    z = 2 * np.eye(6) - 1
    want = np.sum(np.log1p(np.exp(-z * lg))) / 6
    got, _ = sigmoid_reference(img, txt, jnp.float32(np.log(s)), jnp.float32(bias))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("mesh_key", ["1", "8", "2x4"])
def test_sigmoid_impls_agree(mesh_key):
    mesh, axes = mesh_for(mesh_key)
    img, txt = pairs(32, 16, seed=6)
    bias = jnp.float32(-4.0)
    args = (img, txt, LOG_SCALE, bias)
    grads_of = lambda fn: value_and_grads(fn, *args, argnums=(0, 1, 2, 3))
    (ref, _), ref_g = grads_of(sigmoid_reference)
    impls = {
        "gathered": lambda x, y, s, b: sigmoid_gathered(x, y, s, b, mesh, axes),
        "ring": lambda x, y, s, b: sigmoid_ring(x, y, s, b, mesh, axes),
        "ring_tiled": lambda x, y, s, b: sigmoid_ring(x, y, s, b, mesh, axes, tile=2),
    }
    for name, fn in impls.items():
        (val, _), grads = grads_of(fn)
        assert rel_err(val, ref) <= 1e-5, name
        assert_close(grads, ref_g)  # includes d/d logit_bias


# ---------------------------------------------------------------- token-wise


def token_inputs(b=8, n=3, l=5, d=8, seed=7):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    img_tok = unit(jax.random.normal(k1, (b, n, d)))
    txt_tok = unit(jax.random.normal(k2, (b, l, d)))
    lengths = jax.random.randint(k3, (b,), 1, l + 1)
    mask = jnp.arange(l)[None] < lengths[:, None]
    return img_tok, txt_tok, mask


def test_token_similarity_matches_loops():
    img_tok, txt_tok, mask = token_inputs(b=4)
    i2t, t2i = token_similarity(img_tok, txt_tok, mask)
    it, tt, m = map(np.asarray, (img_tok, txt_tok, mask))
    for i in range(4):
        for t in range(4):
            sims = it[i] @ tt[t][m[t]].T  # [N, real tokens]
            np.testing.assert_allclose(i2t[i, t], sims.max(1).mean(), rtol=1e-5)
            np.testing.assert_allclose(t2i[i, t], sims.max(0).mean(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["filip", "mean"])
@pytest.mark.parametrize("mesh_key", ["4", "2x4"])
def test_tokenwise_gathered_agrees(mesh_key, mode):
    mesh, axes = mesh_for(mesh_key)
    img_tok, txt_tok, mask = token_inputs(b=16)
    fn_ref = lambda i, t, s: tokenwise_reference(i, t, mask, s, mode=mode)
    fn = lambda i, t, s: tokenwise_gathered(i, t, mask, s, mesh, axes, mode=mode)
    (ref, ref_aux), ref_g = value_and_grads(fn_ref, img_tok, txt_tok, LOG_SCALE)
    (val, aux), grads = value_and_grads(fn, img_tok, txt_tok, LOG_SCALE)
    assert rel_err(val, ref) <= 1e-5
    assert_close(grads, ref_g)
    assert_close(aux, ref_aux)


def test_tokenwise_mean_mode_is_symmetric_global_similarity():
    img_tok, txt_tok, mask = token_inputs(b=6)
    i2t, t2i = token_similarity(img_tok, txt_tok, mask)
    sim = 0.5 * (i2t + t2i)
    lg = jnp.exp(LOG_SCALE) * sim
    labels = jnp.arange(6)
    ce = optax.softmax_cross_entropy_with_integer_labels
    want = 0.5 * (ce(lg, labels).mean() + ce(lg.T, labels).mean())
    got, _ = tokenwise_reference(img_tok, txt_tok, mask, LOG_SCALE, mode="mean")
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------- memory shape of the ring


def test_ring_never_holds_a_b_by_B_block():
    """Compiled temp memory of ring fwd+bwd stays far below one shard's b x B logits."""
    mesh, axes = mesh_for("8")
    b_global, d = 2048, 8
    img, txt = pairs(b_global, d, seed=8)
    grad = lambda fn: jax.jit(jax.grad(lambda x, y, s: fn(x, y, s)[0], argnums=(0, 1, 2)))
    ring_mem = (
        grad(lambda x, y, s: infonce_ring(x, y, s, mesh, axes, tile=64))
        .lower(img, txt, LOG_SCALE)
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
    )
    gat_mem = (
        grad(lambda x, y, s: infonce_gathered(x, y, s, mesh, axes))
        .lower(img, txt, LOG_SCALE)
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
    )
    b_by_B = (b_global // 8) * b_global * 4
    assert gat_mem >= b_by_B
    assert ring_mem < b_by_B / 4
