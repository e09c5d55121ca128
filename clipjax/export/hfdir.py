"""Hugging Face CLIP directories on disk: read and write config.json + weights.

Weights are read from `flax_model.msgpack` (FlaxCLIPModel names) or `model.safetensors`
(PyTorch CLIPModel names), and written as both. The name mapping to clipjax lives in
`clipjax.export.hf`; this module only converts between the Flax and PyTorch spellings of HF's
names (kernel [in, out] <-> weight [out, in], HWIO <-> OIHW, scale/embedding -> weight).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from clipjax.export import hf
from clipjax.export import serialization as ser
from clipjax.files import write_bytes, write_text
from clipjax.models import CLIPConfig

FLAX_WEIGHTS = "flax_model.msgpack"
TORCH_WEIGHTS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
CONFIG_FILE = "config.json"
HF_FILES = {CONFIG_FILE, FLAX_WEIGHTS, TORCH_WEIGHTS}  # what `write_hf_dir` writes

# HF's PyTorch modules whose `weight` is a LayerNorm scale / an nn.Embedding table.
_NORM_NAMES = ("layer_norm1", "layer_norm2", "final_layer_norm", "pre_layrnorm", "post_layernorm")
_EMBED_NAMES = ("token_embedding", "position_embedding")


def is_hf_dir(path: str) -> bool:
    return ser.json_field(os.path.join(path, CONFIG_FILE), "model_type") == "clip"


def flax_to_torch_names(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """FlaxCLIPModel params -> CLIPModel state dict (numpy, PyTorch names and layouts)."""
    out = {}
    for name, v in ser.flatten_params(tree).items():
        parts = name.split("/")
        leaf = parts[-1]
        if leaf == "kernel" and v.ndim == 4:
            v, leaf = np.transpose(v, (3, 2, 0, 1)), "weight"  # HWIO -> OIHW
        elif leaf == "kernel":
            v, leaf = v.T, "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join(parts[:-1] + [leaf])] = np.array(v, dtype=np.float32, order="C")
    return out


def torch_to_flax_names(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """CLIPModel state dict -> FlaxCLIPModel params tree (inverse of `flax_to_torch_names`)."""
    flat = {}
    for name, v in sd.items():
        if name.endswith("position_ids"):  # a buffer, not a weight
            continue
        parts = name.split(".")
        leaf, module = parts[-1], parts[-2] if len(parts) > 1 else ""
        v = np.asarray(v)
        if leaf == "weight":
            if module in _NORM_NAMES:
                leaf = "scale"
            elif module in _EMBED_NAMES:
                leaf = "embedding"
            elif v.ndim == 4:
                v, leaf = np.transpose(v, (2, 3, 1, 0)), "kernel"
            else:
                v, leaf = v.T, "kernel"
        flat["/".join(parts[:-1] + [leaf])] = v
    return ser.unflatten_params(flat)


def read_hf_config(path: str) -> CLIPConfig:
    """CLIPConfig of an HF CLIP directory (defaults filled in by transformers' CLIPConfig)."""
    from transformers import CLIPConfig as HFConfig

    if not is_hf_dir(path):
        raise ValueError(
            f"{path}: not a Hugging Face CLIP directory (expected {CONFIG_FILE} "
            f'with "model_type": "clip")'
        )
    return hf.config_from_hf(HFConfig.from_pretrained(path).to_dict())


def read_hf_dir(path: str) -> tuple[CLIPConfig, dict[str, Any]]:
    """(config, clipjax params) of an HF CLIP directory."""
    config = read_hf_config(path)
    flax_file = os.path.join(path, FLAX_WEIGHTS)
    torch_file = os.path.join(path, TORCH_WEIGHTS)
    bin_file = os.path.join(path, TORCH_BIN)
    if os.path.isfile(flax_file):
        hf_params = ser.load_msgpack(flax_file)
    elif os.path.isfile(torch_file):
        hf_params = torch_to_flax_names(ser.load_safetensors_flat(torch_file))
    elif os.path.isfile(bin_file):
        from clipjax.export.openai import read_state_dict

        hf_params = torch_to_flax_names(read_state_dict(bin_file))
    else:
        raise FileNotFoundError(
            f"{path}: HF CLIP directory without weights (expected "
            f"{FLAX_WEIGHTS}, {TORCH_WEIGHTS} or {TORCH_BIN})"
        )
    return config, hf.params_from_hf(hf_params, config)


def write_hf_dir(
    out_dir: str, config: CLIPConfig, params: Mapping[str, Any], drop_logit_bias: bool = False
) -> None:
    """Write config.json, flax_model.msgpack and model.safetensors with HF CLIP names."""
    from transformers import CLIPConfig as HFConfig

    hf_cfg = HFConfig(**hf.config_to_hf(config))
    hf_params = hf.params_to_hf(params, config, drop_logit_bias=drop_logit_bias)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    ser.save_msgpack(hf_params, os.path.join(out_dir, FLAX_WEIGHTS))
    from safetensors.numpy import save

    write_bytes(
        os.path.join(out_dir, TORCH_WEIGHTS),
        save(flax_to_torch_names(hf_params), metadata={"format": "pt"}),
    )
    d = hf_cfg.to_dict()
    d["architectures"] = ["CLIPModel"]
    write_text(os.path.join(out_dir, CONFIG_FILE), json.dumps(d, indent=2, sort_keys=True))
