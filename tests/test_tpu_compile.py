"""The tiny preset's train step compiled by the real TPU compiler for v5e 2x4 (abstract devices,
no TPU needed): every mesh kind, every loss implementation and gradient accumulation at least once,
with the collective pattern each mesh is meant to have read from the compiled HLO.

Skipped when libtpu is not installed (`make` installs it under .venv/tpu). libtpu is loaded as a
compile-only plugin in this process; the CPU backend stays the default (checked below).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import pytest

from clipjax.parallel.mesh import make_mesh
from clipjax.parallel.tpu_topology import abstract_devices, find_libtpu
from clipjax.plan.collectives import parse_collectives
from clipjax.train import config as config_lib
from clipjax.train.builder import build_trainer

pytestmark = pytest.mark.skipif(
    find_libtpu() is None, reason="libtpu not installed (run `make` to install it under .venv/tpu)"
)

TOPOLOGY = "v5e:2x4"
BATCH = 64

# name -> (config overrides, slices). Each mesh kind, loss implementation, remat and
# accumulation appears at least once; 5 compilations in all.
CASES = {
    "data": ({"mesh": {"data": -1}, "loss.impl": "gathered"}, 1),
    "fsdp": ({"mesh": {"data": 1, "fsdp": 8}, "loss.impl": "ring", "model.remat": "full"}, 1),
    "tensor": (
        {
            "mesh": {"data": -1, "tensor": 2},
            "loss.name": "sigmoid",
            "model.overrides.logit_bias_init": -10.0,
        },
        1,
    ),
    "fsdp_tensor": ({"mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "microbatches": 2}, 1),
    "slices": ({"mesh": {"data": -1, "fsdp": 4}}, 2),
}


def _build(overrides: dict, slices: int):
    c = config_lib.base_config()
    c.batch_size = BATCH
    for key, value in overrides.items():
        if key == "mesh":
            c.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **value, "slices": slices})
            continue
        *sections, name = key.split(".")
        parent = c
        for section in sections:
            parent = parent[section]
        parent[name] = value
    devices = abstract_devices(TOPOLOGY, slices)
    config_lib.validate(c, len(devices), check_files=False)
    trainer = build_trainer(c, make_mesh(dict(c.mesh), devices))
    mcfg = trainer.model_config
    shapes = {
        "image": ((BATCH, mcfg.image_size, mcfg.image_size, 3), jnp.float32),
        "text": ((BATCH, mcfg.context_length), jnp.int32),
    }
    batch = {
        k: jax.ShapeDtypeStruct(s, d, sharding=trainer.batch_shardings[k])
        for k, (s, d) in shapes.items()
    }
    compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    return trainer, compiled


_COMPILED: dict[str, tuple] = {}


def compiled_case(name: str):
    """(trainer, compiled, collectives) of CASES[name], compiled once per test run."""
    if name not in _COMPILED:
        overrides, slices = CASES[name]
        trainer, compiled = _build(overrides, slices)
        mesh = trainer.mesh
        found = parse_collectives(
            compiled.as_text(), list(mesh.shape.values()), mesh.axis_names, slices
        )
        _COMPILED[name] = (trainer, compiled, found)
    return _COMPILED[name]


def _state_bytes(trainer, per_device: bool) -> int:
    total = 0
    for leaf in jax.tree.leaves(trainer.abstract_state):
        shape = leaf.sharding.shard_shape(leaf.shape) if per_device else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _dense_grad_bytes(trainer, one_layer: bool = False) -> int:
    """float32 gradient bytes of the parameters reduced densely: all but the token embedding,
    whose gradient is formed from the gathered rows at this batch size (models/embed_lookup.py).
    `one_layer`: a stacked (scanned) parameter counts one layer, as a collective inside the
    layer loop appears once in the HLO."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.abstract_state.params):
        key = jax.tree_util.keystr(path)
        if "token_embedding" not in key:
            layers = leaf.shape[0] if one_layer and "blocks" in key else 1
            total += math.prod(leaf.shape) * 4 // layers
    return total


def _param_shapes(trainer) -> set[tuple[int, ...]]:
    """Shapes of the parameters and of one layer's slice of a stacked (scanned) parameter."""
    shapes = set()
    for leaf in jax.tree.leaves(trainer.abstract_state.params):
        shapes.add(tuple(leaf.shape))
        shapes.add(tuple(leaf.shape[1:]))
    return shapes


def _batch_sequence_elements(trainer) -> int:
    """Elements of the smallest [B, T, width] activation of the global batch."""
    m = trainer.model_config
    tokens = (m.image_size // m.patch_size) ** 2 + 1
    return BATCH * min(tokens, m.context_length) * min(m.vision_width, m.text_width)


def _activation_collectives(trainer, found: list) -> list:
    """Collectives moving a whole batch of token sequences: the pattern of the FSDP failure
    (activations all-reduced / gathered instead of the weights). The token embedding's
    gradient is formed from the gathered text cotangents on purpose (models/embed_lookup.py)."""
    m = trainer.model_config
    lookup_grad = BATCH * m.context_length * m.text_width  # elements, in whatever shape
    params = _param_shapes(trainer)
    big = _batch_sequence_elements(trainer)
    return [
        c
        for c in found
        if math.prod(c.dims) >= big
        and c.dims not in params
        and not (c.kind == "all-gather" and math.prod(c.dims) == lookup_grad)
    ]


def test_cpu_backend_stays_the_default(monkeypatch):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    abstract_devices(TOPOLOGY)
    assert "TPU_LIBRARY_PATH" not in os.environ  # so child processes do not load libtpu
    assert jax.default_backend() == "cpu"
    assert float(jnp.ones(4).sum()) == 4.0


@pytest.mark.parametrize("name", list(CASES))
def test_train_step_compiles_without_activation_traffic(name):
    trainer, compiled, found = compiled_case(name)
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert found, "a sharded train step has collectives"
    assert not _activation_collectives(trainer, found)


def test_data_parallel_reduces_gradients_and_gathers_no_weights():
    trainer, compiled, found = compiled_case("data")
    params = _param_shapes(trainer)
    assert not [c for c in found if c.kind == "all-gather" and c.dims in params]
    reduced = sum(c.bytes for c in found if c.kind == "all-reduce")
    assert reduced >= 0.9 * _dense_grad_bytes(trainer, one_layer=True)


@pytest.mark.parametrize("name, fsdp", [("fsdp", 8), ("fsdp_tensor", 2)])
def test_fsdp_keeps_state_sharded(name, fsdp):
    trainer, compiled, found = compiled_case(name)
    per_chip = _state_bytes(trainer, per_device=True)
    total = _state_bytes(trainer, per_device=False)
    assert per_chip <= 1.15 * total / fsdp
    # Arguments: the state shard (TPU tiles pad small dims) and this chip's rows of the batch.
    args = compiled.memory_analysis().argument_size_in_bytes
    assert args <= 1.25 * per_chip + BATCH * 32 * 32 * 3 * 4
    assert args < 0.75 * total
    # Weights are gathered one layer at a time: never a whole stacked [layers, ...] parameter.
    stacked = {
        tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.abstract_state.params)
        if "blocks" in jax.tree_util.keystr(path)
    }
    assert stacked
    assert not [c for c in found if c.kind == "all-gather" and c.dims in stacked]
    if name == "fsdp":  # whole per-layer weights are gathered (with tensor: a tensor shard)
        params = _param_shapes(trainer)
        assert [c for c in found if c.kind == "all-gather" and c.dims in params]


def test_tensor_parallel_splits_the_weights():
    data = _state_bytes(compiled_case("data")[0], per_device=True)
    tensor = _state_bytes(compiled_case("tensor")[0], per_device=True)
    assert tensor < 0.75 * data


def test_only_gradient_reductions_cross_slices():
    trainer, compiled, found = compiled_case("slices")
    assert trainer.mesh.size == 16
    # The compiled program is one slice's: its own collectives stay inside the slice, and
    # what crosses the DCN are transfers to the megascale runtime.
    dcn = [c for c in found if c.crosses_dcn]
    assert dcn and len(dcn) < len(found)
    reduced = sum(c.bytes for c in dcn if c.kind == "all-reduce")
    other = sum(c.bytes for c in dcn if c.kind != "all-reduce")
    # Gradients are reduce-scattered inside a slice first: each chip all-reduces 1/8 of them
    # over the DCN (the token embedding's gradient is formed from gathered rows instead, see
    # models/embed_lookup.py).
    grad_bytes = _dense_grad_bytes(trainer)
    assert 0.5 * grad_bytes / 8 <= reduced <= 1.5 * grad_bytes / 8
    # Besides that, only the loss's and the token-embedding gradient's gathers of batch rows.
    assert other < 0.25 * reduced
