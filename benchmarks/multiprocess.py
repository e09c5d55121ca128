"""Multi-process training on CPU: 2 processes x 2 devices against 1 process x 4 devices.

    python benchmarks/multiprocess.py [--steps 12] [--rounds 2] [--skip 3] [--data DIR]

Both runs are the real training CLI on the demo's `quick` config (its data is generated in a
temporary directory unless --data is given), the same steps and data, alternating 1x4 and 2x2 in
each round; the 2x2 run goes through `clipjax.launch.local` (gloo collectives), each launch on its
own free coordinator port. The steady-state step time is the median interval between the steps'
records in metrics.jsonl after the first --skip steps (compilation and warm-up). The runs share
one compilation cache, so only the first round compiles. Prints each run's step time and the
2x2 / 1x4 ratio; the last line is JSON. Every child process is started in its own session and
killed (with its children) if this script stops early.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(workdir: str, data: str, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clipjax.train",
        "--config",
        os.path.join(REPO, "experiments", f"demo.py:quick,data={data}"),
        "--workdir",
        workdir,
        f"--config.num_steps={steps}",
        "--config.eval.at_end=False",
        "--config.tensorboard=False",
        "--config.checkpoint.every_steps=0",
        "--config.data.shuffle_buffer=1",
    ]


def run_env(cache: str, devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def run(cmd: list[str], env: dict[str, str], log: str) -> None:
    """Run `cmd` in its own session; kill the whole session if we stop before it ends."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{' '.join(cmd[:6])} ... exited with {rc}:\n{tail}")


def step_time(workdir: str, skip: int) -> float:
    """Median seconds between consecutive training-step records after the first `skip` steps."""
    times = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "loss" in m:
                times[m["step"]] = m["time"]
    steps = sorted(s for s in times if s > skip)
    gaps = [times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1]
    if not gaps:
        raise SystemExit(f"{workdir}: fewer than 2 logged steps after step {skip}")
    return statistics.median(gaps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out (warm-up)")
    parser.add_argument("--data", default=None, help="demo 'quick' data (default: generated)")
    args = parser.parse_args()
    if args.steps < args.skip + 3:
        parser.error(f"--steps must be at least --skip + 3, got {args.steps}")
    with tempfile.TemporaryDirectory(prefix="clipjax-multiprocess-") as tmp:
        data = args.data
        if data is None:
            sys.path.insert(0, REPO)
            from clipjax.demo import make_demo_data

            data = os.path.join(tmp, "data")
            make_demo_data(data, "quick")
        cache = os.path.join(tmp, "cache")
        results: dict[str, list[float]] = {"1x4": [], "2x2": []}
        for r in range(args.rounds):
            for name in ("1x4", "2x2"):
                work = os.path.join(tmp, f"{name}-{r}")
                cmd = train_cmd(work, data, args.steps)
                if name == "2x2":
                    launch = [sys.executable, "-m", "clipjax.launch.local", "-n", "2"]
                    launch += ["--devices-per-process", "2", "--log-dir", work + "-logs", "--"]
                    run(launch + cmd, run_env(cache, None), work + ".log")
                else:
                    run(cmd, run_env(cache, 4), work + ".log")
                t = step_time(work, args.skip)
                results[name].append(t)
                print(f"round {r + 1} {name}: {t * 1e3:.0f} ms/step", flush=True)
    best = {k: min(v) for k, v in results.items()}
    ratio = best["2x2"] / best["1x4"]
    print(
        f"best of {args.rounds}: 1x4 {best['1x4'] * 1e3:.0f} ms/step, "
        f"2x2 {best['2x2'] * 1e3:.0f} ms/step, ratio 2x2/1x4 {ratio:.2f}"
    )
    print(json.dumps({"step_s": results, "best_s": best, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
