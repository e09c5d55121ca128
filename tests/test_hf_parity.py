"""Parity with transformers' FlaxCLIPModel (random weights, small config), both directions."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers import FlaxCLIPModel

from clipjax.export import hf
from clipjax.models import CLIP, CLIPConfig, stack_layer_params

VOCAB, CTX, IMG = 100, 16, 32
ATOL = 1e-5


def _hf_config(act: str) -> transformers.CLIPConfig:
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CTX,
        eos_token_id=VOCAB - 1,
        hidden_act=act,
    )
    vision = dict(
        hidden_size=48,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMG,
        patch_size=8,
        hidden_act=act,
    )
    return transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=24, logit_scale_init_value=2.0
    )


def _inputs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, IMG, IMG, 3)).astype(np.float32)
    text = rng.integers(1, VOCAB - 2, size=(3, CTX)).astype(np.int32)
    for row, length in enumerate([5, CTX, 9]):  # end-of-text = highest id, then zero padding
        text[row, length - 1] = VOCAB - 1
        text[row, length:] = 0
    return images, text


def _hf_outputs(model: FlaxCLIPModel, images, text, params):
    @jax.jit  # one compile instead of op-by-op dispatch
    def run(params, text, images):
        out = model(input_ids=text, pixel_values=images.transpose(0, 3, 1, 2), params=params)
        return out.image_embeds, out.text_embeds, out.logits_per_image

    return run(params, text, images)


@functools.cache
def _clipjax_forward(cfg: CLIPConfig):
    @jax.jit
    def run(params, images, text):
        out = CLIP(cfg).apply({"params": params}, images, text)
        logits = jnp.exp(out["logit_scale"]) * out["image_embeds"] @ out["text_embeds"].T
        return out["image_embeds"], out["text_embeds"], logits

    return run


def _clipjax_outputs(cfg: CLIPConfig, params, images, text):
    return _clipjax_forward(cfg)(params, images, text)


def _assert_close(a, b):
    for x, y, name in zip(a, b, ("image_embeds", "text_embeds", "logits")):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=0, err_msg=name)


def _random_like(abstract, seed: int, std: float = 0.2):
    """Random numpy values shaped like `abstract` (compiling a random init is slow on CPU)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['logit_scale']"):
            return np.asarray(2.5, np.float32)
        base = 1.0 if name.endswith("['scale']") else 0.0
        return (base + std * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_model(request):
    """A FlaxCLIPModel with random weights (LN scales near 1, biases non-zero)."""
    model = FlaxCLIPModel(_hf_config(request.param), _do_init=False)
    params = _random_like(model.params_shape_tree, seed=0)
    return model, params, _hf_outputs(model, *_inputs(), params)


def test_config_from_hf(hf_model):
    hf_model, _, _ = hf_model
    cfg = hf.config_from_hf(hf_model.config)
    assert (cfg.embed_dim, cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_heads) == (
        24,
        IMG,
        8,
        48,
        4,
    )
    assert (cfg.vocab_size, cfg.context_length, cfg.text_width, cfg.text_layers) == (
        VOCAB,
        CTX,
        32,
        2,
    )
    assert cfg.act == hf_model.config.text_config.hidden_act
    assert cfg.logit_scale_init == pytest.approx(2.0)
    # and back: the same architecture
    again = hf.config_from_hf(transformers.CLIPConfig(**hf.config_to_hf(cfg)))
    assert again == cfg


def test_import_matches_hf(hf_model):
    hf_model, hf_params, hf_out = hf_model
    images, text = _inputs()
    cfg = hf.config_from_hf(hf_model.config)
    params = hf.params_from_hf(hf_params, cfg)
    _assert_close(_clipjax_outputs(cfg, params, images, text), hf_out)


def test_import_scanned_layout_matches_hf(hf_model):
    hf_model, hf_params, hf_out = hf_model
    images, text = _inputs()
    cfg = dataclasses.replace(hf.config_from_hf(hf_model.config), scan_layers=True)
    params = hf.params_from_hf(hf_params, cfg)
    assert "blocks" in params["text"]["transformer"]
    _assert_close(_clipjax_outputs(cfg, params, images, text), hf_out)


def test_export_matches_clipjax(hf_model):
    """Random clipjax params -> HF layout -> FlaxCLIPModel gives clipjax's outputs."""
    hf_model, _, _ = hf_model
    images, text = _inputs()
    cfg = hf.config_from_hf(hf_model.config)
    abstract = nn.meta.unbox(
        jax.eval_shape(CLIP(cfg).init, jax.random.key(0), images, text)["params"]
    )
    params = _random_like(abstract, seed=1)
    hf_params = hf.params_to_hf(params, cfg)
    target = FlaxCLIPModel(transformers.CLIPConfig(**hf.config_to_hf(cfg)), _do_init=False)
    _assert_close(
        _hf_outputs(target, images, text, hf_params), _clipjax_outputs(cfg, params, images, text)
    )


def test_round_trips_are_exact(hf_model):
    hf_model, hf_params, hf_out = hf_model
    cfg = hf.config_from_hf(hf_model.config)
    back = hf.params_to_hf(hf.params_from_hf(hf_params, cfg), cfg)
    assert jax.tree.structure(back) == jax.tree.structure(hf_params)
    jax.tree.map(np.testing.assert_array_equal, back, hf_params)
    # clipjax (scanned) -> HF -> clipjax (scanned)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    ours = stack_layer_params(hf.params_from_hf(hf_params, cfg))
    again = hf.params_from_hf(hf.params_to_hf(ours, scan_cfg), scan_cfg)
    jax.tree.map(np.testing.assert_array_equal, again, ours)


def test_export_rejects_what_hf_cannot_hold():
    rn = CLIPConfig(vision_type="resnet", vision_width=8, vision_layers=(1, 1, 1, 1), image_size=64)
    with pytest.raises(ValueError, match="resnet"):
        hf.config_to_hf(rn)
    cfg = hf.config_from_hf(_hf_config("gelu"))
    biased = dataclasses.replace(cfg, logit_bias_init=-10.0)
    params = _random_like(
        nn.meta.unbox(jax.eval_shape(CLIP(biased).init, jax.random.key(0), *_inputs())["params"]), 0
    )
    with pytest.raises(ValueError, match="logit_bias"):
        hf.params_to_hf(params, biased)
    assert "logit_bias" not in hf.params_to_hf(params, biased, drop_logit_bias=True)


def test_import_rejects_bad_input():
    cfg = hf.config_from_hf(_hf_config("gelu"))
    with pytest.raises(ValueError, match="missing"):
        hf.params_from_hf({"text_model": {}}, cfg)
    bad_eos = _hf_config("gelu")
    bad_eos.text_config.eos_token_id = 7
    with pytest.raises(ValueError, match="eos_token_id"):
        hf.config_from_hf(bad_eos)
    mixed = _hf_config("gelu")
    mixed.vision_config.hidden_act = "quick_gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        hf.config_from_hf(mixed)
