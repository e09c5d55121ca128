"""Patch dropout (FLIP): kept subsets, eval unchanged, a reference forward, the train step's RNG
(exact resume), gradient accumulation, layer scan and config validation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_train import batches, mesh_of, put, tiny_config

from clipjax.models import CLIP, CLIPConfig, dummy_inputs
from clipjax.models import patch_dropout as pd
from clipjax.models.layers import LayerNorm, Transformer
from clipjax.models.vit import PatchEmbedding
from clipjax.train.builder import build_trainer
from clipjax.train.config import ConfigError, validate
from clipjax.train.step import _apply, join_microbatches, split_microbatches

CFG = CLIPConfig(
    embed_dim=16,
    image_size=32,
    patch_size=8,  # 16 patches
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    context_length=8,
    vocab_size=64,
    text_width=16,
    text_layers=1,
    text_heads=2,
)
N = 16


def _inputs(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
    text = jnp.asarray(rng.integers(1, 60, size=(batch, 8)), jnp.int32)
    return images, text


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(CLIP(CFG).init(jax.random.PRNGKey(0), *dummy_inputs(CFG))["params"])


def _train(cfg, params, key, images, text):
    return CLIP(cfg).apply(
        {"params": params}, images, text, train=True, rngs={pd.PATCH_DROPOUT_RNG: key}
    )


# ---------------------------------------------------------------------------- the drop itself


def test_kept_patches_count():
    assert pd.kept_patches(196, 0.5) == 98
    assert pd.kept_patches(196, 0.75) == 49
    assert pd.kept_patches(16, 0.0) == 16
    assert pd.kept_patches(4, 0.9) == 1  # never zero patches
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pd.kept_patches(16, 1.0)


def test_drop_patches_keeps_class_token_and_a_distinct_subset():
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 1 + N, 8))
    y = np.asarray(pd.drop_patches(x, 0.75, jax.random.PRNGKey(2)))
    x = np.asarray(x)
    assert y.shape == (6, 1 + 4, 8)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    subsets = []
    for b in range(6):
        rows = [int(np.flatnonzero((x[b, 1:] == t).all(-1))[0]) for t in y[b, 1:]]
        assert len(set(rows)) == 4  # distinct patches, each an input patch row
        subsets.append(frozenset(rows))
    assert len(set(subsets)) > 1  # drawn per image, not one subset for the batch


def test_drop_patches_is_a_function_of_the_key():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 1 + N, 8))
    a = pd.drop_patches(x, 0.5, jax.random.PRNGKey(3))
    b = pd.drop_patches(x, 0.5, jax.random.PRNGKey(3))
    c = pd.drop_patches(x, 0.5, jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------------------------ the model


def test_eval_is_unchanged_and_p0_training_equals_eval(params):
    images, text = _inputs()
    want = CLIP(CFG).apply({"params": params}, images, text)
    dropped = dataclasses.replace(CFG, patch_dropout=0.75)
    got = CLIP(dropped).apply({"params": params}, images, text)  # train=False: no drop
    p0 = _train(CFG, params, jax.random.PRNGKey(5), images, text)
    for k in ("image_embeds", "image_tokens", "text_embeds"):
        np.testing.assert_array_equal(got[k], want[k])
        np.testing.assert_array_equal(p0[k], want[k])


def test_training_forward_equals_reference_on_the_kept_tokens(params, monkeypatch):
    """With p=0.75 the tower sees 1 + 4 tokens; its outputs equal a step-by-step reference
    forward (patch embed + positions, gather the kept rows, ln_pre, blocks, ln_post, proj)."""
    kept = []
    original = pd.kept_indices

    def recording(*args, **kw):
        idx = original(*args, **kw)
        kept.append(idx)
        return idx

    monkeypatch.setattr(pd, "kept_indices", recording)
    images, text = _inputs()
    cfg = dataclasses.replace(CFG, patch_dropout=0.75)
    out = _train(cfg, params, jax.random.PRNGKey(6), images, text)
    assert out["image_tokens"].shape == (4, 4, CFG.embed_dim)
    (idx,) = kept
    v = params["visual"]
    x = PatchEmbedding(8, 32).apply({"params": v["conv1"]}, images)
    cls = jnp.broadcast_to(v["class_embedding"], (4, 1, 32))
    x = jnp.concatenate([cls, x], 1) + v["positional_embedding"]
    x = jnp.concatenate([x[:, :1], jnp.take_along_axis(x[:, 1:], idx[..., None], 1)], 1)
    x = LayerNorm().apply({"params": v["ln_pre"]}, x)
    x = Transformer(width=32, layers=2, heads=2).apply({"params": v["transformer"]}, x)
    x = LayerNorm().apply({"params": v["ln_post"]}, x) @ v["proj"]
    norm = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(out["image_embeds"], norm(x[:, 0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["image_tokens"], norm(x[:, 1:]), rtol=1e-5, atol=1e-5)


def test_same_key_same_output_other_key_other_output(params):
    images, text = _inputs()
    cfg = dataclasses.replace(CFG, patch_dropout=0.5, scan_layers=True, remat="dots")
    from clipjax.models import stack_layer_params

    scanned = stack_layer_params(params)
    a = _train(cfg, scanned, jax.random.PRNGKey(7), images, text)
    b = _train(cfg, scanned, jax.random.PRNGKey(7), images, text)
    c = _train(cfg, scanned, jax.random.PRNGKey(8), images, text)
    assert a["image_tokens"].shape == (4, 8, CFG.embed_dim)
    np.testing.assert_array_equal(a["image_embeds"], b["image_embeds"])
    assert not np.allclose(a["image_embeds"], c["image_embeds"])
    np.testing.assert_array_equal(a["text_embeds"], c["text_embeds"])  # text tower untouched


def test_training_without_a_key_is_a_clear_error(params):
    cfg = dataclasses.replace(CFG, patch_dropout=0.5)
    with pytest.raises(ValueError, match="patch_dropout"):
        CLIP(cfg).apply({"params": params}, *_inputs(), train=True)


def test_fewer_flops_with_patch_dropout(params):
    images, text = _inputs()

    def flops(p):
        cfg = dataclasses.replace(CFG, patch_dropout=p)
        fn = jax.jit(lambda prm, im: _train(cfg, prm, jax.random.PRNGKey(0), im, text))
        cost = fn.lower(params, images).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["flops"]

    full, quarter = flops(0.0), flops(0.75)
    assert quarter < 0.6 * full, (quarter, full)  # 17 -> 5 image tokens; the text tower stays


# -------------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "half"])
def test_config_rejects_rates_outside_0_1(bad):
    with pytest.raises(ValueError, match=r"patch_dropout.*\[0, 1\)"):
        dataclasses.replace(CFG, patch_dropout=bad)


def test_config_rejects_patch_dropout_for_resnet():
    from clipjax.models import get_preset

    with pytest.raises(ValueError, match="ViT only"):
        dataclasses.replace(get_preset("RN50"), patch_dropout=0.5)


def test_train_config_validation_names_the_key():
    c = tiny_config()
    c.model.patch_dropout = 1.0
    with pytest.raises(ConfigError, match=r"config\.model.*patch_dropout"):
        validate(c, num_devices=1, check_files=False)


# ------------------------------------------------------------------------------ train step


@pytest.mark.parametrize("scan, mesh", [(False, (1, 1, 1)), (True, (2, 2, 1))])
def test_train_steps_are_a_function_of_the_state(scan, mesh):
    """p=0.5, looped layers on one device and scanned ones on a data x fsdp mesh: finite loss
    and gradient; two runs from one state agree bit for bit (the drop comes from the state's
    key, so a resumed run draws the same patches); another state key gives another loss."""
    c = tiny_config(**{"model.patch_dropout": 0.5, "model.scan_layers": scan})
    trainer = build_trainer(c, mesh_of(*mesh))
    data = batches(2)

    def run(state):
        losses = []
        for b in data:
            state, m = trainer.train_step(state, put(trainer, b))
            assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0
            losses.append(float(m["loss"]))
        return state, losses

    s1, l1 = run(trainer.init_state())
    s2, l2 = run(trainer.init_state())
    assert np.isfinite(l1).all()
    assert l1 == l2
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_array_equal(a, b)
    other = trainer.init_state()
    other = other.replace(rng=jax.random.fold_in(other.rng, 1))
    state, m = trainer.train_step(other, put(trainer, data[0]))
    assert float(m["loss"]) != l1[0]


def test_accumulated_gradients_with_patch_dropout_equal_a_reference():
    """Gradient caching over 2 microbatches with p=0.5: the recomputed forward drops the same
    patches as the cached one, so value and gradient equal differentiating the loss of the
    joined microbatch outputs (microbatch j keyed by fold_in(key, j))."""
    m = 2
    mesh = mesh_of(data=2)
    trainer = build_trainer(tiny_config(**{"model.patch_dropout": 0.5, "microbatches": m}), mesh)
    state = trainer.init_state()
    trainable, frozen = trainer.optimizer.split(state.params)
    batch = put(trainer, batches(1, seed=3)[0])
    key = jax.random.PRNGKey(9)
    opt = trainer.optimizer

    def reference(tr, b):
        micro = jax.tree.map(lambda x: split_microbatches(x, 2, m, mesh), b)
        outs = [
            _apply(
                trainer.model,
                opt.merge(tr, frozen),
                {},
                jax.tree.map(lambda x, j=j: x[j], micro),
                jax.random.fold_in(key, j),
            )[0]
            for j in range(m)
        ]
        joined = {
            k: join_microbatches(jnp.stack([o[k] for o in outs]), 2, mesh)
            for k in ("image_embeds", "text_embeds", "image_tokens", "text_tokens", "text_mask")
        }
        joined.update(logit_scale=outs[0]["logit_scale"], logit_bias=None)
        return trainer.loss.loss_fn(joined, {}, None, b)[0]

    want, want_g = jax.jit(jax.value_and_grad(reference))(trainable, batch)
    got = jax.jit(lambda t, b: trainer.grad_fn(t, frozen, {}, b, {}, None, rng=key))(
        trainable, batch
    )
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    flat_want = traverse_util.flatten_dict(jax.device_get(want_g))
    flat_got = traverse_util.flatten_dict(jax.device_get(got[-1]))
    gmax = max(np.abs(v).max() for v in flat_want.values())
    for k in flat_want:
        np.testing.assert_allclose(
            flat_got[k], flat_want[k], rtol=1e-4, atol=1e-5 * gmax, err_msg="/".join(k)
        )
