"""Encoders, the CLIP model, presets: shapes, values, masks, scan/remat/bf16 equivalences."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax.models import (
    CLIP,
    LOGICAL_AXES,
    CLIPConfig,
    create_model,
    get_preset,
    num_params,
    stack_layer_params,
    unstack_layer_params,
)
from clipjax.models.layers import MultiHeadAttention, Transformer, make_attention_mask
from clipjax.models.resnet import AttentionPool2d
from clipjax.models.vit import PatchEmbedding

SMALL = CLIPConfig(
    embed_dim=16,
    image_size=16,
    patch_size=4,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    context_length=12,
    vocab_size=50,
    text_width=24,
    text_layers=2,
    text_heads=2,
)
SMALL_RN = dataclasses.replace(
    SMALL,
    vision_type="resnet",
    vision_width=8,
    vision_layers=(1, 1, 1, 1),
    vision_heads=4,
    image_size=64,
)


def _inputs(cfg: CLIPConfig, batch: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    text = rng.integers(1, cfg.vocab_size - 1, size=(batch, cfg.context_length)).astype(np.int32)
    for row in range(batch):
        length = 3 + (row * 4) % (cfg.context_length - 3)
        text[row, length - 1] = cfg.vocab_size - 1  # end-of-text: the highest id
        text[row, length:] = 0
    return jnp.asarray(images), jnp.asarray(text)


@functools.cache
def _jitted(module, **kwargs):
    return jax.jit(functools.partial(module.apply, **kwargs))


def _run(module, variables, *args, **kwargs):
    """module.apply under jit, compiled once per (module, kwargs): op-by-op is slow on CPU."""
    return _jitted(module, **kwargs)(variables, *args)


def _init(cfg: CLIPConfig, seed: int = 0):
    return nn.meta.unbox(jax.jit(CLIP(cfg).init)(jax.random.key(seed), *_inputs(cfg)))


def _random_variables(abstract, seed: int = 0, std: float = 0.1):
    """Random values shaped like `abstract` (numpy; avoids compiling an init, slow on CPU)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        base = 1.0 if name.endswith("['scale']") else 0.0
        return jnp.asarray(base + std * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract))


@pytest.fixture(scope="module")
def small_params():
    return _init(SMALL)["params"]


# --- presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [
        ("B/32", 151_277_313),
        ("B/16", 149_620_737),
        ("L/14", 427_616_513),
        ("RN50", 102_007_137),
        ("RN101", 119_688_033),
    ],
)
def test_preset_param_counts_equal_openai(name, expected):
    assert num_params(dataclasses.replace(get_preset(name), scan_layers=True)) == expected


def test_param_count_independent_of_scan():
    assert num_params(SMALL) == num_params(dataclasses.replace(SMALL, scan_layers=True))


def test_presets_and_overrides_validate():
    with pytest.raises(ValueError, match="unknown model preset 'B/99'"):
        get_preset("B/99")
    with pytest.raises(ValueError, match="unknown CLIPConfig override"):
        create_model("tiny", widht=3)
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(SMALL, patch_size=5)
    with pytest.raises(ValueError, match="remat"):
        dataclasses.replace(SMALL, remat="sometimes")
    with pytest.raises(ValueError, match="vision_layers"):
        dataclasses.replace(SMALL_RN, vision_layers=(1, 1))
    assert create_model("tiny", dtype="bfloat16").config.dtype == "bfloat16"
    assert CLIPConfig.from_dict(SMALL_RN.to_dict()) == SMALL_RN
    with pytest.raises(ValueError, match="attention"):
        dataclasses.replace(SMALL, attention="flash")
    with pytest.raises(ValueError, match="attention='cudnn' is invalid.*bf16"):
        dataclasses.replace(SMALL, attention="cudnn")  # float32 compute


# --- annotations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [SMALL, dataclasses.replace(SMALL, scan_layers=True), SMALL_RN],
    ids=["vit", "vit-scan", "resnet"],
)
def test_every_param_has_logical_axis_names(cfg):
    boxed = jax.eval_shape(CLIP(cfg).init, jax.random.key(0), *_inputs(cfg))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == len(leaf.value.shape)
        assert all(n is None or n in LOGICAL_AXES for n in leaf.names), leaf.names
        assert leaf.value.dtype == jnp.float32
    if cfg.scan_layers:
        assert any(leaf.names and leaf.names[0] == "layers" for leaf in leaves)


# --- the CLIP outputs ----------------------------------------------------------------------------


def test_output_contract(small_params):
    images, text = _inputs(SMALL)
    model = CLIP(SMALL)
    out = _run(model, {"params": small_params}, images, text)
    n_patches = (SMALL.image_size // SMALL.patch_size) ** 2
    assert out["image_embeds"].shape == (3, SMALL.embed_dim)
    assert out["image_tokens"].shape == (3, n_patches, SMALL.embed_dim)
    assert out["text_tokens"].shape == (3, SMALL.context_length, SMALL.embed_dim)
    for key in ("image_embeds", "text_embeds", "image_tokens", "text_tokens"):
        assert out[key].dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(out[key], axis=-1), 1.0, atol=1e-5)
    eot = np.argmax(np.asarray(text), axis=-1)
    np.testing.assert_array_equal(
        out["text_mask"], np.arange(SMALL.context_length)[None] <= eot[:, None]
    )
    # pooled text = the token at end-of-text
    np.testing.assert_allclose(out["text_embeds"], out["text_tokens"][np.arange(3), eot], atol=1e-6)
    assert float(out["logit_scale"]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert out["logit_bias"] is None
    np.testing.assert_allclose(
        _run(model, {"params": small_params}, images, method="encode_image"),
        out["image_embeds"],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        _run(model, {"params": small_params}, text, method="encode_text"),
        out["text_embeds"],
        atol=1e-6,
    )


def test_logit_scale_clamped_and_bias():
    cfg = dataclasses.replace(SMALL, logit_bias_init=-10.0)
    model = CLIP(cfg)
    params = model.init(jax.random.key(0), method="logit_params")["params"]
    assert float(nn.meta.unbox(params["logit_bias"])) == -10.0
    assert float(nn.meta.unbox(params["logit_scale"])) == pytest.approx(math.log(1 / 0.07))

    def logits(scale):
        variables = {"params": {"logit_scale": jnp.array(scale), "logit_bias": jnp.array(-3.0)}}
        return model.apply(variables, method="logit_params")

    scale, bias = logits(7.0)
    assert float(scale) == pytest.approx(math.log(100.0)) and float(bias) == -3.0
    assert float(logits(2.0)[0]) == 2.0


def test_wrong_image_size_is_a_clear_error(small_params):
    with pytest.raises(ValueError, match="expects 16x16"):
        CLIP(SMALL).apply(
            {"params": small_params}, jnp.zeros((1, 32, 32, 3)), method="encode_image"
        )


# --- masks ---------------------------------------------------------------------------------------


def test_causal_mask_later_tokens_do_not_change_earlier_outputs(small_params):
    _, text = _inputs(SMALL)
    changed = text.at[:, 6:].set((text[:, 6:] + 7) % (SMALL.vocab_size - 1))
    model = CLIP(SMALL)

    def tokens(t):
        return _run(model, {"params": small_params}, t, method=lambda m, t: m.text(t)[1])

    a, b = tokens(text), tokens(changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3  # the change is visible later on


def test_padding_mask_equals_running_on_the_unpadded_sequence():
    layer = Transformer(width=16, layers=2, heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    params = _random_variables(jax.eval_shape(layer.init, jax.random.key(1), x), seed=1, std=0.3)
    apply = jax.jit(layer.apply)
    lengths = [4, 7]
    key_mask = jnp.arange(7)[None] < jnp.asarray(lengths)[:, None]
    padded = apply(params, x, mask=make_attention_mask(7, 7, key_mask=key_mask))
    for row, n in enumerate(lengths):
        alone = apply(params, x[row : row + 1, :n])
        np.testing.assert_allclose(padded[row, :n], alone[0], atol=1e-5)
    unmasked = apply(params, x)
    assert np.abs(np.asarray(unmasked[0, :4] - padded[0, :4])).max() > 1e-3


def test_attention_matches_numpy_reference():
    """One block's attention against a direct numpy implementation (causal)."""
    layer = Transformer(width=8, layers=1, heads=2)
    x = jax.random.normal(jax.random.key(0), (1, 5, 8))
    params = _random_variables(jax.eval_shape(layer.init, jax.random.key(1), x), std=0.3)["params"][
        "block_0"
    ]
    mask = make_attention_mask(5, 5, causal=True)
    attn = MultiHeadAttention(num_heads=2)
    out = jax.jit(attn.apply)({"params": params["attn"]}, x, mask=mask)
    p = jax.tree.map(np.asarray, params["attn"])
    xn = np.asarray(x[0], np.float64)
    heads = []
    for h in range(2):
        q = xn @ p["query"]["kernel"][:, h] + p["query"]["bias"][h]
        k = xn @ p["key"]["kernel"][:, h] + p["key"]["bias"][h]
        v = xn @ p["value"]["kernel"][:, h] + p["value"]["bias"][h]
        s = q @ k.T / np.sqrt(4) + np.triu(np.full((5, 5), -np.inf), 1)
        w = np.exp(s - s.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ v)
    ref = sum(heads[h] @ p["out"]["kernel"][h] for h in range(2)) + p["out"]["bias"]
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    causal = jax.jit(MultiHeadAttention(num_heads=2, causal=True).apply)
    np.testing.assert_allclose(causal({"params": params["attn"]}, x)[0], ref, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on GPUs only")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [50, 77])
def test_cudnn_attention_equals_xla_value_and_grad(causal, length):
    kwargs = dict(num_heads=4, dtype=jnp.bfloat16, causal=causal)
    x = jax.random.normal(jax.random.key(0), (8, length, 256))
    xla, cudnn = MultiHeadAttention(**kwargs), MultiHeadAttention(**kwargs, attention="cudnn")
    params = xla.init(jax.random.key(1), x)

    def loss(module, params, x):
        return jnp.sum(module.apply(params, x).astype(jnp.float32) ** 2)

    ref_val, ref_grad = jax.jit(jax.value_and_grad(functools.partial(loss, xla)))(params, x)
    val, grad = jax.jit(jax.value_and_grad(functools.partial(loss, cudnn)))(params, x)
    np.testing.assert_allclose(val, ref_val, rtol=2e-2)
    # One scale for all: the key bias's true gradient is zero (softmax ignores a shared shift),
    # so both sides hold only rounding noise there.
    scale = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(ref_grad))
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=2e-2)


def test_patch_embedding_equals_strided_convolution_value_and_grad():
    """The matmul patch projection is the stride-p convolution it replaces, value and gradient."""
    images = jax.random.normal(jax.random.key(5), (2, 12, 12, 3))
    embed = PatchEmbedding(patch_size=4, width=6)
    params = nn.meta.unbox(embed.init(jax.random.key(6), images)["params"])
    assert params["kernel"].shape == (4, 4, 3, 6)

    def conv(kernel, x):
        y = jax.lax.conv_general_dilated(
            x, kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y.reshape(2, 9, 6)

    def ours(kernel, x):
        return embed.apply({"params": {"kernel": kernel}}, x)

    kernel = params["kernel"]
    np.testing.assert_allclose(ours(kernel, images), conv(kernel, images), atol=1e-5)

    def grads(f):
        return jax.grad(lambda k, x: jnp.sum(jnp.sin(f(k, x))), argnums=(0, 1))(kernel, images)

    _assert_trees_close(grads(ours), grads(conv))


# --- scan / remat / bf16 -------------------------------------------------------------------------

_X = jax.random.normal(jax.random.key(3), (2, 6, 16))
_CAUSAL = make_attention_mask(6, 6, causal=True)


@functools.cache
def _stack_value_and_grad(scan_layers: bool = False, remat: str = "none"):
    layer = Transformer(width=16, layers=3, heads=2, scan_layers=scan_layers, remat=remat)

    def loss(params, x):
        y = layer.apply({"params": params}, x, mask=_CAUSAL)
        return jnp.sum(jnp.sin(y)), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.fixture(scope="module")
def stack_reference():
    abstract = jax.eval_shape(Transformer(width=16, layers=3, heads=2).init, jax.random.key(4), _X)
    params = _random_variables(abstract["params"], seed=4, std=0.3)
    return params, _stack_value_and_grad()(params, _X)


def _assert_trees_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "dots")])
def test_scan_and_remat_equal_plain_loop_value_and_grad(stack_reference, scan, remat):
    params, ((loss0, y0), grads0) = stack_reference
    if scan:
        params = stack_layer_params(params)
        assert params["blocks"]["mlp"]["fc"]["kernel"].shape[0] == 3
    (loss1, y1), (gp, gx) = _stack_value_and_grad(scan, remat)(params, _X)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    np.testing.assert_allclose(y1, y0, atol=1e-6)
    _assert_trees_close(unstack_layer_params(gp) if scan else gp, grads0[0])
    np.testing.assert_allclose(gx, grads0[1], atol=1e-5)


def test_scanned_clip_equals_looped_clip(small_params):
    images, text = _inputs(SMALL)
    scan_cfg = dataclasses.replace(SMALL, scan_layers=True)
    stacked = stack_layer_params(small_params)
    abstract = nn.meta.unbox(
        jax.eval_shape(CLIP(scan_cfg).init, jax.random.key(0), images, text)["params"]
    )
    assert jax.tree.structure(abstract) == jax.tree.structure(stacked)
    out0 = _run(CLIP(SMALL), {"params": small_params}, images, text)
    out1 = _run(CLIP(scan_cfg), {"params": stacked}, images, text)
    for key in ("image_embeds", "text_embeds", "image_tokens", "text_tokens"):
        np.testing.assert_allclose(out1[key], out0[key], atol=1e-6, err_msg=key)
    _assert_trees_close(unstack_layer_params(stacked), small_params, tol=0)


def test_bfloat16_compute_is_close_to_float32(small_params):
    images, text = _inputs(SMALL)
    out32 = _run(CLIP(SMALL), {"params": small_params}, images, text)
    out16 = _run(
        CLIP(dataclasses.replace(SMALL, dtype="bfloat16")), {"params": small_params}, images, text
    )
    for key in ("image_embeds", "text_embeds", "image_tokens", "text_tokens"):
        assert out16[key].dtype == jnp.float32
        cos = jnp.sum(out16[key] * out32[key], axis=-1)
        assert float(cos.min()) > 0.99, key
        assert float(jnp.abs(out16[key] - out32[key]).max()) > 0  # really ran in a different dtype


# --- ResNet --------------------------------------------------------------------------------------


def test_resnet_tower_outputs_and_batch_stats():
    model = CLIP(SMALL_RN)
    images, text = _inputs(SMALL_RN)
    variables = _random_variables(
        jax.eval_shape(
            functools.partial(model.init, method="encode_image"), jax.random.key(0), images
        )
    )
    assert set(variables) == {"params", "batch_stats"}
    image_tokens = lambda m, x: m.visual(x)  # noqa: E731  (pooled, spatial tokens), unnormalised
    pooled, tokens = jax.eval_shape(
        functools.partial(model.apply, method=image_tokens), variables, images
    )
    assert pooled.shape == (3, SMALL_RN.embed_dim)
    assert tokens.shape == (3, (SMALL_RN.image_size // 32) ** 2, SMALL_RN.embed_dim)
    emb = _run(model, variables, images, method="encode_image")
    np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    # train mode normalises with batch statistics and updates the running ones
    emb_train, updates = _run(
        model, variables, images, method="encode_image", train=True, mutable=("batch_stats",)
    )
    before = variables["batch_stats"]["visual"]["bn1"]["mean"]
    after = updates["batch_stats"]["visual"]["bn1"]["mean"]
    assert np.abs(np.asarray(after - before)).max() > 0
    assert np.abs(np.asarray(emb_train - emb)).max() > 1e-4
    # eval mode uses the stored statistics: a row's output does not depend on the rest of the batch
    other = _run(model, variables, images.at[1:].set(-images[1:]), method="encode_image")
    np.testing.assert_allclose(other[0], emb[0], atol=1e-5)


def test_attention_pool_matches_numpy_reference():
    pool = AttentionPool2d(num_heads=2, output_dim=6)
    x = jax.random.normal(jax.random.key(0), (1, 2, 2, 8))
    params = _random_variables(jax.eval_shape(pool.init, jax.random.key(1), x), std=0.3)
    pooled, tokens = _run(pool, params, x)
    p = jax.tree.map(np.asarray, params["params"])
    feats = np.asarray(x[0], np.float64).reshape(4, 8)
    seq = np.concatenate([feats.mean(0, keepdims=True), feats]) + p["positional_embedding"]
    out_heads, tok_heads = [], []
    for h in range(2):
        q = seq[:1] @ p["q_proj"]["kernel"][:, h] + p["q_proj"]["bias"][h]
        k = seq @ p["k_proj"]["kernel"][:, h] + p["k_proj"]["bias"][h]
        v = seq @ p["v_proj"]["kernel"][:, h] + p["v_proj"]["bias"][h]
        s = q @ k.T / 2.0
        w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        out_heads.append((w @ v) @ p["c_proj"]["kernel"][h])
        tok_heads.append(v[1:] @ p["c_proj"]["kernel"][h])
    np.testing.assert_allclose(pooled[0], sum(out_heads)[0] + p["c_proj"]["bias"], atol=1e-5)
    np.testing.assert_allclose(tokens[0], sum(tok_heads) + p["c_proj"]["bias"], atol=1e-5)
