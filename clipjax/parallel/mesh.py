"""Named device meshes with axes ('data', 'fsdp', 'tensor') and multi-host start-up.

Multi-slice (`slices` > 1, e.g. TPU pod slices joined over the data-centre network, DCN): the
'data' axis is split across slices and every other axis stays inside one slice, so only the
data-parallel gradient all-reduce crosses the DCN (MaxText's `dcn_data_parallelism`). The axis
sizes are those of the whole mesh; 'data' must be a multiple of `slices`. Devices that carry a
`slice_index` (TPU, and the abstract devices of `get_topology_desc(..., num_slices=N)`) are
grouped by it; devices without one (CPU, GPU) are taken as `slices` contiguous groups of
`jax.devices()` order, which on a multi-process run are groups of whole processes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
SLICES = "slices"  # the key of a mesh mapping (config.mesh) that is not an axis

log = logging.getLogger(__name__)


def resolve_axis_sizes(axis_sizes: Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
    """Sizes for MESH_AXES from a partial mapping; one axis may be -1 (the rest).

    The mapping may hold `slices` (default 1): 'data' must then be a multiple of it."""
    axis_sizes = dict(axis_sizes or {"data": -1})
    slices = num_slices(axis_sizes, num_devices)
    axis_sizes.pop(SLICES, None)
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(
            f"mesh: unknown axis {sorted(unknown)}; expected a subset of {MESH_AXES} "
            f"(and '{SLICES}')"
        )
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1 (the rest), got {dict(axis_sizes)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(axis_sizes)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes "
                f"{dict(axis_sizes)}"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: axis sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, "
            f"but {num_devices} are available; use -1 for one axis to take the rest"
        )
    if sizes[0] % slices:
        raise ValueError(
            f"mesh: {slices} slices split the 'data' axis, but it has size {sizes[0]} "
            f"({dict(zip(MESH_AXES, sizes))}); the fsdp and tensor axes must fit in one slice "
            f"of {num_devices // slices} devices"
        )
    return tuple(sizes)


def num_slices(axis_sizes: Mapping[str, int] | None, num_devices: int) -> int:
    """The mapping's `slices` (default 1), checked: a positive int dividing the device count."""
    slices = (axis_sizes or {}).get(SLICES, 1)
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise ValueError(f"mesh: {SLICES}={slices!r} must be a positive int")
    if num_devices % slices:
        raise ValueError(
            f"mesh: {SLICES}={slices} does not divide the {num_devices} devices into equal slices"
        )
    return slices


def make_mesh(
    axis_sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axis types, e.g. {'data': -1, 'fsdp': 2}
    or a train config's `dict(config.mesh)`; with `slices` > 1 a multi-slice (hybrid) mesh (see
    the module docstring)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_axis_sizes(axis_sizes, len(devices))
    slices = num_slices(axis_sizes, len(devices))
    if slices > 1:
        device_array = _multi_slice_array(shape, slices, devices)
    elif devices == list(jax.devices()) or devices[0].platform == "tpu":
        device_array = _physical_array(shape, devices)
    else:
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _physical_array(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """Topology-aware placement of one slice (keeps hosts and ICI rings contiguous), splitting
    physical axes where a mesh axis needs it (e.g. fsdp=8 on a 16x16 torus); the devices in
    their given order when no such placement exists (e.g. one device per TensorCore)."""
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
        log.info("mesh %s: no topology-aware placement (%s); devices in order", shape, e)
        return np.asarray(devices).reshape(shape)


def _multi_slice_array(
    shape: tuple[int, ...], slices: int, devices: Sequence[jax.Device]
) -> np.ndarray:
    """[data, fsdp, tensor] device array whose 'data' axis is `slices` blocks, one per slice."""
    per_slice = (shape[0] // slices, *shape[1:])
    if hasattr(devices[0], "slice_index"):
        found = sorted({d.slice_index for d in devices})
        if len(found) != slices:
            raise ValueError(f"mesh: {SLICES}={slices}, but the devices are in {len(found)} slices")
        groups = [[d for d in devices if d.slice_index == i] for i in found]
        return np.concatenate([_physical_array(per_slice, g) for g in groups], axis=0)
    size = len(devices) // slices
    groups = [devices[i * size : (i + 1) * size] for i in range(slices)]
    return np.concatenate([np.asarray(g).reshape(per_slice) for g in groups], axis=0)


def batch_spec() -> P:
    """PartitionSpec of a batch-major array: the leading dim split over the batch axes."""
    return P(BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec())


def batch_axis_size(mesh: Mesh | Mapping[str, int] | None) -> int:
    """How many ways a global batch is split on a mesh (or a mesh shape); 1 without a mesh."""
    if mesh is None:
        return 1
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    return math.prod(shape.get(a, 1) for a in BATCH_AXES)


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Start JAX's multi-controller runtime when launched as several processes.

    Explicit arguments win; otherwise TPU VM pods and SLURM jobs are auto-detected by
    `jax.distributed.initialize()`. A single plain process is left alone.
    """
    explicit = coordinator is not None or num_processes is not None
    detected = any(
        k in os.environ
        for k in (
            "SLURM_JOB_ID",
            "TPU_WORKER_HOSTNAMES",
            "CLOUD_TPU_TASK_ID",
            "JAX_COORDINATOR_ADDRESS",
        )
    )
    if explicit:
        if coordinator is None or num_processes is None or process_id is None:
            raise ValueError(
                "distributed: give all of --coordinator, --num_processes and "
                "--process_id, or none of them for auto-detection"
            )
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif detected and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()
    else:
        return
    log.info(
        "process %d/%d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
