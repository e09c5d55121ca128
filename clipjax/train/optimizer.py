"""Optimizer: AdamW with masked weight decay, warmup + cosine, clipping, per-tower multipliers.

Frozen parameters (LiT's locked image tower, or any `optimizer.freeze` pattern) are split off
before the optimizer sees the tree: they get no gradient and no optimizer state at all.

The learning-rate schedule's numbers and the weight decay are *arguments* of the compiled step
(`Optimizer.hparams`, passed as `tx.update(..., hparams=...)`), not constants compiled into it:
runs that differ only in lr, warm-up, min_lr_ratio, weight decay or num_steps (a sweep) compile
the same program and share the persistent compilation cache. The schedule's kind (cosine,
linear, constant) is part of the program. The values are those of optax's schedules, float32
operation for float32 operation, and the optimizer state is laid out as before.
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
import numpy as np
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

    tx: optax.GradientTransformationExtraArgs  # update(..., hparams=) (default: self.hparams)
    hparams: dict[str, np.ndarray]  # schedule_hparams: the step's hyperparameter argument
    schedule_kind: str
    frozen_paths: frozenset[PathTuple]

    def learning_rate(self, count: jax.Array, hparams: dict | None = None) -> jax.Array:
        """The learning rate after `count` updates."""
        hparams = self.hparams if hparams is None else hparams
        return schedule_value(self.schedule_kind, count, hparams)

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


def schedule_hparams(cfg: ml_collections.ConfigDict, num_steps: int) -> dict[str, np.ndarray]:
    """The schedule's and weight decay's numbers as float32/int32 scalars (what optax's
    schedules would compile in as constants, computed the same way in Python)."""
    peak, warmup = float(cfg.lr), int(cfg.warmup_steps)
    end = peak * float(cfg.min_lr_ratio)
    alpha = end / peak if peak else 0.0
    f32, i32 = np.float32, np.int32
    return {
        "peak": f32(peak),
        "end": f32(end),
        "peak_minus_end": f32(peak - end),
        "alpha": f32(alpha),
        "one_minus_alpha": f32(1 - alpha),
        "warmup_steps": i32(warmup),
        "decay_steps": i32(max(num_steps - warmup, 1)),
        "weight_decay": f32(cfg.weight_decay),
    }


def schedule_value(kind: str, count: jax.Array, hp: dict) -> jax.Array:
    """Linear warm-up from 0 to `peak` over `warmup_steps` updates, then `kind` decay to `end`
    at `decay_steps` after it: optax's join_schedules of linear_schedule and
    cosine_decay_schedule / linear_schedule / constant_schedule, with array numbers."""
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={kind!r}; expected one of {SCHEDULES}")
    count = jnp.asarray(count, jnp.int32)
    peak, warmup, decay = hp["peak"], hp["warmup_steps"], hp["decay_steps"]

    def after(c):
        if kind == "constant":
            return jnp.broadcast_to(jnp.asarray(peak, jnp.float32), c.shape)
        if kind == "linear":
            frac = 1 - jnp.clip(c, 0, decay) / decay
            return hp["peak_minus_end"] * frac + hp["end"]
        decay_f = jnp.asarray(decay, jnp.float32)
        c = jnp.minimum(c.astype(jnp.float32), decay_f)
        # times the reciprocal: the form XLA folds optax's `pi * count / decay_steps` into when
        # decay_steps is a constant, so that the values agree to the bit
        cosine = 0.5 * (1 + jnp.cos((jnp.pi * c) * (1 / decay_f)))
        return peak * (hp["one_minus_alpha"] * cosine + hp["alpha"])

    # warm-up: linear_schedule(0, peak, warmup); with no warm-up the where picks `after`
    frac = 1 - jnp.clip(count, 0, warmup) / jnp.maximum(warmup, 1)
    warm = (0.0 - peak) * frac + peak
    return jnp.where(count < warmup, warm, after(count - warmup))


def make_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """The learning rate after `count` updates for `cfg` (see schedule_value)."""
    hp = schedule_hparams(cfg, num_steps)
    return lambda count: schedule_value(cfg.schedule, count, hp)


def _scale_by_schedule(kind: str, default: dict) -> optax.GradientTransformationExtraArgs:
    """optax.scale_by_learning_rate(schedule) with the schedule's numbers from `hparams`."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, hparams=None, **extra):
        del params, extra
        step_size = -1 * schedule_value(kind, state.count, default if hparams is None else hparams)
        updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def _add_decayed_weights(default: dict) -> optax.GradientTransformationExtraArgs:
    """optax.add_decayed_weights with the rate from `hparams['weight_decay']`."""

    def update(updates, state, params=None, *, hparams=None, **extra):
        del extra
        rate = (default if hparams is None else hparams)["weight_decay"]
        return jax.tree.map(lambda g, p: g + rate * p, updates, params), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


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

    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}; expected one of {SCHEDULES}")
    hparams = schedule_hparams(cfg, num_steps)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts += [  # the state layout of optax.adamw's parts, so checkpoints resume unchanged
        optax.scale_by_adam(b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps)),
        optax.masked(_add_decayed_weights(hparams), decay_tree),
        _scale_by_schedule(cfg.schedule, hparams),
    ]
    if any(m != 1.0 for m in jax.tree.leaves(mult_tree)):
        parts.append(scale_by_tree(mult_tree))
    return Optimizer(
        tx=optax.chain(*parts),
        hparams=hparams,
        schedule_kind=cfg.schedule,
        frozen_paths=frozen,
    )


def scale_by_tree(factors: Params) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed per-leaf factor (per-tower learning-rate
    multipliers)."""

    def update(updates: Params, params: Params | None = None) -> Params:
        del params
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors)

    return optax.stateless(update)
