"""Compile a training config's train step (and eval embedding) for abstract TPU devices.

`make_plan(config, topology, slices)` builds the real trainer (`clipjax.train.build_trainer`)
on the compile-only devices of a TPU slice (libtpu as a compile-only backend; see
`clipjax.parallel.tpu_topology`), compiles its step on abstract state and batch, and returns a
`Plan`: per-chip memory against the chip's HBM, the analytic FLOPs bound and the collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections

from clipjax.plan.chips import Topology
from clipjax.plan.collectives import Collective, parse_collectives, summarize
from clipjax.plan.flops import train_step_flops


class PlanError(Exception):
    """The config cannot be planned (libtpu missing, config invalid for this topology)."""


class CompileFailed(Exception):
    """XLA rejected the program; `buffers`: the largest allocations it named, if any."""

    def __init__(self, message: str, buffers: Sequence[str] = ()):
        super().__init__(message)
        self.buffers = list(buffers)


@contextlib.contextmanager
def quiet_stderr(enabled: bool = True) -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: libtpu's C++ start-up lines bypass Python logging."""
    if not enabled:
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def topology_devices(topology: Topology, slices: int = 1, quiet: bool = True) -> list:
    """Compile-only devices of `slices` slices of `topology` (v4/v5p: one device per chip)."""
    from clipjax.parallel.tpu_topology import INSTALL_HINT, abstract_devices, find_libtpu

    if find_libtpu() is None:
        raise PlanError(INSTALL_HINT)
    with quiet_stderr(quiet):
        try:
            devices = abstract_devices(topology.name, slices, topology.chip.chip_config)
        except Exception as e:  # libtpu's own message, e.g. an unsupported shape
            raise PlanError(f"topology {topology.name}: {_first_line(e)}") from None
    return list(devices)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


@dataclasses.dataclass
class Memory:
    """Per-chip bytes."""

    params: int
    optimizer: int
    loss_state: int
    other_state: int
    batch: int
    temporaries: int  # XLA's temp buffers: activations, gradients, gathered weights
    arguments: int
    outputs: int
    aliased: int  # outputs written in place of donated arguments
    code: int

    @property
    def total(self) -> int:
        """Peak live bytes: arguments + temporaries + outputs not aliased to arguments + code."""
        return self.arguments + self.temporaries + self.outputs - self.aliased + self.code


@dataclasses.dataclass
class Plan:
    config_name: str
    topology: str
    chip: str
    slices: int
    num_chips: int
    hbm_bytes: int
    peak_flops: float  # per chip, bf16
    mesh: dict[str, int]
    axis_sharding: dict[str, Any]  # logical axis -> mesh axes (from the sharding rules)
    batch_size: int
    microbatches: int
    remat: str
    memory: Memory
    flops_per_step: float | None
    collectives: list[Collective]
    compile_seconds: float
    eval_memory: dict[str, int]  # 'image' / 'text' embedding step: peak bytes per chip
    eval_compile_seconds: float
    mfu: float = 0.5

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.hbm_bytes and all(
            v <= self.hbm_bytes for v in self.eval_memory.values()
        )

    @property
    def margin_bytes(self) -> int:
        return self.hbm_bytes - max([self.memory.total, *self.eval_memory.values()])

    @property
    def flops_per_chip(self) -> float | None:
        return None if self.flops_per_step is None else self.flops_per_step / self.num_chips

    def step_seconds(self, mfu: float = 1.0) -> float | None:
        f = self.flops_per_chip
        return None if f is None else f / (self.peak_flops * mfu)

    def images_per_second(self, mfu: float = 1.0) -> float | None:
        t = self.step_seconds(mfu)
        return None if t is None else self.batch_size / t

    def to_json(self) -> dict[str, Any]:
        mem = dataclasses.asdict(self.memory) | {"total": self.memory.total}
        return {
            "config": self.config_name,
            "topology": self.topology,
            "chip": self.chip,
            "slices": self.slices,
            "num_chips": self.num_chips,
            "hbm_bytes": self.hbm_bytes,
            "peak_bf16_flops_per_chip": self.peak_flops,
            "mesh": self.mesh,
            "axis_sharding": self.axis_sharding,
            "batch_size": self.batch_size,
            "microbatches": self.microbatches,
            "remat": self.remat,
            "memory_per_chip": mem,
            "eval_embed_peak_per_chip": self.eval_memory,
            "fits": self.fits,
            "margin_bytes": self.margin_bytes,
            "flops_per_step": self.flops_per_step,
            "flops_per_chip": self.flops_per_chip,
            "mfu": self.mfu,
            "step_seconds": {"100%": self.step_seconds(1.0), "mfu": self.step_seconds(self.mfu)},
            "images_per_second": {
                "100%": self.images_per_second(1.0),
                "mfu": self.images_per_second(self.mfu),
            },
            "collectives": summarize(self.collectives),
            "compile_seconds": self.compile_seconds,
            "eval_compile_seconds": self.eval_compile_seconds,
        }


def _shard_bytes(tree: Any) -> int:
    """Bytes per device of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def make_mesh_for(config: ml_collections.ConfigDict, devices: Sequence):
    """The training mesh of `config` over `devices` (the same call training makes)."""
    from clipjax.parallel.mesh import make_mesh

    return make_mesh(dict(config.mesh), devices=devices)


def _compile(lowered_fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    try:
        compiled = lowered_fn()
    except Exception as e:  # XLA: RESOURCE_EXHAUSTED (does not fit), INTERNAL, ...
        text = str(e)
        buffers = _largest_buffers(text)
        raise CompileFailed(_first_line(e), buffers) from None
    return compiled, time.perf_counter() - t0


def _largest_buffers(text: str, limit: int = 6) -> list[str]:
    """The largest allocations named in XLA's out-of-memory message (size, shape, operator)."""
    out, current = [], []
    for line in text.splitlines():
        s = line.strip()
        if re.match(r"^\d+\.\s+Size: ", s):
            if current:
                out.append(" ".join(current))
            current = [s]
        elif current and re.match(r"^(Operator|Shape|Allocation type|XLA Label): ", s):
            current.append(s)
    if current:
        out.append(" ".join(current))
    return out[:limit]


def _memory(trainer, compiled, batch) -> Memory:
    ma = compiled.memory_analysis()
    st = trainer.abstract_state
    other = _shard_bytes((st.step, st.rng, st.model_state, st.nonfinite_streak))
    return Memory(
        params=_shard_bytes(st.params),
        optimizer=_shard_bytes(st.opt_state),
        loss_state=_shard_bytes(st.loss_state),
        other_state=other,
        batch=_shard_bytes(batch),
        temporaries=int(ma.temp_size_in_bytes),
        arguments=int(ma.argument_size_in_bytes),
        outputs=int(ma.output_size_in_bytes),
        aliased=int(ma.alias_size_in_bytes),
        code=int(ma.generated_code_size_in_bytes),
    )


def _abstract_batch(trainer, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs on the batch sharding (nothing allocated)."""
    from clipjax.models import dummy_inputs

    images, text = jax.eval_shape(lambda: dummy_inputs(trainer.model_config, batch_size))
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_shardings[k])
        for k, v in (("image", images), ("text", text))
    }


def _eval_embedding(trainer, config) -> tuple[dict[str, int], float]:
    """Peak bytes per chip of the image and text embedding steps evaluation runs
    (`clipjax.evaluate.Encoder` on the training params, eval.batch_size rows), and their
    compile time."""
    import jax.numpy as jnp

    from clipjax.evaluate.embed import round_up
    from clipjax.export.modeldir import variables_of
    from clipjax.parallel.mesh import batch_axis_size, batch_sharding

    model, mesh = trainer.model, trainer.mesh
    rows = round_up(int(config.eval.batch_size), batch_axis_size(mesh))
    cfg = trainer.model_config
    inputs = {
        "encode_image": ((rows, cfg.image_size, cfg.image_size, 3), jnp.float32),
        "encode_text": ((rows, cfg.context_length), jnp.int32),
    }
    peaks, seconds = {}, 0.0
    for method, (shape, dtype) in inputs.items():

        def fn(params, x, method=method):
            return model.apply(variables_of(params), x, method=method).astype(jnp.float32)

        x = jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh))
        compiled, s = _compile(
            lambda: jax.jit(fn).lower(trainer.abstract_state.params, x).compile()
        )
        ma = compiled.memory_analysis()
        peaks[method.split("_")[1]] = int(
            ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
        )
        seconds += s
    return peaks, seconds


def axis_sharding(trainer) -> dict[str, Any]:
    """Logical axis name -> mesh axes it is split over on this mesh (size-1 axes dropped)."""
    out = {}
    for name, axes in trainer.rules:
        flat = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        used = [a for a in flat if trainer.mesh.shape.get(a, 1) > 1]
        out[name] = used or None
    return out


def make_plan(
    config: ml_collections.ConfigDict,
    topology: Topology,
    slices: int = 1,
    *,
    config_name: str = "",
    mfu: float = 0.5,
    eval_step: bool = True,
    devices: Sequence | None = None,
) -> Plan:
    """Build and compile `config` for `slices` slices of `topology` (see the module docstring).

    Raises PlanError (bad config for this topology, no libtpu) or CompileFailed."""
    from clipjax.train import config as config_lib
    from clipjax.train.builder import build_trainer

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.slices = int(slices)
    devices = list(devices) if devices is not None else topology_devices(topology, slices)
    processes = len({d.process_index for d in devices})
    try:
        config_lib.validate(config, len(devices), processes, check_files=False)
    except config_lib.ConfigError as e:
        raise PlanError(str(e)) from None
    try:
        mesh = make_mesh_for(config, devices)
    except (ValueError, NotImplementedError) as e:  # e.g. axis sizes the torus cannot hold
        raise PlanError(f"config.mesh={dict(config.mesh)} on {topology.name}: {e}") from None
    try:
        trainer = build_trainer(config, mesh)
    except ValueError as e:
        raise PlanError(f"config: {e}") from None
    batch = _abstract_batch(trainer, int(config.batch_size))
    try:
        compiled, seconds = _compile(
            lambda: trainer.train_step.lower(trainer.abstract_state, batch).compile()
        )
    except CompileFailed as e:
        if not e.buffers:  # XLA named only its temporaries: add the state's parts per chip
            st = trainer.abstract_state
            parts = {
                "optimizer state": _shard_bytes(st.opt_state),
                "parameters": _shard_bytes(st.params),
                "batch": _shard_bytes(batch),
                "loss state": _shard_bytes(st.loss_state),
            }
            e.buffers = [
                f"{name}: {n / 2**30:.2f} GiB per chip"
                for name, n in sorted(parts.items(), key=lambda kv: -kv[1])
            ]
        raise
    memory = _memory(trainer, compiled, batch)
    collectives = parse_collectives(
        compiled.as_text(), tuple(mesh.devices.shape), tuple(mesh.axis_names), slices
    )
    eval_memory, eval_seconds = _eval_embedding(trainer, config) if eval_step else ({}, 0.0)
    try:
        flops = train_step_flops(trainer.model_config, int(config.batch_size))
    except ValueError:  # a ResNet tower: no analytic count
        flops = None
    return Plan(
        config_name=config_name,
        topology=topology.name,
        chip=topology.chip.name,
        slices=slices,
        num_chips=len(devices),
        hbm_bytes=topology.chip.hbm_bytes,
        peak_flops=topology.chip.peak_bf16_flops,
        mesh=dict(mesh.shape),
        axis_sharding=axis_sharding(trainer),
        batch_size=int(config.batch_size),
        microbatches=int(config.microbatches),
        remat=str(config.model.remat),
        memory=memory,
        flops_per_step=flops,
        collectives=collectives,
        compile_seconds=seconds,
        eval_memory=eval_memory,
        eval_compile_seconds=eval_seconds,
        mfu=mfu,
    )


def largest_fitting(fits: Callable[[int], bool], start: int, step: int, limit: int) -> int:
    """The largest multiple of `step` up to `limit` for which `fits` holds, assuming fitting is
    monotone (a smaller batch fits when a larger one does); 0 when even `step` does not fit.
    Doubles from `start` until one does not fit, then bisects."""
    top = limit // step * step
    if top < step:
        return 0
    probe = min(max(step, start // step * step), top)
    if fits(probe):
        lo, hi = probe, None
        while hi is None:
            if lo == top:
                return lo
            nxt = min(lo * 2, top)
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    else:
        lo, hi = 0, probe
    while hi - lo > step:  # lo fits (or is 0), hi does not; both multiples of step
        mid = (lo + hi) // 2 // step * step
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
