"""Start N processes of a multi-host JAX program on this machine (multi-host without the hosts).

  python -m clipjax.launch.local -n 2 --devices-per-process 2 -- \
      python -m clipjax.train --config experiments/demo.py --workdir workdirs/demo2

Each process gets `--coordinator 127.0.0.1:PORT --num_processes N --process_id I` appended and,
with --devices-per-process K, K fake CPU devices (JAX_PLATFORMS=cpu, gloo collectives, huge-page
malloc as in clipjax.hostmem). If one process fails the others are stopped: SIGTERM, then SIGKILL
after --stop-grace seconds (a JAX process whose peer died may neither exit nor end on SIGTERM
until the runtime's heartbeat timeout); the exit status is the first failure's (0 if all pass).
Process i's output goes to LOGDIR/process_i.log when --log-dir is given (process 0's log is
printed when all have finished), otherwise every process writes to the terminal.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from clipjax.hostmem import with_hugepage_malloc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices_per_process: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if devices_per_process:
        env = with_hugepage_malloc(env)  # CPU processes: see clipjax.hostmem
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
        env["JAX_PLATFORMS"] = "cpu"
    return env


def commands(argv: list[str], n: int, port: int) -> list[list[str]]:
    return [
        argv + [f"--coordinator=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"]
        for i in range(n)
    ]


def supervise(procs: list[subprocess.Popen], grace_s: float = 30.0) -> int:
    """Wait for every process; on the first failure (or Ctrl-C) SIGTERM the others and SIGKILL
    those still running `grace_s` seconds later. Returns the first failure's exit status (130 on
    Ctrl-C), 0 if all pass."""
    status, kill_at = 0, None
    try:
        remaining = set(range(len(procs)))
        while remaining:
            for i in sorted(remaining):
                rc = procs[i].poll()
                if rc is None:
                    continue
                remaining.discard(i)
                if rc != 0 and status == 0:
                    status = rc
                    print(
                        f"clipjax.launch.local: process {i} exited with {rc}; stopping the others",
                        file=sys.stderr,
                    )
                    for j in remaining:
                        procs[j].send_signal(signal.SIGTERM)
                    kill_at = time.monotonic() + grace_s
            if remaining and kill_at is not None and time.monotonic() >= kill_at:
                print(
                    f"clipjax.launch.local: processes {sorted(remaining)} still running "
                    f"{grace_s:g} s after SIGTERM; killing them",
                    file=sys.stderr,
                )
                for j in remaining:
                    procs[j].kill()
                kill_at = None  # reaped by the polls above
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        status = 130
    finally:
        for p in procs:
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return status


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=None,
        help="fake CPU devices per process (sets JAX_PLATFORMS=cpu)",
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--log-dir", default=None, help="write process_I.log files here")
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=30.0,
        help="seconds between SIGTERM and SIGKILL when stopping the others after a failure",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="the program, after '--' (e.g. python -m clipjax.train ...)",
    )
    ns = parser.parse_args(args)
    cmd = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not cmd:
        parser.error("give the command to run after '--'")
    if ns.num_processes < 1:
        parser.error(f"--num-processes must be >= 1, got {ns.num_processes}")
    if ns.stop_grace < 0:
        parser.error(f"--stop-grace must be >= 0 seconds, got {ns.stop_grace}")
    port = ns.port or free_port()
    cmds = commands(cmd, ns.num_processes, port)
    if ns.dry_run:
        for c in cmds:
            print(" ".join(c))
        return 0
    env = process_env(ns.devices_per_process)
    procs, logs = [], []
    for i, c in enumerate(cmds):
        out = None
        if ns.log_dir:
            os.makedirs(ns.log_dir, exist_ok=True)
            out = open(os.path.join(ns.log_dir, f"process_{i}.log"), "w")
            logs.append(out)
        procs.append(
            subprocess.Popen(c, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        )
    try:
        status = supervise(procs, ns.stop_grace)
    finally:
        for f in logs:
            f.close()
    if ns.log_dir and procs:
        with open(os.path.join(ns.log_dir, "process_0.log")) as f:
            sys.stdout.write(f.read())
    return status


if __name__ == "__main__":
    sys.exit(main())
