"""Start a run from another model's weights (`config.init`): load, match, resize, merge.

`init.path` is anything `clipjax.load` reads (clipjax model directory, Hugging Face CLIP
directory, OpenAI/open_clip state dict, training workdir at `init.step` or its latest checkpoint).
Parameters are matched by their '/'-joined path in the looped-layer layout
('visual/transformer/block_0/attn/...'), whatever `scan_layers` either side uses:

  - `init.include` / `init.exclude` (regexes, `re.search`) choose what is loaded; `include=""`
    selects everything, `exclude=""` nothing. The rest keeps its fresh initialisation.
  - `init.logit_scale="reset"` keeps the model's initial temperature (and logit bias) even when
    they are selected; "keep" loads them like any other parameter.
  - Shape changes: the image positional embedding is resampled to the new patch grid (2-D bicubic,
    `jax.image.resize`; the class-token row is kept as it is). The text positional embedding is
    truncated for a shorter context; for a longer one the learned rows are kept and the new rows
    keep their fresh initialisation (positions never seen in training have nothing to learn from).
    Any other shape difference stops the run before compiling with a ConfigError naming the
    parameter and both shapes.

Optimizer state and step start fresh; an EMA copy of the params (momentum losses) starts from the
loaded params. Only a fresh run applies init: a resumed run restores its checkpoint (see
clipjax.train.loop.restore_or_init). The plan is logged as a table and written to the workdir
(init_report.txt and init_report.json) by process 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from clipjax.files import write_json, write_text
from clipjax.models import CLIPConfig
from clipjax.train.config import ConfigError

log = logging.getLogger(__name__)

REPORT_TXT = "init_report.txt"
REPORT_JSON = "init_report.json"
LOGIT_SCALE_MODES = ("keep", "reset")
TEMPERATURE_PARAMS = ("logit_scale", "logit_bias")
IMAGE_POS = re.compile(r"^visual/(attnpool/)?positional_embedding$")
TEXT_POS = "text/positional_embedding"

# (collection, looped-layout name) -> fresh value (numpy, the model's shape) -> initial value.
Fill = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter's fate: status loaded | resized | fresh | unused (source only)."""

    name: str
    status: str
    source: tuple[int, ...] | None
    target: tuple[int, ...] | None
    note: str = ""


@dataclasses.dataclass
class InitPlan:
    """What to load where: `fills[(collection, name)]` makes a parameter's initial value from its
    fresh one; `rows` is the report."""

    source: dict[str, Any]
    rows: list[Row]
    fills: dict[tuple[str, str], Fill]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)


# --------------------------------------------------------------------------- names and shapes
def looped_names(tree: Any) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """{looped-layout name: (path in `tree`, layer index or None)} for a nested dict of arrays
    (or ShapeDtypeStructs), scanned ('blocks', stacked) or looped ('block_<i>')."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
        if "blocks" in path:
            i = path.index("blocks")
            for layer in range(leaf.shape[0]):
                name = "/".join(path[:i] + (f"block_{layer}",) + path[i + 1 :])
                out[name] = (path, layer)
        else:
            out["/".join(path)] = (path, None)
    return out


def _shape(leaf: Any, layer: int | None) -> tuple[int, ...]:
    shape = tuple(np.shape(leaf))
    return shape[1:] if layer is not None else shape


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


# --------------------------------------------------------------------------- resizing
def resample_image_posemb(pos: np.ndarray, tokens: int) -> np.ndarray:
    """[1 + g*g, W] -> [tokens, W]: the class-token row kept, the g x g grid resized bicubically
    to the new square grid (as big_vision and open_clip do when the resolution changes)."""
    g_src, g_dst = _grid_side(pos.shape[0]), _grid_side(tokens)
    if g_src is None or g_dst is None:
        raise ValueError(f"{pos.shape[0]} and {tokens} tokens are not 1 + a square grid")
    width = pos.shape[1]
    grid = np.asarray(pos[1:], np.float32).reshape(g_src, g_src, width)
    resized = jax.image.resize(grid, (g_dst, g_dst, width), method="bicubic")
    resized = np.asarray(jax.device_get(resized)).reshape(g_dst * g_dst, width)
    return np.concatenate([np.asarray(pos[:1], np.float32), resized]).astype(pos.dtype)


def resize_text_posemb(pos: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """[L_src, W] -> fresh's [L, W]: the first L learned rows, or all of them followed by fresh's
    rows beyond L_src."""
    n = fresh.shape[0]
    if pos.shape[0] >= n:
        return np.asarray(pos[:n])
    return np.concatenate([np.asarray(pos, fresh.dtype), fresh[pos.shape[0] :]])


def _grid_side(tokens: int) -> int | None:
    side = round((tokens - 1) ** 0.5)
    return side if side > 0 and side * side == tokens - 1 else None


def _resize(name: str, src: np.ndarray, target: tuple[int, ...]) -> tuple[Fill, str] | None:
    """(fill, note) when `name` may change shape from src's to `target`, else None."""
    if src.ndim != 2 or len(target) != 2 or src.shape[1] != target[1]:
        return None
    if IMAGE_POS.match(name):
        g_src, g_dst = _grid_side(src.shape[0]), _grid_side(target[0])
        if g_src is None or g_dst is None:
            return None
        out = resample_image_posemb(src, target[0])
        return (lambda fresh: out), f"bicubic {g_src}x{g_src} -> {g_dst}x{g_dst} grid"
    if name == TEXT_POS:
        kept = min(src.shape[0], target[0])
        note = (
            f"truncated to {target[0]} positions"
            if src.shape[0] > target[0]
            else f"{kept} learned positions + {target[0] - kept} fresh"
        )
        return (lambda fresh: resize_text_posemb(src, fresh)), note
    return None


# --------------------------------------------------------------------------- the plan
def make_plan(
    init: ml_collections.ConfigDict,
    source_vars: Mapping[str, Any],
    target_vars: Mapping[str, Any],
    frozen: frozenset[str] = frozenset(),
    source_info: dict[str, Any] | None = None,
) -> InitPlan:
    """Match the source's variables ({'params': ..., 'batch_stats': ...}, numpy) to the model's
    (the same collections, arrays or ShapeDtypeStructs). Raises ConfigError, before anything is
    compiled, for shape mismatches that cannot be resized and when nothing would be loaded.
    `frozen`: looped names of locked parameters (noted in the report)."""
    include = re.compile(init.include)
    exclude = re.compile(init.exclude) if init.exclude else None
    rows: list[Row] = []
    fills: dict[tuple[str, str], Fill] = {}
    mismatches: list[str] = []
    for collection, tree in target_vars.items():
        if not tree:
            continue
        src_tree = source_vars.get(collection) or {}
        src_names = looped_names(src_tree)
        suffix = "" if collection == "params" else f" ({collection})"
        for name, (path, layer) in looped_names(tree).items():
            target = _shape(_get(tree, path), layer)
            locked = " [locked]" if name in frozen else ""
            fresh = _fresh_note(name, init, include, exclude, src_names, locked)
            if fresh is not None:
                rows.append(Row(name + suffix, "fresh", None, target, fresh))
                continue
            src = _source_array(src_tree, *src_names[name])
            if src.shape == target:
                fills[(collection, name)] = lambda fresh, src=src: src
                rows.append(Row(name + suffix, "loaded", src.shape, target, locked.strip()))
                continue
            resized = _resize(name, src, target)
            if resized is None:
                mismatches.append(f"{name}{suffix}: source {src.shape}, model {target}")
                continue
            fills[(collection, name)] = resized[0]
            rows.append(Row(name + suffix, "resized", src.shape, target, resized[1] + locked))
        used = {r.name for r in rows}
        for name, (spath, slayer) in src_names.items():
            if name + suffix not in used:
                shape = _shape(_get(src_tree, spath), slayer)
                rows.append(Row(name + suffix, "unused", shape, None, "not in the model"))
    _check_plan(init, source_vars, fills, mismatches)
    return InitPlan(source=dict(source_info or {}), rows=rows, fills=fills)


def _fresh_note(name, init, include, exclude, src_names, locked: str) -> str | None:
    """Why the model's variable `name` keeps its fresh initialisation (the report's note), or
    None when the source provides it."""
    if not include.search(name):
        return "not included" + locked
    if exclude is not None and exclude.search(name):
        return "excluded" + locked
    if init.logit_scale == "reset" and name in TEMPERATURE_PARAMS:
        return "logit_scale=reset"
    if name not in src_names:
        return "not in source" + locked
    return None


def _source_array(src_tree: Mapping[str, Any], path, layer) -> np.ndarray:
    """The source variable at `path` (its layer `layer` of a scanned stack, if not None)."""
    src = np.asarray(_get(src_tree, path))
    return src if layer is None else src[layer]


def _check_plan(init, source_vars, fills: dict, mismatches: list[str]) -> None:
    """ConfigError for shapes that cannot be resized, or when nothing would be loaded."""
    if mismatches:
        raise ConfigError(
            f"config.init.path={init.path!r}: parameter shapes differ from the model and cannot "
            f"be resized (only the image and text positional embeddings can): "
            f"{'; '.join(mismatches[:5])}{' ...' if len(mismatches) > 5 else ''}; exclude them "
            f"with config.init.exclude or match config.model to the source"
        )
    if not fills:
        names = sorted(looped_names(source_vars.get("params") or {}))[:3]
        raise ConfigError(
            f"config.init: include={init.include!r} / exclude={init.exclude!r} load no parameter "
            f"of {init.path!r} (its parameters are named like {names})"
        )


# --------------------------------------------------------------------------- loading and merging
def load_source(init: ml_collections.ConfigDict) -> tuple[CLIPConfig, dict[str, Any], dict]:
    """(config, variables {'params', maybe 'batch_stats'}, description) of `init.path`; load
    errors become ConfigErrors naming config.init.path."""
    from clipjax.export.load import detect_source, load_config_and_params
    from clipjax.export.modeldir import variables_of

    try:
        kind = detect_source(init.path)
        config, params = load_config_and_params(init.path, step=init.step)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"config.init.path={init.path!r} cannot be loaded: {e}") from None
    info = {"path": init.path, "kind": kind, "step": init.step}
    return config, variables_of(params), info


def source_model_overrides(path: str, step: int | None = None) -> tuple[str, dict[str, Any]]:
    """(preset, overrides) for `config.model` describing the architecture of the model at `path`,
    so a run's model matches its init source: the preset equal to it if there is one (else B/16
    or RN50 by image tower) and the fields that differ from that preset."""
    import json

    from clipjax.export import modeldir
    from clipjax.export.load import detect_source, load_config_and_params, workdir_model_config
    from clipjax.models import PRESETS

    kind = detect_source(path)
    if kind == "clipjax":
        cfg_path = os.path.join(path, modeldir.CONFIG_FILE)
        with open(cfg_path, encoding="utf-8") as f:
            config = modeldir.config_from_json(f.read(), cfg_path)
    elif kind == "hf":
        from clipjax.export.hfdir import read_hf_config

        config = read_hf_config(path)
    elif kind == "workdir":
        config = workdir_model_config(path)
    else:  # a state dict: the architecture is inferred from its tensors' shapes
        config, _ = load_config_and_params(path, step=step)
    fields = config.architecture()
    fields = json.loads(json.dumps(fields))  # tuples as lists, as a ConfigDict round-trips them
    for name, preset in PRESETS.items():
        if preset.architecture() == config.architecture():
            return name, {}
    name = "B/16" if config.vision_type == "vit" else "RN50"
    base = json.loads(json.dumps(PRESETS[name].to_dict()))
    return name, {k: v for k, v in fields.items() if base.get(k) != v}


def config_differences(source: CLIPConfig, model: CLIPConfig) -> list[str]:
    """'field: source -> model' for the architecture fields that differ (compute settings such
    as dtype, layer scan and remat are not architecture)."""
    a, b = source.architecture(), model.architecture()
    return [f"{k}: {a[k]!r} -> {b.get(k)!r}" for k in sorted(a) if a[k] != b.get(k)]


def apply_plan(plan: InitPlan, state: Any, shardings: Any) -> Any:
    """`state` (a fresh TrainState) with the planned parameters (and BatchNorm statistics) set;
    every other leaf, the optimizer state and the step stay as they are."""
    collections = {"params": state.params, **state.model_state}
    collection_sh = {"params": shardings.params, **shardings.model_state}
    by_leaf: dict[tuple[str, tuple[str, ...]], list[tuple[int | None, Fill]]] = {}
    for collection, tree in collections.items():
        names = looped_names(tree)
        for (coll, name), fill in plan.fills.items():
            if coll == collection:
                path, layer = names[name]
                by_leaf.setdefault((collection, path), []).append((layer, fill))
    new = {c: traverse_util.flatten_dict(dict(t)) for c, t in collections.items()}
    for (collection, path), fills in by_leaf.items():
        leaf = new[collection][path]
        host = np.array(_host(leaf))
        for layer, fill in fills:
            if layer is None:
                host = np.asarray(fill(host), host.dtype)
            else:
                host[layer] = np.asarray(fill(host[layer]), host.dtype)
        sharding = _get(collection_sh[collection], path)
        new[collection][path] = _global_array(host, sharding)
    merged = {c: traverse_util.unflatten_dict(f) for c, f in new.items()}
    params = merged.pop("params")
    loss_state = state.loss_state
    if "ema_params" in loss_state:  # the EMA encoders start from the loaded params too
        ema = jax.tree.map(
            lambda x, s: _global_array(np.array(_host(x)), s), params, shardings.params
        )
        loss_state = {**loss_state, "ema_params": ema}
    return state.replace(params=params, model_state=merged, loss_state=loss_state)


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)


def _global_array(host: np.ndarray, sharding: Any) -> jax.Array:
    """A global array laid out by `sharding` from the full value every process holds."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# --------------------------------------------------------------------------- the report
def format_table(plan: InitPlan) -> str:
    """The report as text: one line per parameter; the layers of a stack that fare alike are
    one line ('block_*' with a count)."""
    groups: Counter = Counter()
    order: dict[tuple, None] = {}
    for r in plan.rows:
        key = (r.status, re.sub(r"block_\d+", "block_*", r.name), r.source, r.target, r.note)
        groups[key] += 1
        order.setdefault(key)
    src = plan.source
    where = f"{src.get('path')} ({src.get('kind')}" + (
        f", step {src['step']})" if src.get("step") is not None else ")"
    )
    lines = [
        f"init from {where}",
        *(f"  note: {d}" for d in src.get("notes", [])),
        "",
        f"{'status':8} {'parameter':56} {'source shape':16} {'model shape':16} note",
    ]
    for key in order:
        status, name, s, t, note = key
        n = groups[key]
        name = f"{name} x{n}" if n > 1 else name
        shapes = [str(tuple(x)) if x is not None else "-" for x in (s, t)]
        lines.append(f"{status:8} {name:56} {shapes[0]:16} {shapes[1]:16} {note}".rstrip())
    lines.append(
        "loaded {}, resized {}, fresh {}, unused {}".format(
            *(plan.count(s) for s in ("loaded", "resized", "fresh", "unused"))
        )
    )
    return "\n".join(lines) + "\n"


def write_report(plan: InitPlan, workdir: str) -> None:
    """init_report.txt (the table) and init_report.json (source + rows) in the workdir; process 0
    only, each written atomically."""
    if jax.process_index() != 0:
        return
    write_text(os.path.join(workdir, REPORT_TXT), format_table(plan))
    write_json(
        os.path.join(workdir, REPORT_JSON),
        {"source": plan.source, "rows": [dataclasses.asdict(r) for r in plan.rows]},
    )


# --------------------------------------------------------------------------- entry point
def fresh_state(trainer: Any, workdir: str | None = None) -> Any:
    """The state a new run starts from: the trainer's initialisation, with `config.init`'s
    weights merged in when `init.path` is set (the plan is checked before anything compiles)."""
    init = trainer.config.init
    if not init.path:
        return trainer.init_state()
    config, source_vars, info = load_source(init)
    notes = config_differences(config, trainer.model_config)
    info.update(
        include=init.include, exclude=init.exclude, logit_scale=init.logit_scale, notes=notes
    )
    abstract = trainer.abstract_state
    frozen = frozenset(
        name
        for name, (path, _) in looped_names(abstract.params).items()
        if path in trainer.optimizer.frozen_paths
    )
    plan = make_plan(
        init, source_vars, {"params": abstract.params, **abstract.model_state}, frozen, info
    )
    fresh_locked = [r.name for r in plan.rows if r.status == "fresh" and "[locked]" in r.note]
    if fresh_locked:
        log.warning(
            "init: %d locked parameters keep their random initialisation (e.g. %s)",
            len(fresh_locked),
            fresh_locked[0],
        )
    log.info("initialising from %s:\n%s", init.path, format_table(plan))
    state = apply_plan(plan, trainer.init_state(), trainer.state_shardings)
    if workdir is not None:
        write_report(plan, workdir)
    return state
