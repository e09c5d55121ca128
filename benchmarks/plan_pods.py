"""The README's pod table: `python -m clipjax.plan` for B/16 and L/14 at a 32k batch on four pod
slices, and the ring loss's per-chip memory against the gathered loss's at 64k and 256k.

    python benchmarks/plan_pods.py [--only NAME,..] [--out benchmarks/plan_pods] [-- FLAGS]

Runs each plan in turn as its own process (compiles for 128-256 chips take minutes each on a
CPU), writes its JSON (`--json`) to OUT/NAME.json, and prints a Markdown table of all JSON files
in OUT. FLAGS after `--` go to every plan (e.g. --config.mesh.fsdp=1). `--table` only prints
the table of the JSON files already there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
B16, L14 = "experiments/b16_laion.py", "experiments/l14_datacomp.py"
# The FSDP size chosen per topology: a product of physical torus axes (v5e/v6e 16x16: 16,
# v4 4x4x8: 8, v5p 4x4x4: 16), as the topology-aware mesh needs.
FSDP = {"v5e-256": 16, "v6e-256": 16, "v4-256": 8, "v5p-128": 16}
K32 = "--config.batch_size=32768"
GATHERED = "--config.loss.impl=gathered"
# name -> (config, topology, extra flags)
RUNS = {
    "b16_v5e-256": (B16, "v5e-256", [K32]),
    "l14_v5p-128": (L14, "v5p-128", [K32]),
    "b16_v5e-256_ring_64k": (B16, "v5e-256", ["--config.batch_size=65536"]),
    "b16_v5e-256_gathered_64k": (B16, "v5e-256", ["--config.batch_size=65536", GATHERED]),
    "b16_v5e-256_ring_256k": (B16, "v5e-256", ["--config.batch_size=262144"]),
    "b16_v5e-256_gathered_256k": (B16, "v5e-256", ["--config.batch_size=262144", GATHERED]),
    "b16_v4-256": (B16, "v4-256", [K32]),
    "b16_v5p-128": (B16, "v5p-128", [K32]),
    "b16_v6e-256": (B16, "v6e-256", [K32]),
    "l14_v4-256": (L14, "v4-256", [K32]),
    "l14_v5e-256": (L14, "v5e-256", [K32]),
    "l14_v6e-256": (L14, "v6e-256", [K32]),
    "b16_2x_v5e-256": (B16, "v5e-256", [K32, "--slices=2"]),
    # L/14 at 32k does not fit v5e-256 or v4-256 with the recipe's remat: full remat instead
    "l14_v5e-256_remat_full": (L14, "v5e-256", [K32, "--config.model.remat=full"]),
    "l14_v4-256_remat_full": (L14, "v4-256", [K32, "--config.model.remat=full"]),
}
for _name, (_config, _topology, _flags) in RUNS.items():
    _flags.append(f"--config.mesh.fsdp={FSDP[_topology]}")


def run(name: str, out: str, extra: list[str]) -> None:
    config, topology, flags = RUNS[name]
    path = os.path.join(out, f"{name}.json")
    cmd = [sys.executable, "-m", "clipjax.plan", f"--config={config}", f"--topology={topology}"]
    cmd += flags + extra + [f"--json={os.path.relpath(path, ROOT)}"]  # run from ROOT
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(f"== {name} ({time.time() - t0:.0f} s, exit {proc.returncode}): {' '.join(cmd[1:])}")
    print(proc.stdout + proc.stderr, flush=True)
    if proc.returncode != 0 and not os.path.exists(path):
        with open(path + ".failed", "w") as f:
            f.write(" ".join(cmd[1:]) + "\n" + proc.stdout + proc.stderr)


def table(out: str) -> str:
    rows = [
        "| run | chips | mesh | batch | loss | per-chip GiB (of HBM) | fits | img/s at 50% MFU "
        "| collective GiB/step/chip | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in RUNS:
        path = os.path.join(out, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            p = json.load(f)
        mem = p["memory_per_chip"]["total"] / 2**30
        coll = sum(c["bytes_per_step"] for c in p["collectives"]) / 2**30
        mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1)
        ips = p["images_per_second"]["mfu"]
        rows.append(
            f"| {name} | {p['num_chips']} ({p['topology']}) | {mesh} | {p['batch_size']:,} "
            f"| {_loss(name)} | {mem:.2f} ({p['hbm_bytes'] / 2**30:.0f}) "
            f"| {'yes' if p['fits'] else 'no'} | {ips:,.0f} | {coll:.2f} "
            f"| {p['compile_seconds']:.0f} |"
        )
    return "\n".join(rows)


def _loss(name: str) -> str:
    return "gathered" if "gathered" in name else "ring"


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--out", default=os.path.join(HERE, "plan_pods"))
    ap.add_argument("--table", action="store_true", help="only print the table")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        sys.exit(f"error: --only: unknown runs {unknown}; expected names from {list(RUNS)}")
    os.makedirs(args.out, exist_ok=True)
    if not args.table:
        for name in names:
            run(name, args.out, extra)
    print(table(args.out))


if __name__ == "__main__":
    main()
