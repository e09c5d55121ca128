"""python -m clipjax.train --config experiments/NAME.py[:ARG] --workdir DIR [--config.key=value ...]

Multi-host: started as several processes, JAX's runtime is initialised automatically on TPU VMs
and under SLURM, or explicitly with --coordinator HOST:PORT --num_processes N --process_id I.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from absl import app, flags
from ml_collections import config_flags

from clipjax.cli import FORMAT, VERBOSE_HELP, config_file_error, parse_config_flags, quiet_libraries
from clipjax.data import use_pooled_tf_allocator
from clipjax.train.timeline import Timeline, process_start_time

use_pooled_tf_allocator()  # before anything imports TensorFlow

if TYPE_CHECKING:
    from clipjax.train.hooks import Hook

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. experiments/demo.py or experiments/x.py:arg",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Checkpoints, metrics and the resolved config go here; an existing workdir is resumed.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "HOST:PORT of process 0 (multi-process runs without auto-detection)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_VERBOSE = flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
flags.mark_flags_as_required(["config", "workdir"])
_TIMELINE = Timeline(process_start_time())  # the start-up is timed from the process start


def _setup_logging(verbose: bool) -> None:
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)  # clipjax's own INFO lines
    # The other CLIs' line format, not absl's (`I1202 19:53:53.162159 1406... loop.py:147] ...`).
    absl_logging.get_absl_handler().setFormatter(logging.Formatter(FORMAT))
    quiet_libraries(verbose)
    from clipjax.train.metrics import progress_to_stdout

    progress_to_stdout()


def main(argv: list[str], hooks: Sequence[Hook] = ()) -> int:
    """The CLI; `hooks` are passed to `train` (tests run the CLI with fault-injection hooks)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    error = config_file_error()
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    quiet_libraries(_VERBOSE.value)
    import jax

    if (
        _NUM_PROCESSES.value
        and _NUM_PROCESSES.value > 1
        and (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")).startswith("cpu")
    ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from clipjax.parallel.mesh import initialize_distributed

    _TIMELINE.mark("imports")
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    _TIMELINE.mark("mesh")
    _setup_logging(_VERBOSE.value)
    from clipjax.train.config import ConfigError
    from clipjax.train.loop import TrainingDiverged, train

    _TIMELINE.mark("imports")
    try:
        result = train(_CONFIG.value, _WORKDIR.value, hooks=hooks, timeline=_TIMELINE)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        print(
            f"{result.status} at step {result.step}; last checkpoint: "
            f"{result.last_checkpoint}; workdir: {_WORKDIR.value}"
        )
        for k, v in sorted(result.eval_metrics.items()):
            print(f"  {k}: {v:.4f}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_config_flags)
