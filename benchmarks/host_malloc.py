"""Train step with and without glibc's huge-page malloc tunable (`clipjax.hostmem`), on CPU.

    python benchmarks/host_malloc.py [--quick] [--preset B/32] [--batch 16] [--steps 5] [--rounds 4]

Runs `benchmarks/train_step.py`'s clipjax worker (the real jitted train step, f32) in fresh
subprocesses, alternately without and with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, `--rounds`
times each, and prints per round the median step, page faults per step and kernel CPU seconds per
step. Alternating pairs keep a drifting machine speed from favouring either side. `--quick` (B/32,
batch 4, 2 steps, one round) ends with one JSON line like the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import HERE, machine, median, run_sub  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", default="B/32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.rounds = 4, 2, 1
    if min(args.batch, args.steps, args.rounds) < 1:
        raise SystemExit("--batch, --steps and --rounds must be >= 1")
    from clipjax.models import get_preset

    try:
        get_preset(args.preset)
    except ValueError as e:
        raise SystemExit(f"--preset: {e}") from None

    spec = {
        "preset": args.preset,
        "dtype": "float32",
        "batch": args.batch,
        "steps": args.steps,
        "scan": True,
        "remat": "dots",
        "peak_seconds": 0.2,
        "profile": "",
    }
    worker = [sys.executable, os.path.join(HERE, "train_step.py"), "--worker"]
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}")
    print(f"{args.preset} f32, batch {args.batch}, {args.steps} timed steps per process")
    rounds = []
    for r in range(args.rounds):
        row = {}
        for name, huge in (("default", False), ("hugepages", True)):
            w = run_sub(worker + [json.dumps(spec)], args.timeout, hugepages=huge)
            row[name] = {
                "step_s": median(w["step_s"]),
                "page_faults": w["page_faults_per_step"],
                "sys_s": w["sys_s_per_step"],
                "rss_gib": w["rss_gib"],
            }
        rounds.append(row)
        d, h = row["default"], row["hugepages"]
        print(
            f"round {r + 1}: step {d['step_s']:.2f} -> {h['step_s']:.2f} s "
            f"({d['step_s'] / h['step_s']:.2f}x)  page faults/step {d['page_faults']:.0f} -> "
            f"{h['page_faults']:.0f}  kernel CPU/step {d['sys_s']:.2f} -> {h['sys_s']:.2f} s  "
            f"peak RSS {d['rss_gib']:.2f} -> {h['rss_gib']:.2f} GiB",
            flush=True,
        )
    speedups = [row["default"]["step_s"] / row["hugepages"]["step_s"] for row in rounds]
    print(
        f"speed-up with huge pages: median {median(speedups):.2f}x, "
        f"range {min(speedups):.2f}-{max(speedups):.2f}x over {len(rounds)} pairs"
    )
    print(
        json.dumps(
            {
                "benchmark": "host_malloc",
                "quick": args.quick,
                "preset": args.preset,
                "batch": args.batch,
                "rounds": rounds,
                "median_speedup": median(speedups),
            }
        )
    )


if __name__ == "__main__":
    main()
