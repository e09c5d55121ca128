"""Train-step throughput, MFU, compile time and peak memory; optionally side by side with open_clip.

    python benchmarks/train_step.py [--quick] [--compare open_clip] [--presets tiny,B/32,B/16]
        [--dtypes float32,bfloat16] [--batch tiny=32,B/32=32,B/16=8] [--steps N] [--rounds N]
        [--no-scan] [--remat dots] [--attention xla|cudnn] [--patch-dropout 0,0.5,0.75]
        [--profile DIR]

Each (preset, dtype) runs the project's real jitted train step (`clipjax.train.build_trainer`:
state creation, masked AdamW with clipping, gathered InfoNCE, the donated-state step) on one CPU
device with a synthetic batch, in a fresh subprocess so compile time and peak RSS are its own.
In the same subprocess, right before the steps, a large jitted matmul in the same dtype (bf16:
bf16 inputs, float32 accumulation) gives the peak that MFU is measured against.

FLOPs are counted analytically (the same count for both frameworks): a train step is 3x the forward
matmul FLOPs of both towers (patch embedding, q/k/v/out projections, attention scores and mixing,
MLP, pooled projections) plus the logits matmul of the loss. XLA's own cost_analysis count of the
compiled step is printed alongside as a cross-check.

`--compare open_clip` then runs `benchmarks/openclip_step.py` in a subprocess: open_clip's CLIP
built with the same architecture (random init, same batch, same precision via bf16 autocast, same
thread count as XLA's CPU pool, AdamW with the same hyper-parameters and clipping, its ClipLoss),
and prints the images/s ratio clipjax / open_clip. Needs the `bench` extra
(pip install -e '.[bench]').
`--rounds N` measures both sides N times, alternating who goes first, and pools the steps (median
and best step both reported): on a shared machine whose speed drifts, one back-to-back pair can be
off by 30%.
Both subprocesses run with glibc's huge-page malloc tunable (`clipjax.hostmem`; what `make demo`
uses) unless `--no-hugepages` is given.
`--patch-dropout P1,P2,..` adds rows per patch-dropout rate (FLIP: clipjax's
`model.patch_dropout`, open_clip's `CLIPVisionCfg(patch_dropout=p)`); the analytic FLOPs count
the image transformer on the kept tokens.
`--quick` (about a minute) runs the tiny preset only and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from clipjax.hostmem import with_hugepage_malloc
from clipjax.plan.flops import train_step_flops

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_BATCH = {"tiny": 32, "S/32": 32, "B/32": 32, "B/16": 8, "L/14": 4}
RESULT_TAG = "RESULT "


# ------------------------------------------------------------------------------------------------
# Worker: one clipjax configuration, in its own process.


def matmul_peak(dtype: str, seconds: float = 3.0) -> float:
    """FLOP/s of a jitted [n,n]x[n,n] matmul in `dtype` (bf16 accumulates in float32); n = 2048
    on a CPU, 8192 on an accelerator (large enough to reach its peak)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048 if jax.default_backend() == "cpu" else 8192

    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best, spent = float("inf"), 0.0
    while spent < seconds:  # best of several: the peak the machine can reach right now
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        dt_s = time.perf_counter() - t0
        best, spent = min(best, dt_s), spent + dt_s
    return 2.0 * n**3 / best


def peak_device_memory() -> float | None:
    """Peak bytes allocated on the first device (GiB), where the backend reports it (GPU/TPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def synthetic_batch(cfg: dict, batch: int, seed: int = 0) -> dict:
    """Normalised-looking NHWC images and token rows ending in end-of-text (the max id)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, cfg["image_size"], cfg["image_size"], 3), np.float32)
    ctx = cfg["context_length"]
    text = np.zeros((batch, ctx), np.int32)
    lengths = rng.integers(3, ctx + 1, size=batch)
    for i, n in enumerate(lengths):
        text[i, 0] = 49406
        text[i, 1 : n - 1] = rng.integers(1, 49405, size=n - 2)
        text[i, n - 1] = cfg["vocab_size"] - 1
    return {"image": images, "text": text}


def run_worker(spec: dict) -> dict:
    import resource

    import jax
    import numpy as np

    from clipjax.models.layers import count_params
    from clipjax.parallel.mesh import make_mesh
    from clipjax.train.builder import build_trainer
    from clipjax.train.config import base_config

    c = base_config()
    c.model.preset = spec["preset"]
    c.model.dtype = spec["dtype"]
    c.model.scan_layers = spec["scan"]
    c.model.remat = spec["remat"]
    c.model.attention = spec["attention"]
    c.model.patch_dropout = float(spec.get("patch_dropout", 0.0))
    c.batch_size = spec["batch"]
    c.num_steps = 10_000
    c.optimizer.warmup_steps = 10
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    trainer = build_trainer(c, mesh)
    cfg = trainer.model_config.to_dict()
    state = trainer.init_state()
    host = synthetic_batch(cfg, spec["batch"])
    batch = {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in host.items()}
    jax.block_until_ready((state, batch))

    t0, c0 = time.perf_counter(), time.process_time()
    compiled = trainer.train_step.lower(state, batch).compile()
    hparams = trainer.train_step.placed_hparams
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    xla_flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost.get("flops")) if cost and cost.get("flops") else None
    except Exception:  # cost analysis is best-effort across jax versions
        pass

    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, hparams)
    jax.block_until_ready((state, metrics))
    first_step_s = time.perf_counter() - t0
    loss0 = float(metrics["loss"])

    peak = matmul_peak(spec["dtype"], seconds=spec["peak_seconds"])
    if spec.get("profile"):
        jax.profiler.start_trace(spec["profile"])
    times = []
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, hparams)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    if spec.get("profile"):
        jax.profiler.stop_trace()
    loss = float(metrics["loss"])
    if not (np.isfinite(loss0) and np.isfinite(loss)):
        raise RuntimeError(f"non-finite loss {loss0} -> {loss}")
    return {
        "framework": "clipjax",
        "step_s": times,
        "compile_s": compile_s,
        "compile_cpu_s": compile_cpu_s,
        "first_step_s": first_step_s,
        "xla_flops": xla_flops,
        "peak_flops": peak,
        "rss_gib": usage1.ru_maxrss / 2**20,
        "device_peak_gib": peak_device_memory(),
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
        "page_faults_per_step": (usage1.ru_minflt - usage0.ru_minflt) / spec["steps"],
        "sys_s_per_step": (usage1.ru_stime - usage0.ru_stime) / spec["steps"],
        "loss": [loss0, loss],
        "config": cfg,
        "devices": jax.device_count(),
        "num_params": count_params(state.params),
    }


# ------------------------------------------------------------------------------------------------
# Driver.


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{len(os.sched_getaffinity(0))}-core {cpu}, {mem:.0f} GiB, {platform.system()}"


def run_sub(cmd: list[str], timeout: float, hugepages: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env = with_hugepage_malloc(env, enabled=hugepages)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout)[-3000:]
    raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{tail}")


def merge_rounds(results: list[dict]) -> dict:
    """One worker result from several rounds: every round's steps, the highest matmul peak, the
    first round's compile time and the largest RSS."""
    out = dict(results[0])
    out["step_s"] = [t for r in results for t in r["step_s"]]
    out["rss_gib"] = max(r["rss_gib"] for r in results)
    peaks = [r["device_peak_gib"] for r in results if r.get("device_peak_gib") is not None]
    out["device_peak_gib"] = max(peaks) if peaks else None
    if "peak_flops" in out:
        out["peak_flops"] = max(r["peak_flops"] for r in results)
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def summarise(r: dict, batch: int, flops: float, peak: float) -> dict:
    step = median(r["step_s"])
    achieved = flops / step
    return {
        "images_per_s": batch / step,
        "step_s": step,
        "step_min_s": min(r["step_s"]),
        "tflops": achieved / 1e12,
        "mfu": achieved / peak,
        "compile_s": r.get("compile_s"),
        "compile_cpu_s": r.get("compile_cpu_s"),
        "first_step_s": r.get("first_step_s"),
        "rss_gib": r["rss_gib"],
        "device_peak_gib": r.get("device_peak_gib"),
    }


def device_memory(summary: dict) -> str:
    peak = summary.get("device_peak_gib")
    return "" if peak is None else f", device peak {peak:.1f} GiB"


def parse_batches(spec: str) -> dict[str, int]:
    out = dict(DEFAULT_BATCH)
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) <= 0:
            raise SystemExit(f"--batch: expected PRESET=POSITIVE_INT items, got {item!r}")
        out[name] = int(value)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny preset only; ends with one JSON line")
    p.add_argument("--presets", default="tiny,B/32,B/16")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", default="", help="per-preset batch, e.g. B/32=32,B/16=8")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    p.add_argument(
        "--no-scan",
        dest="scan",
        action="store_false",
        help="unrolled layers instead of a layer scan",
    )
    p.add_argument(
        "--remat",
        default="dots",
        help="remat policy of the transformer blocks (the trainer's default: dots)",
    )
    p.add_argument(
        "--attention",
        choices=["xla", "cudnn"],
        default="xla",
        help="attention implementation of both towers (cudnn: GPU, bfloat16 only)",
    )
    p.add_argument(
        "--patch-dropout",
        default="0",
        help="comma-separated patch-dropout rates in [0, 1), one row each (e.g. 0,0.5,0.75)",
    )
    p.add_argument("--compare", choices=["open_clip"], default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads (XLA's CPU pool uses every core the process may run on)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each side this many times, alternating who goes first",
    )
    p.add_argument(
        "--profile", default="", help="write a jax profiler trace of the timed steps here"
    )
    p.add_argument(
        "--no-hugepages",
        dest="hugepages",
        action="store_false",
        help="run both sides without glibc's huge-page malloc tunable "
        "(clipjax.hostmem), even if GLIBC_TUNABLES sets it",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return

    from clipjax.models import get_preset  # validates preset names before any subprocess

    presets = ["tiny"] if args.quick else [s for s in args.presets.split(",") if s]
    dtypes = [s for s in args.dtypes.split(",") if s]
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            raise SystemExit(f"--dtypes: {d!r} is not one of float32, bfloat16")
    for name in presets:
        try:
            vision_type = get_preset(name).vision_type
        except ValueError as e:
            raise SystemExit(f"--presets: {e}") from None
        if vision_type != "vit":
            raise SystemExit(
                f"--presets: {name!r} has a {vision_type} image tower; the FLOP "
                "count and the open_clip comparison support ViT presets only"
            )
    if args.steps < 1:
        raise SystemExit("--steps: expected >= 1")
    if args.rounds < 1:
        raise SystemExit("--rounds: expected >= 1")
    batches = parse_batches(args.batch)
    try:
        pdrops = [float(x) for x in args.patch_dropout.split(",") if x]
    except ValueError:
        raise SystemExit(f"--patch-dropout: expected numbers, got {args.patch_dropout!r}") from None
    if not pdrops or not all(0.0 <= x < 1.0 for x in pdrops):
        raise SystemExit(f"--patch-dropout: expected rates in [0, 1), got {args.patch_dropout!r}")
    steps = 2 if args.quick else args.steps
    if args.compare == "open_clip":
        try:
            import open_clip  # noqa: F401
        except ImportError:
            raise SystemExit(
                "--compare open_clip needs the bench extra: pip install -e '.[bench]'"
            ) from None

    load = os.getloadavg()
    print(f"machine: {machine()}; load average at start {load[0]:.1f}")
    cmd_args = sys.argv[1:] if argv is None else argv
    print(f"command: python benchmarks/train_step.py {' '.join(cmd_args)}")
    print(
        f"date: {datetime.date.today()}; one device, layer scan={args.scan}, "
        f"remat={args.remat}, attention={args.attention}; "
        f"huge-page malloc (both sides)={args.hugepages}; "
        f"FLOPs: analytic (3x forward matmuls); in brackets XLA's cost_analysis count "
        f"(it counts a scanned layer body once)"
    )
    rows = []
    for name in presets:
        b = batches.get(name, 8)
        for dtype, pdrop in [(d, x) for d in dtypes for x in pdrops]:
            spec = {
                "preset": name,
                "dtype": dtype,
                "batch": b,
                "steps": steps,
                "scan": args.scan,
                "remat": args.remat,
                "attention": args.attention,
                "patch_dropout": pdrop,
                "peak_seconds": 1.5 if args.quick else 3.0,
                "profile": os.path.join(args.profile, f"{name.replace('/', '')}-{dtype}")
                if args.profile
                else "",
            }
            ours = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
            theirs = None
            results: dict[str, list[dict]] = {"clipjax": [], "open_clip": []}
            for rnd in range(args.rounds):
                # Alternate who goes first so that a machine slowing down or speeding up during
                # the run does not favour either side.
                order = ["clipjax", "open_clip"] if rnd % 2 == 0 else ["open_clip", "clipjax"]
                for who in order:
                    if who == "clipjax":
                        results[who].append(run_sub(ours, args.timeout, args.hugepages))
                    elif args.compare == "open_clip":
                        if theirs is None:  # round 0 ran clipjax first: its model config
                            theirs = [
                                sys.executable,
                                os.path.join(HERE, "openclip_step.py"),
                                json.dumps(
                                    {
                                        "config": results["clipjax"][0]["config"],
                                        "batch": b,
                                        "dtype": dtype,
                                        "steps": steps,
                                        "threads": args.threads,
                                        "patch_dropout": pdrop,
                                    }
                                ),
                            ]
                        results[who].append(run_sub(theirs, args.timeout, args.hugepages))
            r = merge_rounds(results["clipjax"])
            flops = train_step_flops(r["config"], b)
            peak = r["peak_flops"]
            row = {
                "preset": name,
                "dtype": dtype,
                "patch_dropout": pdrop,
                "batch": b,
                "flops": flops,
                "xla_flops": r["xla_flops"],
                "peak_tflops": peak / 1e12,
                "rounds": args.rounds,
                "clipjax": summarise(r, b, flops, peak),
            }
            j = row["clipjax"]
            row["device"] = r["device"]
            xla = f" [{r['xla_flops'] / 1e9:.0f}]" if r["xla_flops"] else ""
            if not rows:
                print(f"device: {r['device']}")
            print(
                f"{name:5s} {dtype:8s} p={pdrop:.2f} B={b:3d} clipjax: "
                f"{j['images_per_s']:7.2f} img/s  "
                f"step {j['step_s']:.3f}s (min {j['step_min_s']:.3f}s)  "
                f"{j['tflops'] * 1e3:6.1f} GFLOP/s "
                f"(step {flops / 1e9:.0f}{xla} GFLOP)  MFU {100 * j['mfu']:.0f}% of "
                f"{peak / 1e9:.0f} GFLOP/s matmul peak  compile {j['compile_s']:.1f}s "
                f"(CPU {j['compile_cpu_s']:.1f}s)  "
                f"RSS {j['rss_gib']:.2f} GiB{device_memory(j)}",
                flush=True,
            )
            if args.compare == "open_clip":
                o = merge_rounds(results["open_clip"])
                row["open_clip"] = summarise(o, b, flops, peak)
                if o["num_params"] != r["num_params"]:
                    raise RuntimeError(
                        f"{name}: open_clip model has {o['num_params']} params, "
                        f"clipjax {r['num_params']}: not the same architecture"
                    )
                row["open_clip"].update(
                    num_params=o["num_params"],
                    named=o["named_config"],
                    version=o["version"],
                    torch=o["torch"],
                    threads=o["threads"],
                )
                oc = row["open_clip"]
                row["ratio"] = j["images_per_s"] / oc["images_per_s"]
                row["ratio_best_steps"] = oc["step_min_s"] / j["step_min_s"]
                print(
                    f"{'':5s} {'':8s} {'':6s} {'':5s} open_clip: {oc['images_per_s']:5.2f} img/s  "
                    f"step {oc['step_s']:.3f}s (min {oc['step_min_s']:.3f}s)  "
                    f"{oc['tflops'] * 1e3:6.1f} GFLOP/s  MFU "
                    f"{100 * oc['mfu']:.0f}%  first step {oc['first_step_s']:.1f}s  RSS "
                    f"{oc['rss_gib']:.2f} GiB{device_memory(oc)}  ->  "
                    f"clipjax/open_clip = {row['ratio']:.2f}x "
                    f"median step, {row['ratio_best_steps']:.2f}x best step  "
                    f"({o['num_params'] / 1e6:.1f}M params in both; open_clip "
                    f"{o['version']} {o['named_config'] or 'custom config'}, "
                    f"{o['threads']} threads)",
                    flush=True,
                )
            rows.append(row)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "quick": args.quick,
                "machine": machine(),
                "load_avg": [load[0], os.getloadavg()[0]],
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
