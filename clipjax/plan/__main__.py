"""python -m clipjax.plan --config experiments/NAME.py[:ARG] --topology v5e-256 [--slices N]
    [--json OUT] [--max-batch] [--mfu 0.5] [--config.key=value ...]

Compiles the config's train step and eval embedding for a TPU topology on this (CPU) host, with
libtpu as a compile-only backend (installed by `make` under .venv/tpu), and prints the plan:
mesh and sharding, per-chip memory against HBM (FITS / DOES NOT FIT), the FLOPs bound at 100%
and at --mfu, the collectives per step by mesh axis (and which cross slices), compile time.
Exit status: 0 fits, 1 does not fit or does not compile, 2 bad input.
`--max-batch`: the largest global batch that fits, per remat policy (bisection; one compile
per probe).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from clipjax.cli import VERBOSE_HELP, config_file_error, parse_config_flags, quiet_libraries

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/b16_laion.py[:ARG]", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice: v5e:16x16, v4:4x4x8, or v5e-256, v6e-256, v4-256, v5p-128"
)
_SLICES = flags.DEFINE_integer(
    "slices", None, "Number of slices, data parallel over DCN (default: the config's mesh.slices)."
)
_JSON = flags.DEFINE_string("json", None, "Also write the plan as JSON to this file.")
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False, "Search the largest global batch that fits, per remat policy."
)
_MFU = flags.DEFINE_float("mfu", 0.5, "Model FLOPs utilisation for the stated step-time bound.")
_VERBOSE = flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
flags.mark_flags_as_required(["config", "topology"])

# A search never goes beyond this many rows per chip.
MAX_ROWS_PER_CHIP = 1 << 16


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    error = config_file_error()
    if error:
        return _error(error, 2)
    if _SLICES.value is not None and _SLICES.value < 1:
        return _error(f"--slices {_SLICES.value}: expected a positive int", 2)
    if not 0 < _MFU.value <= 1:
        return _error(f"--mfu {_MFU.value}: expected a fraction in (0, 1]", 2)
    quiet_libraries(_VERBOSE.value)
    from clipjax.plan.chips import parse_topology
    from clipjax.plan.planner import CompileFailed, PlanError, make_plan, topology_devices
    from clipjax.plan.report import render

    try:
        topology = parse_topology(_TOPOLOGY.value)
    except ValueError as e:
        return _error(str(e), 2)
    config = _CONFIG.value
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    slices = _SLICES.value or config.mesh.get("slices", 1)
    if not isinstance(slices, int) or slices < 1:
        return _error(f"config.mesh.slices={slices!r}: expected a positive int", 2)
    try:
        devices = topology_devices(topology, slices, quiet=not _VERBOSE.value)
        if _MAX_BATCH.value:
            return _max_batch(config, topology, devices, name, slices)
        plan = make_plan(
            config, topology, slices, config_name=name, mfu=_MFU.value, devices=devices
        )
    except PlanError as e:
        return _error(str(e), 2)
    except CompileFailed as e:
        return _compile_failed(e)
    print(render(plan))
    if _JSON.value:
        _write_json(_JSON.value, plan.to_json())
    if not plan.fits:
        print(
            f"error: does not fit: {plan.memory.total / 2**30:.2f} GiB per chip of "
            f"{plan.hbm_bytes / 2**30:.0f} GiB; largest: activations/temporaries "
            f"{plan.memory.temporaries / 2**30:.2f} GiB, optimizer state "
            f"{plan.memory.optimizer / 2**30:.2f} GiB, parameters "
            f"{plan.memory.params / 2**30:.2f} GiB",
            file=sys.stderr,
        )
        return 1
    return 0


def _compile_failed(e) -> int:
    lines = [f"error: does not compile: {e}"]
    if e.buffers:
        lines.append("largest buffers:")
        lines += [f"  {b}" for b in e.buffers]
    print("\n".join(lines), file=sys.stderr)
    return 1


def _write_json(path: str, payload) -> None:
    from clipjax.files import write_json

    write_json(path, payload)


def _max_batch(config, topology, devices, name, slices) -> int:
    """Per remat policy, the largest global batch (a multiple of the batch divisor) that
    compiles and fits."""
    from clipjax.models.layers import REMAT_POLICIES
    from clipjax.parallel.mesh import batch_axis_size
    from clipjax.plan.planner import CompileFailed, PlanError, largest_fitting, make_plan
    from clipjax.train.config import mesh_shape

    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.mesh.slices = slices
    shape = mesh_shape(c, len(devices))
    processes = len({d.process_index for d in devices})
    step = batch_axis_size(shape) * int(config.microbatches)
    while step % processes:
        step *= 2
    results = {}
    for remat in REMAT_POLICIES:

        def fits(batch: int, remat=remat) -> bool:
            c = config.copy_and_resolve_references()
            with c.unlocked():
                c.model.remat = remat
                c.batch_size = batch
                if c.loss.get("queue_size", 0):
                    c.loss.queue_size = max(c.loss.queue_size, batch)
            try:
                plan = make_plan(c, topology, slices, devices=devices, eval_step=False)
            except CompileFailed:
                return False
            print(
                f"  remat {remat:<14} batch {batch:>9,}: "
                f"{plan.memory.total / 2**30:6.2f} GiB {'fits' if plan.fits else 'does not fit'}",
                flush=True,
            )
            return plan.fits

        try:
            best = largest_fitting(
                fits, int(config.batch_size), step, MAX_ROWS_PER_CHIP * len(devices)
            )
        except PlanError as e:
            return _error(str(e), 2)
        results[remat] = best
        print(f"remat {remat}: largest global batch that fits: {best:,}", flush=True)
    if _JSON.value:
        _write_json(_JSON.value, {"config": name, "topology": topology.name, "max_batch": results})
    return 0 if any(results.values()) else 1


def _dashes(argv: list[str]) -> list[str]:
    """--max-batch (as typed) -> --max_batch (absl's name)."""
    return [
        a.replace("--max-batch", "--max_batch", 1) if a.startswith("--max-batch") else a
        for a in argv
    ]


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: parse_config_flags(_dashes(argv)))
