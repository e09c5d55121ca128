"""Logical-axis rules: map the logical axis names of the parameters (`clipjax.axes`) to mesh axes.

Parameters are annotated with logical axis names (`nn.with_logical_partitioning`), e.g. a dense
kernel with ('embed', 'mlp'). A rule list maps each logical name to a mesh axis (or None =
replicated). The defaults give data parallelism over 'data', FSDP over 'fsdp' (every large weight
split along its 'embed' dimension, optimizer state following its parameter) and tensor parallelism
over 'tensor' (MLP hidden units, attention heads, vocabulary).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clipjax.axes import (
    ACT_BATCH,
    ACT_HEADS,
    ACT_MLP,
    CONV_IN,
    CONV_OUT,
    EMBED,
    HEADS,
    KV,
    LAYERS,
    MLP_HIDDEN,
    NORM,
    POS,
    PROJ,
    VOCAB,
)
from clipjax.parallel.mesh import BATCH_AXES

log = logging.getLogger(__name__)

Rules = tuple[tuple[str, Any], ...]

# Order matters: flax assigns each mesh axis at most once per array, first rule first.
DEFAULT_RULES: Rules = (
    # Activations (clipjax.models.sharding.constrain): split like the input batch, heads and MLP
    # hidden units over 'tensor'.
    (ACT_BATCH, BATCH_AXES),
    (ACT_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    # Parameters.
    (MLP_HIDDEN, "tensor"),
    (HEADS, "tensor"),
    (VOCAB, "tensor"),
    (CONV_OUT, "tensor"),
    (EMBED, "fsdp"),
    (CONV_IN, "fsdp"),
    (PROJ, None),
    (KV, None),
    (POS, None),
    (NORM, None),
    (LAYERS, None),
)


def make_rules(overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None) -> Rules:
    """DEFAULT_RULES with some logical names remapped, e.g. {'embed': None} turns FSDP off."""
    if not overrides:
        return DEFAULT_RULES
    overrides = dict(overrides)
    for name, axes in overrides.items():
        _check_mesh_axes(name, axes)
    known = {name for name, _ in DEFAULT_RULES}
    rules = [(name, overrides.get(name, axes)) for name, axes in DEFAULT_RULES]
    rules += [(name, axes) for name, axes in overrides.items() if name not in known]
    return tuple(rules)


def _check_mesh_axes(name: str, axes: Any) -> None:
    from clipjax.parallel.mesh import MESH_AXES

    flat = (axes,) if axes is None or isinstance(axes, str) else tuple(axes)
    bad = [a for a in flat if a is not None and a not in MESH_AXES]
    if bad:
        raise ValueError(
            f"sharding rule {name!r} -> {axes!r}: unknown mesh axis {bad}; "
            f"expected None or names from {MESH_AXES}"
        )


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: Rules) -> P:
    """The PartitionSpec for one array's logical axis names (unknown names: replicated)."""
    if logical_axes is None:
        return P()
    return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes from `spec` whose size does not divide the array dimension.

    A tiny model on a big mesh (or a scalar like the temperature) then stays replicated on that
    dimension instead of failing; everything that divides is still sharded.
    """
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        kept = []
        for axis in axes:
            if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
                kept.append(axis)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def _is_partitioned(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned | nn.Partitioned)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a (possibly abstract) tree of flax-boxed arrays, unboxed structure.

    Leaves with logical names follow the rules; plain leaves are replicated. Each spec is fitted
    to the leaf's shape (see `fit_spec`).
    """

    def one(leaf: Any) -> NamedSharding:
        if _is_partitioned(leaf):
            names = leaf.names
            value = leaf.value
            spec = (
                logical_to_spec(names, rules)
                if isinstance(leaf, nn.LogicallyPartitioned)
                else P(*names)
            )
        else:
            value, spec = leaf, P()
        return NamedSharding(mesh, fit_spec(spec, value.shape, mesh))

    return jax.tree.map(one, boxed_tree, is_leaf=_is_partitioned)


def describe(shardings: Any, tree: Any) -> list[str]:
    """Human-readable 'path shape spec' lines, for logging the layout of a state."""
    lines = []
    flat_s = jax.tree_util.tree_flatten_with_path(shardings)[0]
    flat_t = jax.tree.leaves(tree)
    for (path, sharding), leaf in zip(flat_s, flat_t):
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {sharding.spec}")
    return lines
