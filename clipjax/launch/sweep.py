"""Expand a sweep file into training runs with distinct workdirs, and launch them.

  python -m clipjax.launch.sweep experiments/sweeps/demo_lr.py --launcher local|slurm|tpu
      [--dry-run] [--root workdirs/sweeps] [--launcher-args "--zone us-central2-b --type v4-8"]

A sweep file defines CONFIG (the experiment, 'experiments/NAME.py[:ARG]') and `get_sweep()`
returning a list of override dicts {'optimizer.lr': 1e-3, ...}; `grid(...)` and `zipped(...)`
below build such lists. Run i gets workdir ROOT/SWEEP/iii-key=value,... and the command
`python -m clipjax.train --config CONFIG --workdir W --config.key=value ...`, started by:
  local: one after another on this machine (a failed run is reported, the rest still run);
  slurm: `sbatch launch/slurm.sbatch ...` per run;
  tpu:   `launch/tpu_pod.sh --name SWEEP-iii LAUNCHER_ARGS -- ...` per run.
Rerunning a sweep resumes each run from its workdir. A TPU run's workdir must be remote storage
(--root gs://BUCKET/sweeps): a TPU VM's disk is deleted with its slice, checkpoints and all, so
a local --root is refused unless --allow-local-root (e.g. a shared file system mounted there).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

LAUNCHERS = ("local", "slurm", "tpu")
LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "launch")


def check_root(launcher: str, root: str, allow_local: bool = False) -> None:
    """Refuse a local --root for TPU runs: the slice's disk, and the runs' checkpoints on it,
    are deleted with the slice."""
    if launcher == "tpu" and "://" not in root and not allow_local:
        raise SystemExit(
            f"error: --root {root} is a local path, but TPU runs write their workdirs on the TPU "
            f"VMs, whose disks are deleted with the slice; use remote storage (--root "
            f"gs://BUCKET/sweeps), or --allow-local-root if {root} is shared storage mounted "
            f"on every worker"
        )


def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the values of each key (the last key varies fastest)."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zipped(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The i-th values of every key together; all lists must have the same length."""
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zipped: lists of different lengths {lengths}")
    keys = list(axes)
    return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def load_sweep(path: str) -> tuple[str, list[dict[str, Any]]]:
    """(CONFIG, list of override dicts) from a sweep file, checked."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location("_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = getattr(module, "CONFIG", None)
    if not isinstance(config, str) or not config:
        raise SystemExit(f"error: {path} must define CONFIG = 'experiments/NAME.py[:ARG]'")
    if not callable(getattr(module, "get_sweep", None)):
        raise SystemExit(f"error: {path} must define get_sweep() returning a list of dicts")
    runs = module.get_sweep()
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise SystemExit(
            f"error: {path}: get_sweep() must return a non-empty list of dicts "
            f"of config overrides, got {type(runs).__name__}"
        )
    for i, r in enumerate(runs):
        bad = [k for k in r if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", str(k))]
        if bad:
            raise SystemExit(f"error: {path}: run {i} has invalid config keys {bad}")
    from clipjax.train.config import key_known, unknown_key_message

    unknown = sorted({k for r in runs for k in r if not key_known(k)})
    if unknown:  # caught here, not by every run of the sweep
        raise SystemExit(f"error: {path}: {unknown_key_message(unknown)}")
    return config, runs


def flag_value(v: Any) -> str:
    return v if isinstance(v, str) else repr(v)


def run_name(index: int, overrides: Mapping[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}={flag_value(v)}" for k, v in overrides.items()]
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))[:80]
    return f"{index:03d}-{name}" if name else f"{index:03d}"


def train_args(config: str, workdir: str, overrides: Mapping[str, Any]) -> list[str]:
    return ["--config", config, "--workdir", workdir] + [
        f"--config.{k}={flag_value(v)}" for k, v in overrides.items()
    ]


def commands(
    path: str, launcher: str, root: str, launcher_args: str = "", python: str = sys.executable
) -> list[tuple[str, list[str]]]:
    """(workdir, command) for every run of the sweep."""
    config, runs = load_sweep(path)
    sweep = os.path.splitext(os.path.basename(path))[0]
    extra = shlex.split(launcher_args)
    here = os.path.abspath(LAUNCH_DIR)  # the repository's launch/ scripts
    out = []
    for i, overrides in enumerate(runs):
        workdir = os.path.join(root, sweep, run_name(i, overrides))
        args = train_args(config, workdir, overrides)
        if launcher == "local":
            cmd = [python, "-m", "clipjax.train"] + args + extra
        elif launcher == "slurm":
            cmd = (
                ["sbatch", f"--job-name={sweep}-{i:03d}"]
                + extra
                + [os.path.join(here, "slurm.sbatch")]
                + args
            )
        elif launcher == "tpu":
            name = re.sub(r"[^a-z0-9-]", "-", f"{sweep}-{i:03d}".lower())
            cmd = [os.path.join(here, "tpu_pod.sh"), "--name", name] + extra + ["--"] + args
        else:
            raise SystemExit(f"error: --launcher {launcher!r}; expected one of {LAUNCHERS}")
        out.append((workdir, cmd))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("sweep", help="sweep file (experiments/sweeps/NAME.py)")
    p.add_argument("--launcher", choices=LAUNCHERS, required=True)
    p.add_argument("--root", default="workdirs/sweeps", help="parent of the runs' workdirs")
    p.add_argument(
        "--launcher-args",
        default="",
        help="extra arguments for the launcher (sbatch options, tpu_pod.sh flags; "
        "for local: extra trainer flags)",
    )
    p.add_argument(
        "--allow-local-root",
        action="store_true",
        help="tpu: accept a local --root (only for storage shared with, and outliving, the slice)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ns = p.parse_args(argv)
    check_root(ns.launcher, ns.root, ns.allow_local_root)
    runs = commands(ns.sweep, ns.launcher, ns.root, ns.launcher_args)
    failed = []
    for workdir, cmd in runs:
        print(shlex.join(cmd), flush=True)
        if ns.dry_run:
            continue
        rc = subprocess.call(cmd)
        if rc != 0:
            print(
                f"clipjax.launch.sweep: run {workdir} failed with exit status {rc}", file=sys.stderr
            )
            failed.append(workdir)
    if failed:
        print(f"clipjax.launch.sweep: {len(failed)} of {len(runs)} runs failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
