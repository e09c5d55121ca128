"""Optimizer: AdamW with masked weight decay, warmup + cosine, clipping, per-tower multipliers.

Frozen parameters (LiT's locked image tower, or any `optimizer.freeze` pattern) are split off
before the optimizer sees the tree: they get no gradient and no optimizer state at all.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from clipjax.axes import LAYERS, POS, VOCAB

Params = Any
PathTuple = tuple[str, ...]

# Leaves never decayed: biases, norm scales and embeddings (by leaf name), plus anything whose
# logical axes mark it as an embedding table or positional embedding; scalars (temperature, bias)
# and vectors (class token) are excluded by their rank.
_NO_DECAY_LEAF_NAMES = frozenset({"bias", "scale", "embedding"})
_NO_DECAY_AXES = frozenset({VOCAB, POS})

SCHEDULES = ("cosine", "linear", "constant")


def path_str(path: PathTuple) -> str:
    return "/".join(path)


def _flat_names(boxed_params: Params) -> dict[PathTuple, tuple[Any, tuple[str | None, ...] | None]]:
    """{path: (array or ShapeDtypeStruct, logical names or None)} from a flax-boxed param tree."""
    flat = traverse_util.flatten_dict(
        boxed_params, is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned | nn.Partitioned)
    )
    out = {}
    for path, leaf in flat.items():
        if isinstance(leaf, nn.LogicallyPartitioned | nn.Partitioned):
            out[path] = (leaf.value, tuple(leaf.names))
        else:
            out[path] = (leaf, None)
    return out


def decays(path: PathTuple, shape: tuple[int, ...], names: tuple[str | None, ...] | None) -> bool:
    """Whether weight decay applies to one parameter (matrices and conv kernels only)."""
    if path[-1] in _NO_DECAY_LEAF_NAMES:
        return False
    if names is not None and _NO_DECAY_AXES.intersection(names):
        return False
    rank = len(shape) - (1 if names is not None and LAYERS in names else 0)
    return rank >= 2


def tower_of(path: PathTuple, towers: Mapping[str, str]) -> str | None:
    """The tower ('image', 'text', ...) whose regex matches the '/'-joined path, else None."""
    s = path_str(path)
    for tower, pattern in towers.items():
        if re.search(pattern, s):
            return tower
    return None


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optax transform over the trainable params, and how to split/merge the full tree."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    frozen_paths: frozenset[PathTuple]

    def split(self, params: Params) -> tuple[Params, Params]:
        """(trainable, frozen) nested dicts; frozen is {} when nothing is locked."""
        flat = traverse_util.flatten_dict(params)
        train = {p: v for p, v in flat.items() if p not in self.frozen_paths}
        frozen = {p: v for p, v in flat.items() if p in self.frozen_paths}
        return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)

    @staticmethod
    def merge(trainable: Params, frozen: Params) -> Params:
        flat = traverse_util.flatten_dict(trainable)
        flat.update(traverse_util.flatten_dict(frozen))
        return traverse_util.unflatten_dict(flat)


def make_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then `schedule` decay to `lr * min_lr_ratio` at num_steps."""
    peak, warmup = float(cfg.lr), int(cfg.warmup_steps)
    end = peak * float(cfg.min_lr_ratio)
    decay_steps = max(num_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    else:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}; expected one of {SCHEDULES}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def frozen_patterns(cfg: ml_collections.ConfigDict) -> list[str]:
    patterns = list(cfg.freeze)
    if cfg.lock_image:  # LiT: the whole image tower, projection included
        patterns.append(cfg.towers["image"])
    return patterns


def make_optimizer(
    cfg: ml_collections.ConfigDict, boxed_params: Params, num_steps: int
) -> Optimizer:
    """Build the optimizer for `config.optimizer` given (abstract, boxed) model params."""
    flat = _flat_names(boxed_params)
    patterns = frozen_patterns(cfg)
    frozen = frozenset(p for p in flat if any(re.search(pat, path_str(p)) for pat in patterns))
    trainable = {p: v for p, v in flat.items() if p not in frozen}
    if not trainable:
        raise ValueError(f"optimizer: the freeze patterns {patterns} lock every parameter")

    towers = dict(cfg.towers)
    mults = dict(cfg.lr_mult)
    unknown = set(mults) - set(towers)
    if unknown:
        raise ValueError(
            f"optimizer.lr_mult has towers {sorted(unknown)} not in optimizer.towers "
            f"{sorted(towers)}"
        )
    decay_tree = traverse_util.unflatten_dict(
        {p: decays(p, tuple(v.shape), names) for p, (v, names) in trainable.items()}
    )
    mult_tree = traverse_util.unflatten_dict(
        {p: float(mults.get(tower_of(p, towers), 1.0)) for p in trainable}
    )

    schedule = make_schedule(cfg, num_steps)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts += [
        optax.scale_by_adam(b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps)),
        optax.add_decayed_weights(float(cfg.weight_decay), mask=decay_tree),
        optax.scale_by_learning_rate(schedule),
    ]
    if any(m != 1.0 for m in jax.tree.leaves(mult_tree)):
        parts.append(scale_by_tree(mult_tree))
    return Optimizer(tx=optax.chain(*parts), schedule=schedule, frozen_paths=frozen)


def scale_by_tree(factors: Params) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed per-leaf factor (per-tower learning-rate
    multipliers)."""

    def update(updates: Params, params: Params | None = None) -> Params:
        del params
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors)

    return optax.stateless(update)
