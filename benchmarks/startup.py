"""Start-up time of the training CLI: process start -> first step, cold and warm compilation cache.

Runs `python -m clipjax.train` with the demo config (the tiny CLIP, batch 128) for a few steps in
fresh processes, each in a new workdir: first with an empty compilation cache directory (cold),
then again with the cache that run filled (warm). Reports the seconds from launching the process
to its first progress line (measured here, so it also works for a clipjax without the start-up
line), and the phases of the trainer's own `start-up:` line where it prints one.

  python benchmarks/startup.py --data DIR [--repo ROOT] [--runs 2] [--steps 3] [--quick]
      [--preset B/32 --batch 16] [--sweep experiments/sweeps/demo_lr.py]

DIR: demo data (`python -m clipjax.data.demo --out DIR --n-train 1024 --n-test 64`; made in a
temporary directory when not given). `--repo`: the clipjax checkout to time (default this
one). `--sweep`: instead, every run of a sweep file (its overrides over the demo config), one
after another with one compilation cache that starts empty, as `clipjax.launch.sweep` runs
them; reports each run's start-up and the sweep's total. `--quick`: the `quick` demo variant
(16 px images, batch 16). `--preset`: another model preset
(e.g. B/32 at 224 px) trained on the same demo data, with `--batch` images a step. Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASE = re.compile(r"([a-z][a-z ]*?) ([0-9.]+) s")


def parse_startup(line: str) -> dict[str, float]:
    """{'imports': 3.1, ..., 'first step done at': 15.0} from the trainer's start-up line."""
    head, _, total = line.partition("->")
    phases = {m.group(1): float(m.group(2)) for m in PHASE.finditer(re.sub(r"\(.*?\)", "", head))}
    m = re.search(r"([0-9.]+) s", total)
    if m:
        phases["total"] = float(m.group(1))
    return phases


# The demo config with a preset's model in place of the demo's tiny one.
PRESET_CONFIG = """
from clipjax.demo import get_config as demo_config


def get_config(arg):
    c = demo_config(arg)
    c.model.overrides = {{}}
    c.model.preset = {preset!r}
    c.batch_size = {batch}
    return c
"""


def run_once(
    repo: str,
    data: str,
    cache: str,
    steps: int,
    quick: bool,
    workdir: str,
    config: str,
    overrides: tuple[str, ...] = (),
) -> dict:
    arg = ",".join(filter(None, ["quick" if quick else "", f"data={data}"]))
    cmd = [
        sys.executable,
        "-m",
        "clipjax.train",
        f"--config={config}:{arg}",
        f"--workdir={workdir}",
        f"--config.num_steps={steps}",
        "--config.log_every=1",
        "--config.optimizer.warmup_steps=1",
        "--config.eval.at_end=False",
        "--config.checkpoint.every_steps=1000",
        *overrides,
    ]
    if cache is not None:
        cmd.append(f"--config.compile_cache_dir={cache}")
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first_step, startup, lines, hits = None, {}, [], 0
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("start-up:"):
            startup = parse_startup(line)
            m = re.search(r"\((\d+) from the compilation cache\)", line)
            hits = int(m.group(1)) if m else 0
        if first_step is None and re.match(r"step +1/", line):
            first_step = time.monotonic() - t0
    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(lines[-30:])}")
    return {
        "first_step_line_s": round(first_step, 2),
        "total_s": round(time.monotonic() - t0, 2),
        "startup": startup,
        "cache_hits": hits,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="demo data directory (made when not given)")
    p.add_argument("--repo", default=ROOT, help="the clipjax checkout to time")
    p.add_argument("--runs", type=int, default=1, help="warm runs after the cold one")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the quick demo variant")
    p.add_argument("--no-cache", action="store_true", help="a clipjax without the cache key")
    p.add_argument("--preset", help="a model preset in place of the demo's (e.g. B/32)")
    p.add_argument("--batch", type=int, default=16, help="images a step, with --preset")
    p.add_argument("--sweep", help="time every run of this sweep file (one shared cache)")
    p.add_argument("--sweep-runs", type=int, help="only the sweep's first N runs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(args.repo, "experiments", "demo.py")
        if args.preset:
            config = os.path.join(tmp, "preset_config.py")
            with open(config, "w") as f:
                f.write(PRESET_CONFIG.format(preset=args.preset, batch=args.batch))
        data = args.data
        if data is None:
            data = os.path.join(tmp, "data")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "clipjax.data.demo",
                    "--out",
                    data,
                    "--n-train",
                    "1024",
                    "--n-test",
                    "64",
                ],
                check=True,
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=ROOT),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        data = os.path.abspath(data)
        cache = None if args.no_cache else os.path.join(tmp, "jax-cache")
        if args.sweep:
            return time_sweep(args, data, cache, config, tmp)
        rows = []
        for i in range(1 + args.runs):
            kind = "cold" if i == 0 else "warm"
            row = run_once(
                args.repo,
                data,
                cache,
                args.steps,
                args.quick,
                os.path.join(tmp, f"workdir{i}"),
                config,
            )
            row["cache"] = "off" if cache is None else kind
            rows.append(row)
            phases = ", ".join(f"{k} {v:.1f}" for k, v in row["startup"].items())
            print(
                f"{row['cache']:>4}: first step line at {row['first_step_line_s']:.1f} s"
                + (f" ({phases})" if phases else ""),
                flush=True,
            )
        if cache is not None:
            files = os.listdir(cache)
            print(f"cache: {len(files)} entries")
    summary = {"quick": args.quick, "preset": args.preset, "steps": args.steps, "rows": rows}
    print(json.dumps(summary))
    return 0


def time_sweep(args, data: str, cache: str | None, config: str, tmp: str) -> int:
    """Every run of `args.sweep` in turn, sharing `cache`; prints each and the total."""
    sys.path.insert(0, ROOT)
    from clipjax.launch.sweep import flag_value, load_sweep

    _, runs = load_sweep(args.sweep)
    runs = runs[: args.sweep_runs]
    rows = []
    for i, run in enumerate(runs):
        overrides = tuple(f"--config.{k}={flag_value(v)}" for k, v in run.items())
        row = run_once(
            args.repo,
            data,
            cache,
            args.steps,
            args.quick,
            os.path.join(tmp, f"w{i}"),
            config,
            overrides,
        )
        row["overrides"] = run
        rows.append(row)
        compile_s = row["startup"].get("compile", None)
        print(
            f"run {i} {run}: first step line at {row['first_step_line_s']:.1f} s"
            + (f" (compile {compile_s:.1f} s)" if compile_s is not None else "")
            + f"; {row['cache_hits']} compilation cache hits",
            flush=True,
        )
    total = sum(r["first_step_line_s"] for r in rows)
    print(f"sweep of {len(rows)} runs: start-up total {total:.1f} s")
    print(json.dumps({"sweep": args.sweep, "quick": args.quick, "total_s": total, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
