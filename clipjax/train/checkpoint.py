"""Orbax checkpoints in the workdir: async saves, keep-last-K, atomic, auto-resume.

Each checkpoint `<workdir>/checkpoints/<step>/` holds two items: `state` (the TrainState pytree as
global jax.Arrays: params, optimizer state, step, RNG, loss queue/EMA, non-finite counters) and
`meta` (JSON: the step, the data pipeline position, the resolved model config and its
fingerprint; see `model_meta`). Orbax writes into a temporary directory and renames it when every
host has finished, so a checkpoint that was being written when the process died is never listed
and never picked for resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from clipjax.models import COMPUTE_FIELDS, CLIPConfig
from clipjax.train.state import TrainState

log = logging.getLogger(__name__)


def model_meta(config: CLIPConfig) -> dict[str, Any]:
    """The checkpoint meta entries that identify the model: its resolved config and the
    fingerprint of the fields that define its params."""
    d = config.to_dict()
    return {"model_config": d, "model_fingerprint": model_fingerprint(d)}


def model_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of a CLIPConfig dict's params-defining fields (all but COMPUTE_FIELDS: a resume may
    change those)."""
    fields = {k: v for k, v in config.items() if k not in COMPUTE_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def model_changes(meta: Mapping[str, Any], config: CLIPConfig) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, current value) for each params-defining field that differs
    between a checkpoint's meta and `config` (missing ones shown as '<unset>')."""
    now = config.to_dict()
    if meta["model_fingerprint"] == model_fingerprint(now):
        return []
    saved = meta["model_config"]
    return [
        (k, saved.get(k, "<unset>"), now.get(k, "<unset>"))
        for k in sorted(set(saved) | set(now))
        if k not in COMPUTE_FIELDS and saved.get(k, "<unset>") != now.get(k, "<unset>")
    ]


def array_layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """'/'-joined path -> (shape, dtype name) of each array leaf of `tree` (arrays, abstract
    arrays or orbax array metadata)."""
    import numpy as np

    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): (
            tuple(x.shape),
            np.dtype(x.dtype).name,
        )
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def layout_changes(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """'path: checkpoint layout -> wanted layout' for each array that differs or exists on one
    side only (layouts from `array_layout`)."""

    def show(entry):
        return "absent" if entry is None else f"{entry[1]}{list(entry[0])}"

    return [
        f"{k}: {show(saved.get(k))} (checkpoint) -> {show(wanted.get(k))} (now)"
        for k in sorted(set(saved) | set(wanted))
        if saved.get(k) != wanted.get(k)
    ]


def checkpoint_dir(workdir: str) -> epath.Path:
    """`<workdir>/checkpoints`; a local workdir is made absolute, as orbax requires."""
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)
    return epath.Path(workdir) / "checkpoints"


class Checkpointer:
    """Saves/restores (TrainState, metadata) under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        # What this run creates (checkpoints/ and maybe the workdir), for `close_unused`.
        self._created = [p for p in (self.directory.parent, self.directory) if not p.exists()]
        self.every_steps = int(every_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep),
            save_interval_steps=1,  # the loop decides when; `should_save` below
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a killed save are removed on start
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (temporary, half-written ones are ignored)."""
        self.manager.reload()
        return self.manager.latest_step()

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every_steps > 0 and step % self.every_steps == 0)

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Start an async save of `state` at `step` (returns once the arrays are copied off)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.to_dict()), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        """The `meta` item of checkpoint `step` alone (cheap: no arrays are read)."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def state_layout(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """`array_layout` of checkpoint `step`'s state, from its metadata (no arrays read)."""
        return array_layout(_state_metadata(self.directory / str(step) / "state"))

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restore step `step` onto the shardings/dtypes of `target` (an abstract or real state)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target.to_dict()
        )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return TrainState.from_dict(out["state"]), dict(out["meta"])

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def close_unused(self) -> None:
        """Close after a run that stopped before its first save: the directories this
        Checkpointer created are removed again where they are still empty."""
        self.close()
        for path in reversed(self._created):
            if path.exists() and not any(path.iterdir()):
                path.rmdir()


def read_state_arrays(workdir: str, step: int, item: str = "params") -> Any:
    """One entry of a checkpoint's state (default: the params) as host numpy arrays, whatever
    the mesh or process count that saved it (for tests, tools and comparisons)."""
    import numpy as np

    path = checkpoint_dir(workdir) / str(step) / "state"
    tree = _state_metadata(path)
    if item not in tree:
        raise KeyError(f"{path}: no {item!r} in the checkpointed state (has {sorted(tree)})")
    target = {item: tree[item]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    out = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
    return out[item]


def _state_metadata(path: epath.Path) -> dict[str, Any]:
    """The tree of orbax array metadata (shape, dtype, ...) of a checkpoint's `state` item."""
    meta = ocp.PyTreeCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)
