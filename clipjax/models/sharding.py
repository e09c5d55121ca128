"""Activation sharding inside the models: the mesh a model is traced for, and logical constraints.

Parameters carry logical axis names (`clipjax.axes`) and get their layout from the jitted step's
in/out shardings. Activations need constraints too: without them XLA's sharding propagation may
follow an FSDP-sharded weight (split along its 'embed' dim) into the activations instead of the
batch, and then all-gathers the whole global batch and all-reduces [B, T, width] partial sums on
every chip, which is slow, uses many times the memory, and has crashed the TPU compiler. Models
call `constrain(x, (ACT_BATCH, ...))` at block boundaries; the step's logical-axis rules
(`clipjax.parallel.rules`) map ACT_BATCH to the batch mesh axes, as the input batch is split.

Constraints (and the embedding lookup's gathered gradient) are placed only inside
`with model_mesh(mesh):`, which the train step sets while tracing; elsewhere (evaluation, tests
without a mesh) `constrain` returns its input unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("model_mesh", default=None)


@contextlib.contextmanager
def model_mesh(mesh: Mesh) -> Iterator[None]:
    """Within this context (while tracing), models shard activations over `mesh`."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the enclosing `model_mesh`, or None."""
    return _MESH.get()


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`x` constrained to the layout of its logical axis `names` under the active rules
    (`nn.logical_axis_rules`) on the `model_mesh`; unchanged outside either. A dim the mapped
    mesh axes do not divide (e.g. 2 heads on 4 'tensor' devices) is left unconstrained."""
    mesh = _MESH.get()
    rules = nn.get_logical_axis_rules()
    if mesh is None or mesh.size == 1 or not rules:
        return x
    spec = nn.logical_to_mesh_axes(names, rules)
    fitted = []
    for dim, entry in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = math.prod(mesh.shape[a] for a in axes)
        fitted.append(entry if dim % size == 0 else P.UNCONSTRAINED)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*fitted)))
