"""The clipjax model directory: what `export` writes and `load` reads.

  config.json            {"format": "clipjax-model", "version": 1, "config": CLIPConfig fields}
  params.safetensors     params flattened to '/'-joined names ("visual/conv1/kernel", ...)
   or params.msgpack     the same nested dict, flax msgpack serialisation
  batch_stats.safetensors / .msgpack   BatchNorm running statistics (ResNet image towers only)

Params are stored in the looped-layer layout ('block_0', 'block_1', ...), whatever `scan_layers`
the model was trained with; `read_model_dir` stacks them again when the config scans layers.
`save_model_dir` writes a sibling temporary directory and swaps it in: a reader (or a kill) sees
the old model or the new one, never a mix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from clipjax.export import serialization as ser
from clipjax.files import write_dir_atomically, write_text
from clipjax.models import CLIPConfig, stack_layer_params, unstack_layer_params

MODEL_FORMAT = "clipjax-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHT_FORMATS = ("safetensors", "msgpack")
WEIGHT_FILES = {c: {f"{c}.{f}" for f in WEIGHT_FORMATS} for c in ("params", "batch_stats")}
MODEL_FILES = {CONFIG_FILE, *WEIGHT_FILES["params"], *WEIGHT_FILES["batch_stats"]}


def variables_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables for `model.apply`: wraps plain params; passes a variables dict through
    (ResNet towers need 'batch_stats' next to 'params')."""
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


def is_replaceable(path: str) -> bool:
    """Whether an export may replace directory `path`: a clipjax or Hugging Face model directory
    holding only files that exports write (so replacing it loses nothing of the user's)."""
    from clipjax.export import hfdir

    names = set(os.listdir(path))
    if is_model_dir(path):
        return names <= MODEL_FILES and bool(names & WEIGHT_FILES["params"])
    if hfdir.is_hf_dir(path):
        return names <= hfdir.HF_FILES and bool(names - {hfdir.CONFIG_FILE})
    return False


def save_model_dir(
    out_dir: str, config: CLIPConfig, params: Mapping[str, Any], fmt: str = "safetensors"
) -> None:
    """Write config.json + weights as directory `out_dir`, atomically (see
    clipjax.files.write_dir_atomically). `params` may be bare params or a variables dict. An
    existing `out_dir` is replaced only if it is empty or `is_replaceable`; otherwise
    FileExistsError."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {fmt!r} not supported; expected one of {WEIGHT_FORMATS}")
    write_dir_atomically(
        out_dir, lambda d: _write_model_files(d, config, params, fmt), replaceable=is_replaceable
    )


def _write_model_files(
    out_dir: str, config: CLIPConfig, params: Mapping[str, Any], fmt: str
) -> None:
    for collection, tree in variables_of(params).items():
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
