"""Loss selection by config: validation errors and make_loss wiring on the project mesh."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clipjax.losses import (
    infonce_reference,
    make_loss,
    queue_init,
    queue_push,
    sigmoid_reference,
    tokenwise_reference,
    validate_loss_config,
)
from clipjax.parallel.mesh import make_mesh


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def model_outputs(b=16, d=8, n=3, l=4, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    img = unit(jax.random.normal(ks[0], (b, d)))
    return {
        "image_embeds": img,
        "text_embeds": unit(img + jax.random.normal(ks[1], (b, d))),
        "image_tokens": unit(jax.random.normal(ks[2], (b, n, d))),
        "text_tokens": unit(jax.random.normal(ks[3], (b, l, d))),
        "text_mask": jnp.arange(l)[None] < (1 + jnp.arange(b) % l)[:, None],
        "logit_scale": jnp.float32(np.log(10.0)),
        "logit_bias": jnp.float32(-2.0),
    }


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"name": "cosine"}, "loss.name"),
        ({"impl": "allreduce"}, "loss.impl"),
        ({"nmae": "softmax"}, "unknown key"),
        ({"name": "sigmoid", "queue_size": 64}, "loss.queue_size"),
        ({"name": "tokenwise", "impl": "ring"}, "loss.impl='ring' is not available"),
        ({"queue_size": -1}, "loss.queue_size"),
        ({"queue_size": 2.5}, "loss.queue_size"),
        ({"impl": "gathered", "tile": 128}, "loss.tile"),
        ({"impl": "ring", "tile": 0}, "loss.tile"),
        ({"positives": "labels"}, "loss.positives"),
        ({"in_batch_negatives": False}, "loss.queue_size > 0"),
        ({"in_batch_negatives": 0, "queue_size": 8}, "loss.in_batch_negatives"),
        ({"duplicate_threshold": 1.5}, "loss.duplicate_threshold"),
        ({"name": "sigmoid", "positives": "caption"}, "loss.name='softmax'"),
        ({"momentum": 1.0}, "loss.momentum"),
        ({"name": "tokenwise", "tokenwise_mode": "max"}, "loss.tokenwise_mode"),
    ],
)
def test_validate_rejects_with_named_key(cfg, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(")):
        validate_loss_config(cfg)


def test_validate_fills_defaults_from_configdict():
    cfg = validate_loss_config(ml_collections.ConfigDict({"impl": "ring", "tile": 256}))
    assert cfg["name"] == "softmax" and cfg["tile"] == 256 and cfg["queue_size"] == 0
    assert cfg["positives"] == "pair" and cfg["in_batch_negatives"]


def test_make_loss_checks_mesh_and_queue():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="loss.queue_size"):
        make_loss({"queue_size": 6}, mesh)  # not divisible by 4 batch shards
    with pytest.raises(ValueError, match="needs training shards with labels"):
        make_loss({"positives": "label"}, mesh)
    assert make_loss({"positives": "auto"}, mesh).positives == "caption"
    assert make_loss({"positives": "auto"}, mesh, has_labels=True).positives == "label"
    loss = make_loss({"queue_size": 8}, mesh)
    with pytest.raises(ValueError, match="no queue"):
        loss.loss_fn(model_outputs())
    with pytest.raises(ValueError, match="lack"):
        make_loss({"name": "sigmoid"}, mesh).loss_fn({**model_outputs(), "logit_bias": None})


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "softmax", "impl": "ring", "tile": 2},
        {"name": "softmax", "impl": "gathered", "queue_size": 16},
        {"name": "sigmoid", "impl": "ring"},
        {"name": "tokenwise", "impl": "gathered", "tokenwise_mode": "mean"},
    ],
)
def test_make_loss_matches_reference_on_3d_mesh(cfg):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    out = model_outputs()
    queue = None
    if cfg.get("queue_size"):
        queue = queue_push(queue_init(16, 8), out["image_embeds"][4:], out["text_embeds"][4:])
    mask = out.pop("text_mask")
    loss_fn = make_loss(cfg, mesh).loss_fn
    (loss, metrics), grads = jax.jit(
        jax.value_and_grad(
            lambda o, q: loss_fn({**o, "text_mask": mask}, q and {"queue": q}), has_aux=True
        )
    )(out, queue)
    name = cfg["name"]

    def reference(o):
        if name == "softmax":
            return infonce_reference(
                o["image_embeds"], o["text_embeds"], o["logit_scale"], queue=queue
            )
        if name == "sigmoid":
            return sigmoid_reference(
                o["image_embeds"], o["text_embeds"], o["logit_scale"], o["logit_bias"]
            )
        return tokenwise_reference(
            o["image_tokens"], o["text_tokens"], mask, o["logit_scale"], mode="mean"
        )

    (want, aux), want_grads = jax.value_and_grad(reference, has_aux=True)(out)
    for k in out:
        g, w = np.asarray(grads[k]), np.asarray(want_grads[k])
        assert np.linalg.norm(g - w) <= 1e-5 * max(np.linalg.norm(w), 1e-12), k
    if name == "sigmoid":
        np.testing.assert_allclose(metrics["logit_bias"], -2.0)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(metrics["temperature"], 10.0, rtol=1e-6)
    for k, v in aux.items():
        np.testing.assert_allclose(metrics[k], v)
