"""The clipjax model directory: what `export` writes and `load` reads.

  config.json            {"format": "clipjax-model", "version": 1, "config": CLIPConfig fields}
  params.safetensors     params flattened to '/'-joined names ("visual/conv1/kernel", ...)
   or params.msgpack     the same nested dict, flax msgpack serialisation
  batch_stats.safetensors / .msgpack   BatchNorm running statistics (ResNet image towers only)

Params are stored in the looped-layer layout ('block_0', 'block_1', ...), whatever `scan_layers`
the model was trained with; `read_model_dir` stacks them again when the config scans layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from clipjax.export import serialization as ser
from clipjax.files import write_text
from clipjax.models import CLIPConfig, stack_layer_params, unstack_layer_params

MODEL_FORMAT = "clipjax-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHT_FORMATS = ("safetensors", "msgpack")


def variables_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables for `model.apply`: wraps plain params; passes a variables dict through.

    ResNet towers need 'batch_stats' next to 'params', so for them `clipjax.load` returns the
    variables dict {'params': ..., 'batch_stats': ...} in place of bare params.
    """
    if is_variables(params):
        return dict(params)
    return {"params": params}


def is_variables(tree: Mapping[str, Any]) -> bool:
    return isinstance(tree, Mapping) and "params" in tree and set(tree) <= {"params", "batch_stats"}


def config_to_json(config: CLIPConfig) -> str:
    """The model directory's config.json. The attention implementation is stored as the portable
    'xla' (cuDNN's runs on GPUs only): a model dir loads anywhere."""
    portable = dataclasses.replace(config, attention="xla")
    return json.dumps(
        {"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": portable.to_dict()},
        indent=1,
        sort_keys=True,
    )


def config_from_json(text: str, where: str) -> CLIPConfig:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
        raise ValueError(
            f'{where}: not a clipjax model config (expected "format": "{MODEL_FORMAT}")'
        )
    if d.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: clipjax model format version {d.get('version')} is not "
            f"supported (expected {FORMAT_VERSION})"
        )
    try:
        return CLIPConfig.from_dict(d["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid model config: {e}") from e


def is_model_dir(path: str) -> bool:
    return ser.json_field(os.path.join(path, CONFIG_FILE), "format") == MODEL_FORMAT


def save_model_dir(
    out_dir: str, config: CLIPConfig, params: Mapping[str, Any], fmt: str = "safetensors"
) -> None:
    """Write config.json + weights. `params` may be bare params or a variables dict."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {fmt!r} not supported; expected one of {WEIGHT_FORMATS}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    variables = variables_of(params)
    os.makedirs(out_dir, exist_ok=True)
    for collection in ("params", "batch_stats"):
        for f in WEIGHT_FORMATS:  # drop stale weights of another format from an earlier export
            stale = os.path.join(out_dir, f"{collection}.{f}")
            if f != fmt and os.path.exists(stale):
                os.remove(stale)
    for collection, tree in variables.items():
        tree = unstack_layer_params(ser.unflatten_params(ser.flatten_params(tree)))
        path = os.path.join(out_dir, f"{collection}.{fmt}")
        if fmt == "safetensors":
            ser.save_safetensors(tree, path, metadata={"format": MODEL_FORMAT})
        else:
            ser.save_msgpack(tree, path)
    # config.json last: a directory is only recognised as a model once its weights are complete.
    write_text(os.path.join(out_dir, CONFIG_FILE), config_to_json(config))


def read_model_dir(path: str) -> tuple[CLIPConfig, dict[str, Any]]:
    """(config, params) of a clipjax model directory; params is a variables dict for ResNets."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; expected a clipjax model directory")
    with open(cfg_path, encoding="utf-8") as f:
        config = config_from_json(f.read(), cfg_path)
    variables = {}
    for collection in ("params", "batch_stats"):
        tree = _read_collection(path, collection)
        if tree is not None:
            variables[collection] = stack_layer_params(tree) if config.scan_layers else tree
    if "params" not in variables:
        raise FileNotFoundError(
            f"{path}: no params.safetensors or params.msgpack next to {CONFIG_FILE}"
        )
    if config.vision_type == "resnet":
        if "batch_stats" not in variables:
            raise FileNotFoundError(
                f"{path}: ResNet model without batch_stats.safetensors / "
                f".msgpack (BatchNorm statistics)"
            )
        return config, variables
    return config, variables["params"]


def _read_collection(path: str, collection: str) -> dict[str, Any] | None:
    st = os.path.join(path, f"{collection}.safetensors")
    mp = os.path.join(path, f"{collection}.msgpack")
    if os.path.isfile(st):
        return ser.load_safetensors(st)
    if os.path.isfile(mp):
        return ser.load_msgpack(mp)
    return None
