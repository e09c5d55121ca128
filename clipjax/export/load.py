"""`clipjax.load(path) -> (model, variables, preprocess)` for every model source clipjax knows.

Sources, recognised by their contents:
  clipjax model directory   config.json {"format": "clipjax-model"} + params.safetensors|msgpack
  Hugging Face CLIP dir     config.json {"model_type": "clip"}
                            + flax_model.msgpack|model.safetensors
  training workdir          checkpoints/<step>/ (orbax) + config.json (the resolved train config)
  OpenAI/open_clip file     a .safetensors / .pt state dict with OpenAI CLIP names
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from clipjax.export import modeldir
from clipjax.export.serialization import flatten_params
from clipjax.models import (
    CLIP,
    CLIPConfig,
    abstract_variables,
    config_from_spec,
    unstack_layer_params,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
SOURCE_KINDS = ("clipjax", "hf", "workdir", "openai")


def detect_source(path: str) -> str:
    """Which kind of model `path` holds (one of SOURCE_KINDS); a clear error otherwise."""
    from clipjax.export.hfdir import is_hf_dir

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no such file or directory (expected a clipjax model "
            f"directory, a Hugging Face CLIP directory, a training workdir "
            f"or an OpenAI/open_clip state dict file)"
        )
    if os.path.isfile(path):
        if path.endswith((".safetensors", ".pt", ".pth", ".bin")):
            return "openai"
        raise ValueError(
            f"{path}: a file, but not a state dict (.safetensors/.pt); a model "
            f"directory or training workdir was expected"
        )
    if modeldir.is_model_dir(path):
        return "clipjax"
    if is_hf_dir(path):
        return "hf"
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return "workdir"
    raise ValueError(
        f'{path}: not a model: expected config.json with "format": '
        f'"{modeldir.MODEL_FORMAT}" (clipjax), config.json with "model_type": '
        f'"clip" (Hugging Face), or a training workdir with {CHECKPOINT_DIR}/'
    )


def load_config_and_params(
    path: str,
    *,
    step: int | None = None,
    openai_act: str = "quick_gelu",
    trust_torchscript: bool = False,
) -> tuple[CLIPConfig, dict[str, Any]]:
    """(config, params) from any source; params are host numpy arrays (a variables dict with
    'params' and 'batch_stats' for ResNet image towers). Files are read as data; only
    `trust_torchscript=True` lets a TorchScript .pt run its code (see openai.read_state_dict)."""
    kind = detect_source(path)
    if step is not None and kind != "workdir":
        raise ValueError(
            f"{path}: --step applies to training workdirs only; this is a {kind} model"
        )
    if kind == "clipjax":
        config, params = modeldir.read_model_dir(path)
    elif kind == "hf":
        from clipjax.export.hfdir import read_hf_dir

        config, params = read_hf_dir(path)
    elif kind == "workdir":
        config, params = read_workdir(path, step=step)
    else:
        from clipjax.export.openai import from_openai_state_dict, read_state_dict

        config, params = from_openai_state_dict(
            read_state_dict(path, trust_torchscript=trust_torchscript), act=openai_act
        )
    check_params(config, params, where=path)
    return config, params


def load(
    path: str, *, step: int | None = None, dtype: str | None = None, trust_torchscript: bool = False
) -> tuple[CLIP, dict[str, Any], Callable[[Any], np.ndarray]]:
    """Load a model for use: (model, variables, preprocess).

    `variables` is the flax variables dict of every architecture ({'params': ...}, plus
    'batch_stats' for ResNet towers): `model.apply(variables, images, method='encode_image')`
    embeds images; `preprocess(pil_image)` gives the float32 [S, S, 3] input of one image.
    `dtype='bfloat16'` sets the compute dtype. `trust_torchscript=True` allows torch.jit.load
    (which runs code stored in the file) for a TorchScript .pt that cannot be read as data only.
    """
    from clipjax.data.image import preprocess as _preprocess

    config, params = load_config_and_params(path, step=step, trust_torchscript=trust_torchscript)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    variables = modeldir.variables_of(params)
    return CLIP(config), variables, functools.partial(_preprocess, size=config.image_size)


# --------------------------------------------------------------------------- training workdirs
def model_config_from_train_config(train_config: Mapping[str, Any], where: str) -> CLIPConfig:
    """The CLIPConfig a resolved train config describes (its `model` section, read by
    `clipjax.models.config_from_spec` as the trainer does)."""
    model = train_config.get("model")
    if not isinstance(model, Mapping) or "preset" not in model:
        raise ValueError(f"{where}: train config has no model.preset")
    try:
        return config_from_spec(model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid model config: {e}") from e


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in a workdir (half-written ones are not listed)."""
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{workdir}: no {CHECKPOINT_DIR}/ directory; expected a training workdir"
        )
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    )
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def read_workdir(workdir: str, step: int | None = None) -> tuple[CLIPConfig, dict[str, Any]]:
    """(config, params) from a training workdir's latest (or given) complete checkpoint.

    The architecture comes from the workdir's model_config.json (a model directory's config
    format) or else from the resolved train config, config.json. ResNet towers get their
    BatchNorm statistics from the checkpointed model_state.
    """
    import orbax.checkpoint as ocp

    config = workdir_model_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir}: no complete checkpoint under {CHECKPOINT_DIR}/")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{workdir}: no complete checkpoint for step {step}; available: {steps}")
    path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step), STATE_ITEM)
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or "params" not in tree:
        raise ValueError(f"{path}: checkpoint has no 'params' entry")
    item = {"params": tree["params"]}
    if tree.get("model_state"):
        item["model_state"] = tree["model_state"]
    restore_args = _tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
    log.info("restored params of step %d from %s", step, workdir)
    if config.vision_type == "resnet":
        stats = out.get("model_state") or {}
        if "batch_stats" not in stats:
            raise ValueError(
                f"{path}: ResNet checkpoint without model_state.batch_stats "
                "(BatchNorm statistics; checkpoints written before the model_state "
                "field kept them in loss_state and need an older clipjax)"
            )
        return config, {"params": out["params"], "batch_stats": stats["batch_stats"]}
    return config, out["params"]


def workdir_model_config(workdir: str) -> CLIPConfig:
    model_cfg = os.path.join(workdir, "model_config.json")
    if os.path.isfile(model_cfg):
        with open(model_cfg, encoding="utf-8") as f:
            return modeldir.config_from_json(f.read(), model_cfg)
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{workdir}: neither model_config.json nor config.json (the "
            f"resolved train config); cannot tell the model architecture"
        )
    with open(cfg_path, encoding="utf-8") as f:
        try:
            train_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    return model_config_from_train_config(train_config, cfg_path)


def _tree_map(fn: Callable, tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


# --------------------------------------------------------------------------- checks
def check_params(config: CLIPConfig, params: Mapping[str, Any], where: str) -> None:
    """Raise a clear error if `params` does not fit the model `config` describes."""
    import flax.linen as nn

    expected = nn.meta.unbox(abstract_variables(dataclasses.replace(config, scan_layers=False)))
    got = modeldir.variables_of(params)
    if "batch_stats" not in expected:
        expected = {"params": expected["params"]}
    exp = {k: tuple(v.shape) for k, v in flatten_params(expected, as_numpy=False).items()}
    have = {
        k: tuple(np.shape(v))
        for k, v in flatten_params({c: unstack_layer_params(t) for c, t in got.items()}).items()
    }
    missing, extra = sorted(exp.keys() - have.keys()), sorted(have.keys() - exp.keys())
    if missing or extra:
        raise ValueError(
            f"{where}: parameters do not match the model config: missing "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
            f"{extra[:3]}{' ...' if len(extra) > 3 else ''}"
        )
    for k, shape in exp.items():
        if have[k] != shape:
            raise ValueError(
                f"{where}: parameter {k} has shape {have[k]}, the config expects {shape}"
            )


def model_fingerprint(config: CLIPConfig, params: Mapping[str, Any]) -> str:
    """A hash of the architecture and every weight; names the model an index was built with.

    Compute- and training-only settings (`SPEC_FIELDS`: dtype, remat, attention, patch dropout,
    layer scan) and the parameter layout do not change it.
    """
    arch = config.architecture()
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(arch, sort_keys=True).encode())
    variables = modeldir.variables_of(params)
    flat = flatten_params({c: unstack_layer_params(t) for c, t in variables.items()})
    for name in sorted(flat):
        v = np.ascontiguousarray(flat[name], dtype=np.float32)
        h.update(f"{name}:{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()
