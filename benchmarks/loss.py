"""Contrastive loss memory/time on 8 fake CPU devices: reference vs gathered vs ring InfoNCE.

    python benchmarks/loss.py [--quick | --accelerator] [--steps N] [--tile T]

For each (implementation, global batch B, dim D) it jit-compiles forward+backward (value and grads
w.r.t. both embeddings and the log temperature), reads the per-device temporary memory from XLA's
compiled memory analysis, and - when 8 x (temp + arguments + outputs) fits in the RAM available
now - runs it, reporting time per step and the peak RSS of a fresh process (each config runs in
its own subprocess, so peaks do not mix). Bytes communicated per device are computed from the
collectives each implementation issues (reference: XLA chooses, not counted). Configs that would
not fit are reported as 'does not fit' without running. `--quick` (< 1 min) ends with one JSON line.
`--accelerator` runs gathered vs ring at 64k and 256k global batch (D=512) on the real devices
(e.g. one GPU), checking the fit against the device's memory instead of host RAM.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

N_DEVICES = 8
FULL = [
    ("reference", 4096, 512),
    ("gathered", 4096, 512),
    ("ring", 4096, 512),
    ("gathered", 16384, 512),
    ("ring", 16384, 512),
    ("gathered", 65536, 128),
    ("ring", 65536, 128),
    ("gathered", 131072, 128),
    ("ring", 131072, 128),
]
QUICK = [
    ("reference", 2048, 128),
    ("gathered", 2048, 128),
    ("ring", 2048, 128),
    ("gathered", 4096, 128),
    ("ring", 4096, 128),
]
ACCELERATOR = [
    ("gathered", 65536, 512),
    ("ring", 65536, 512),
    ("gathered", 262144, 512),
    ("ring", 262144, 512),
]
SLOW_STEP_S = 20.0  # a warm-up call slower than this is itself the timing (saves minutes)


def comm_bytes(impl: str, b_global: int, d: int, n: int = N_DEVICES) -> int | None:
    """Bytes each device sends per fwd+bwd step, from the collectives the implementation issues."""
    b, f32 = b_global // n, 4
    if impl == "gathered":
        # forward: all_gather of images and texts; backward: their transposes, reduce-scatters.
        return 4 * (n - 1) * b * d * f32
    if impl == "ring":
        fwd = (n - 1) * b * d + n * 3 * b  # text blocks; (max, sum, batch-max) column states
        bwd = (n - 1) * (b * d + b) + n * b * d  # text blocks + column LSE; dtext accumulators
        return (fwd + bwd) * f32
    return None


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def run_one(impl: str, b_global: int, d: int, steps: int, tile: int, accelerator: bool) -> dict:
    """Compile, check the fit, time; runs inside a fresh subprocess."""
    if not accelerator:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
        )
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from clipjax.losses import infonce_gathered, infonce_reference, infonce_ring

    devices = np.array(jax.devices())
    n = devices.size
    mesh = Mesh(devices.reshape(1, n) if accelerator else devices.reshape(2, 4), ("data", "fsdp"))
    fns = {
        "reference": lambda x, y, s: infonce_reference(x, y, s)[0],
        "gathered": lambda x, y, s: infonce_gathered(x, y, s, mesh)[0],
        "ring": lambda x, y, s: infonce_ring(x, y, s, mesh, tile=tile)[0],
    }
    step = jax.jit(jax.value_and_grad(fns[impl], argnums=(0, 1, 2)))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    shape = jax.ShapeDtypeStruct((b_global, d), jnp.float32, sharding=batch)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    t0 = time.perf_counter()
    compiled = step.lower(shape, shape, scale).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_device = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    if accelerator:  # each device's own memory
        need = per_device
        stats = jax.devices()[0].memory_stats() or {}  # none on CPU: host RAM
        avail = stats.get("bytes_limit") or mem_available()
        where = f"{jax.devices()[0].device_kind} memory"
    else:  # the fake devices share the host's RAM
        need = N_DEVICES * per_device + (1 << 30)  # + ~1 GiB for the runtime itself
        avail = mem_available()
        where = "RAM"
    row = {
        "impl": impl,
        "B": b_global,
        "D": d,
        "tile": tile if impl == "ring" else None,
        "temp_bytes_per_device": int(mem.temp_size_in_bytes),
        "comm_bytes_per_device": comm_bytes(impl, b_global, d, n),
        "compile_s": compile_s,
    }
    if need > 0.9 * avail:
        row.update(
            fits=False,
            note=f"does not fit: needs ~{need / 2**30:.1f} GiB, "
            f"{avail / 2**30:.1f} GiB {where} available",
        )
        return row

    def sharded(seed):
        x = jax.random.normal(jax.random.PRNGKey(seed), (b_global, d), jnp.float32)
        return jax.device_put(x / jnp.linalg.norm(x, axis=1, keepdims=True), batch)

    x, y = sharded(0), sharded(1)
    s = jax.device_put(jnp.float32(np.log(100.0)), NamedSharding(mesh, P()))
    t0 = time.perf_counter()
    loss, _ = jax.block_until_ready(compiled(x, y, s))  # warm-up (already compiled)
    times = [time.perf_counter() - t0]
    if times[0] > SLOW_STEP_S:
        row["note"] = "timed: 1 call"
        steps = 0
    else:
        times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _ = jax.block_until_ready(compiled(x, y, s))
        times.append(time.perf_counter() - t0)
    row.update(
        fits=True,
        step_s=float(np.median(times)),
        loss=float(loss),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    if accelerator:
        stats = jax.devices()[0].memory_stats() or {}
        row["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    return row


def spawn(impl, b_global, d, steps, tile, timeout, accelerator) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        f"{impl},{b_global},{d}",
        "--steps",
        str(steps),
        "--tile",
        str(tile),
    ] + (["--accelerator"] if accelerator else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "B": b_global, "D": d, "fits": None, "note": f"timeout {timeout}s"}
    if out.returncode != 0:
        return {
            "impl": impl,
            "B": b_global,
            "D": d,
            "fits": None,
            "note": f"failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}",
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_bytes(v):
    return "-" if v is None else f"{v / 2**20:,.1f} MiB"


def print_header():
    print(
        f"{'impl':<10}{'B':>8}{'D':>5}  {'temp/device':>14}  {'peak mem':>13}  "
        f"{'step s':>8}  {'comm/device':>12}  note"
    )


def print_row(r):
    step = f"{r['step_s']:.3f}" if r.get("step_s") is not None else "-"
    print(
        f"{r['impl']:<10}{r['B']:>8}{r['D']:>5}  {fmt_bytes(r.get('temp_bytes_per_device')):>14}"
        f"  {fmt_bytes(r.get('device_peak_bytes', r.get('peak_rss_bytes'))):>13}  {step:>8}  "
        f"{fmt_bytes(r.get('comm_bytes_per_device')):>12}  {r.get('note', '')}"
    )


def compare(rows, b_global):
    """ring vs gathered at one batch: memory ratio (compiled) and time ratio (if both ran)."""
    by = {r["impl"]: r for r in rows if r["B"] == b_global}
    g, r = by.get("gathered"), by.get("ring")
    if not g or not r or not g.get("temp_bytes_per_device") or not r.get("temp_bytes_per_device"):
        return None
    out = {
        "B": b_global,
        "ring_over_gathered_temp": r["temp_bytes_per_device"] / g["temp_bytes_per_device"],
    }
    if g.get("step_s") and r.get("step_s"):
        out["ring_over_gathered_time"] = r["step_s"] / g["step_s"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, < 1 min, one JSON line")
    p.add_argument(
        "--accelerator",
        action="store_true",
        help="gathered vs ring at 64k/256k on the real devices (peak mem: device memory)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (median)")
    p.add_argument("--tile", type=int, default=1024, help="ring: image rows per logit block")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per config")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tile <= 0:
        p.error(f"--tile must be positive, got {args.tile}")
    if args.one:
        impl, b_global, d = args.one.split(",")
        row = run_one(impl, int(b_global), int(d), args.steps or 1, args.tile, args.accelerator)
        print(json.dumps(row))
        return
    configs = ACCELERATOR if args.accelerator else QUICK if args.quick else FULL
    steps = args.steps or (3 if args.quick or args.accelerator else 2)
    devices = (
        "the real devices, mesh (data=1, fsdp=all); peak mem: the device's"
        if args.accelerator
        else f"{N_DEVICES} fake CPU devices, mesh (data=2, fsdp=4); peak mem: process RSS"
    )
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, "
        f"{mem_available() / 2**30:.1f} GiB available; {devices}; "
        f"python {platform.python_version()}"
    )
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.date.today()}; fwd+bwd, f32, median of {steps} steps after warm-up")
    print_header()
    rows = []
    for impl, b_global, d in configs:
        rows.append(spawn(impl, b_global, d, steps, args.tile, args.timeout, args.accelerator))
        print_row(rows[-1])
        sys.stdout.flush()
    comparisons = [c for c in (compare(rows, b) for b in sorted({r["B"] for r in rows})) if c]
    for c in comparisons:
        print("ring vs gathered:", json.dumps(c))
    if args.quick or args.accelerator:
        print(json.dumps({"benchmark": "loss", "rows": rows, "comparisons": comparisons}))


if __name__ == "__main__":
    main()
