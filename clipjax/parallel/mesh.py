"""Named device meshes with axes ('data', 'fsdp', 'tensor') and multi-host start-up."""

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

log = logging.getLogger(__name__)


def resolve_axis_sizes(axis_sizes: Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
    """Sizes for MESH_AXES from a partial mapping; one axis may be -1 (the rest)."""
    axis_sizes = dict(axis_sizes or {"data": -1})
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; expected a subset of {MESH_AXES}")
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
    return tuple(sizes)


def make_mesh(
    axis_sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axis types, e.g. {'data': -1, 'fsdp': 2}."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_axis_sizes(axis_sizes, len(devices))
    if devices == list(jax.devices()):
        # Topology-aware placement when the mesh spans every device (keeps hosts contiguous).
        device_array = mesh_utils.create_device_mesh(shape, devices)
    else:
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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
