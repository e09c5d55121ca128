"""python -m clipjax.train --config experiments/NAME.py[:ARG] --workdir DIR [--config.key=value ...]

Multi-host: started as several processes, JAX's runtime is initialised automatically on TPU VMs
and under SLURM, or explicitly with --coordinator HOST:PORT --num_processes N --process_id I.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from absl import app, flags
from ml_collections import config_flags

from clipjax.cli import VERBOSE_HELP, quiet_libraries
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
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)  # clipjax's own INFO lines
    quiet_libraries(verbose)
    from clipjax.train.metrics import progress_to_stdout

    progress_to_stdout()


def config_file_error() -> str | None:
    """Why --config cannot be used (a missing file), or None. ml_collections defers that error
    to the first use of the config, deep inside training, as a traceback."""
    spec = config_flags.get_config_filename(flags.FLAGS["config"])  # PATH[:ARG]
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        return (
            f"--config {spec}: {path} does not exist; expected an experiment file such as "
            "experiments/demo.py (optionally with :ARG)"
        )
    return None


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


def override_keys(argv: Sequence[str]) -> list[str]:
    """The dotted keys of the `--config.KEY[=VALUE]` overrides in `argv`."""
    keys = []
    for arg in argv[1:]:
        if arg == "--":
            break
        m = re.match(r"--?config\.([^=\s]+)", arg)
        if m:
            keys.append(m.group(1))
    return keys


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that an error raised by the config file's get_config (e.g. an
    unknown :ARG key) or by an override of a key the trainer does not read is printed as one
    line, not as a traceback."""
    from clipjax.train.config import key_known, unknown_key_message

    unknown = [k for k in override_keys(argv) if not key_known(k)]
    if unknown:
        print(f"error: {unknown_key_message(unknown, where='--config.')}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # a known key the experiment's config lacks
        keys = ", ".join(f"--config.{k}" for k in override_keys(argv))
        print(
            f"error: {keys}: not in the experiment's config ({e}); set new keys in the "
            "experiment file (under config.extra for the experiment's own values)",
            file=sys.stderr,
        )
        sys.exit(2)
    except flags.Error as e:
        text = str(e)
        if "Error whilst parsing config file" not in text:
            return app.parse_flags_with_usage(argv)  # absl's own message and exit
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        print(f"error: --config: {last.split(': ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
