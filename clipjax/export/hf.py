"""Hugging Face `FlaxCLIPModel` <-> clipjax: configuration and parameter mapping, both directions.

HF params are the `FlaxCLIPModel.params` pytree (kernels [in, out], patch conv HWIO, like flax);
the only reshapes are the attention projections, which clipjax keeps per head
([embed, heads, head_dim] and [heads, head_dim, embed]). Conversions are exact (no arithmetic).

HF CLIP has no ResNet tower and no logit bias: exporting such a model raises a clear error.
HF pools text at the first `eos_token_id` (or at argmax for the legacy id 2); clipjax pools at
argmax, so imported configs must have the end-of-text id as the highest id of the vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from clipjax.models.clip import CLIPConfig
from clipjax.models.layers import stack_layer_params, unstack_layer_params

_LEGACY_EOS_ARGMAX = 2  # HF's marker for "pool at argmax" (configs from before the eos fix)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def config_from_hf(hf_config: Any) -> CLIPConfig:
    """A CLIPConfig from a `transformers.CLIPConfig` (or its `to_dict()`)."""
    text = _get(hf_config, "text_config")
    vision = _get(hf_config, "vision_config")
    if text is None or vision is None:
        raise ValueError("expected a transformers CLIPConfig with text_config and vision_config")

    def same(key: str) -> Any:
        t, v = _get(text, key), _get(vision, key)
        if t != v:
            raise ValueError(
                f"HF config has text {key}={t!r} but vision {key}={v!r}; "
                "clipjax uses one value for both"
            )
        return t

    ratios = {_get(c, "intermediate_size") / _get(c, "hidden_size") for c in (text, vision)}
    if len(ratios) != 1:
        raise ValueError(
            "HF config has different MLP ratios (intermediate_size / hidden_size) per tower: "
            f"{sorted(ratios)}; "
            "clipjax uses one mlp_ratio"
        )
    vocab = _get(text, "vocab_size")
    eos = _get(text, "eos_token_id")
    if eos not in (_LEGACY_EOS_ARGMAX, vocab - 1):
        raise ValueError(
            f"HF text eos_token_id={eos} with vocab_size={vocab}: "
            "clipjax pools at the highest token id, "
            f"so eos_token_id must be vocab_size - 1 ({vocab - 1}) or the legacy argmax marker 2"
        )
    return CLIPConfig(
        embed_dim=_get(hf_config, "projection_dim"),
        vision_type="vit",
        image_size=_get(vision, "image_size"),
        patch_size=_get(vision, "patch_size"),
        vision_width=_get(vision, "hidden_size"),
        vision_layers=_get(vision, "num_hidden_layers"),
        vision_heads=_get(vision, "num_attention_heads"),
        context_length=_get(text, "max_position_embeddings"),
        vocab_size=vocab,
        text_width=_get(text, "hidden_size"),
        text_layers=_get(text, "num_hidden_layers"),
        text_heads=_get(text, "num_attention_heads"),
        mlp_ratio=ratios.pop(),
        act=same("hidden_act"),
        layer_norm_eps=same("layer_norm_eps"),
        logit_scale_init=float(
            _get(hf_config, "logit_scale_init_value", CLIPConfig.logit_scale_init)
        ),
    )


def _check_exportable(cfg: CLIPConfig) -> None:
    if cfg.vision_type != "vit":
        raise ValueError(
            f"HF CLIP has no {cfg.vision_type!r} image tower; only ViT models can be exported"
        )


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.CLIPConfig(**d)` describing the same architecture."""
    _check_exportable(cfg)
    mlp = lambda w: int(round(w * cfg.mlp_ratio))  # noqa: E731
    return {
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "text_config": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.text_width,
            "intermediate_size": mlp(cfg.text_width),
            "projection_dim": cfg.embed_dim,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "max_position_embeddings": cfg.context_length,
            "hidden_act": cfg.act,
            "layer_norm_eps": cfg.layer_norm_eps,
            # clipjax text ends with the highest id (end-of-text) and is padded with 0.
            "eos_token_id": cfg.vocab_size - 1,
            "bos_token_id": cfg.vocab_size - 2,
            "pad_token_id": 0,
        },
        "vision_config": {
            "hidden_size": cfg.vision_width,
            "intermediate_size": mlp(cfg.vision_width),
            "projection_dim": cfg.embed_dim,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads,
            "num_channels": 3,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "hidden_act": cfg.act,
            "layer_norm_eps": cfg.layer_norm_eps,
        },
    }


# ---------------------------------------------------------------------------------------------
# Parameters.


def _np(x: Any) -> np.ndarray:
    return np.asarray(x)


def _block_from_hf(hf: Mapping[str, Any], heads: int) -> dict[str, Any]:
    attn = hf["self_attn"]
    width = _np(attn["q_proj"]["kernel"]).shape[0]
    head_dim = width // heads

    def qkv(name: str) -> dict[str, np.ndarray]:
        return {
            "kernel": _np(attn[name]["kernel"]).reshape(width, heads, head_dim),
            "bias": _np(attn[name]["bias"]).reshape(heads, head_dim),
        }

    return {
        "ln_1": _ln(hf["layer_norm1"]),
        "attn": {
            "query": qkv("q_proj"),
            "key": qkv("k_proj"),
            "value": qkv("v_proj"),
            "out": {
                "kernel": _np(attn["out_proj"]["kernel"]).reshape(heads, head_dim, width),
                "bias": _np(attn["out_proj"]["bias"]),
            },
        },
        "ln_2": _ln(hf["layer_norm2"]),
        "mlp": {
            "fc": {
                "kernel": _np(hf["mlp"]["fc1"]["kernel"]),
                "bias": _np(hf["mlp"]["fc1"]["bias"]),
            },
            "proj": {
                "kernel": _np(hf["mlp"]["fc2"]["kernel"]),
                "bias": _np(hf["mlp"]["fc2"]["bias"]),
            },
        },
    }


def _block_to_hf(p: Mapping[str, Any]) -> dict[str, Any]:
    attn = p["attn"]
    width = _np(attn["query"]["kernel"]).shape[0]

    def qkv(name: str) -> dict[str, np.ndarray]:
        return {
            "kernel": _np(attn[name]["kernel"]).reshape(width, width),
            "bias": _np(attn[name]["bias"]).reshape(width),
        }

    return {
        "layer_norm1": _ln(p["ln_1"]),
        "self_attn": {
            "q_proj": qkv("query"),
            "k_proj": qkv("key"),
            "v_proj": qkv("value"),
            "out_proj": {
                "kernel": _np(attn["out"]["kernel"]).reshape(width, width),
                "bias": _np(attn["out"]["bias"]),
            },
        },
        "layer_norm2": _ln(p["ln_2"]),
        "mlp": {
            "fc1": {"kernel": _np(p["mlp"]["fc"]["kernel"]), "bias": _np(p["mlp"]["fc"]["bias"])},
            "fc2": {
                "kernel": _np(p["mlp"]["proj"]["kernel"]),
                "bias": _np(p["mlp"]["proj"]["bias"]),
            },
        },
    }


def _ln(p: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"scale": _np(p["scale"]), "bias": _np(p["bias"])}


def _encoder_from_hf(hf_encoder: Mapping[str, Any], layers: int, heads: int) -> dict[str, Any]:
    hf_layers = hf_encoder["layers"]
    if len(hf_layers) != layers:
        raise ValueError(f"HF encoder has {len(hf_layers)} layers, the config says {layers}")
    return {f"block_{i}": _block_from_hf(hf_layers[str(i)], heads) for i in range(layers)}


def _encoder_to_hf(transformer: Mapping[str, Any]) -> dict[str, Any]:
    n = len(transformer)
    return {"layers": {str(i): _block_to_hf(transformer[f"block_{i}"]) for i in range(n)}}


def params_from_hf(hf_params: Mapping[str, Any], cfg: CLIPConfig) -> dict[str, Any]:
    """clipjax params (layout per `cfg.scan_layers`) from `FlaxCLIPModel.params`.

    `cfg` (e.g. from `config_from_hf`) supplies the head counts, which the arrays do not carry.
    A `cfg.logit_bias_init` (HF has no bias) initialises `logit_bias` to that value.
    """
    _check_exportable(cfg)
    if "params" in hf_params and "text_model" not in hf_params:
        hf_params = hf_params["params"]
    missing = [
        k
        for k in (
            "text_model",
            "vision_model",
            "visual_projection",
            "text_projection",
            "logit_scale",
        )
        if k not in hf_params
    ]
    if missing:
        raise ValueError(f"not a FlaxCLIPModel params tree: missing {missing}")
    tm, vm = hf_params["text_model"], hf_params["vision_model"]
    params: dict[str, Any] = {
        "logit_scale": _np(hf_params["logit_scale"]).astype(np.float32),
        "text": {
            "token_embedding": _np(tm["embeddings"]["token_embedding"]["embedding"]),
            "positional_embedding": _np(tm["embeddings"]["position_embedding"]["embedding"]),
            "transformer": _encoder_from_hf(tm["encoder"], cfg.text_layers, cfg.text_heads),
            "ln_final": _ln(tm["final_layer_norm"]),
            "text_projection": _np(hf_params["text_projection"]["kernel"]),
        },
        "visual": {
            "conv1": {"kernel": _np(vm["embeddings"]["patch_embedding"]["kernel"])},
            "class_embedding": _np(vm["embeddings"]["class_embedding"]),
            "positional_embedding": _np(vm["embeddings"]["position_embedding"]["embedding"]),
            "ln_pre": _ln(vm["pre_layrnorm"]),
            "transformer": _encoder_from_hf(vm["encoder"], cfg.vision_layers, cfg.vision_heads),
            "ln_post": _ln(vm["post_layernorm"]),
            "proj": _np(hf_params["visual_projection"]["kernel"]),
        },
    }
    if cfg.logit_bias_init is not None:
        params["logit_bias"] = np.asarray(cfg.logit_bias_init, np.float32)
    _check_shapes(params, cfg)
    return stack_layer_params(params) if cfg.scan_layers else params


def params_to_hf(
    params: Mapping[str, Any], cfg: CLIPConfig, drop_logit_bias: bool = False
) -> dict[str, Any]:
    """`FlaxCLIPModel.params` from clipjax params (either layer layout).

    HF CLIP has no logit bias: a model with one raises unless `drop_logit_bias=True`.
    """
    _check_exportable(cfg)
    p = unstack_layer_params(params)
    if "logit_bias" in p and not drop_logit_bias:
        raise ValueError(
            "this model has a logit_bias, which HF CLIP cannot represent; "
            "pass drop_logit_bias=True to export without it"
        )
    t, v = p["text"], p["visual"]
    return {
        "logit_scale": _np(p["logit_scale"]),
        "text_model": {
            "embeddings": {
                "token_embedding": {"embedding": _np(t["token_embedding"])},
                "position_embedding": {"embedding": _np(t["positional_embedding"])},
            },
            "encoder": _encoder_to_hf(t["transformer"]),
            "final_layer_norm": _ln(t["ln_final"]),
        },
        "text_projection": {"kernel": _np(t["text_projection"])},
        "vision_model": {
            "embeddings": {
                "class_embedding": _np(v["class_embedding"]),
                "patch_embedding": {"kernel": _np(v["conv1"]["kernel"])},
                "position_embedding": {"embedding": _np(v["positional_embedding"])},
            },
            "pre_layrnorm": _ln(v["ln_pre"]),
            "encoder": _encoder_to_hf(v["transformer"]),
            "post_layernorm": _ln(v["ln_post"]),
        },
        "visual_projection": {"kernel": _np(v["proj"])},
    }


def _check_shapes(params: Mapping[str, Any], cfg: CLIPConfig) -> None:
    """Compare against the shapes the clipjax model would create; name the first mismatch."""
    import flax.linen as nn
    import jax

    from clipjax.models.clip import abstract_variables

    expected = nn.meta.unbox(
        abstract_variables(dataclasses.replace(cfg, scan_layers=False))["params"]
    )
    exp_flat = {
        jax.tree_util.keystr(k): v.shape
        for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    got_flat = {
        jax.tree_util.keystr(k): np.shape(v)
        for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    if exp_flat.keys() != got_flat.keys():
        diff = sorted(exp_flat.keys() ^ got_flat.keys())
        raise ValueError(
            f"converted params do not match the model's structure; differing entries: {diff[:5]}"
        )
    for k, shape in exp_flat.items():
        if tuple(got_flat[k]) != tuple(shape):
            raise ValueError(
                f"param {k} has shape {tuple(got_flat[k])}, the config expects {tuple(shape)}"
            )
