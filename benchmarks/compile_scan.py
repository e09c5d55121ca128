"""Compile time of a CLIP forward (default ViT-B/16) with layers scanned vs. unrolled in a loop.

Parameters stay abstract (ShapeDtypeStructs from eval_shape): nothing is allocated, only
`jit(...).lower(...)` (tracing to StableHLO) and `.compile()` (XLA) are timed. Each variant is
measured `--repeats` times, alternating, each time on a fresh function object so nothing is cached.

    python benchmarks/compile_scan.py                # B/16 forward, batch 1
    python benchmarks/compile_scan.py --mode grad    # value_and_grad of a contrastive loss
    python benchmarks/compile_scan.py --quick        # one repeat, ends with one JSON line
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _build(cfg, mode: str, batch: int):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from clipjax.models import CLIP, dummy_inputs

    model = CLIP(cfg)
    images, text = dummy_inputs(cfg, batch)
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images, text))
    args = (
        abstract,
        jax.ShapeDtypeStruct(images.shape, images.dtype),
        jax.ShapeDtypeStruct(text.shape, text.dtype),
    )

    if mode == "forward":

        def fn(variables, images, text):
            return model.apply(variables, images, text)
    else:

        def loss(params, images, text):
            out = model.apply({"params": params}, images, text)
            logits = out["image_embeds"] @ out["text_embeds"].T * jnp.exp(out["logit_scale"])
            return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits)))

        def fn(variables, images, text):
            return jax.value_and_grad(loss)(variables["params"], images, text)

    return fn, args


def measure(cfg, mode: str, batch: int) -> tuple[float, float]:
    """(lower seconds, compile seconds) for one fresh jit of the model."""
    import jax

    fn, args = _build(cfg, mode, batch)
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="B/16")
    parser.add_argument("--mode", choices=("forward", "grad"), default="forward")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--remat", default="none", help="remat policy for both variants")
    parser.add_argument(
        "--quick", action="store_true", help="one repeat; print one JSON line at the end"
    )
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats

    import jax

    from clipjax.models import get_preset

    base = dataclasses.replace(get_preset(args.preset), remat=args.remat)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, jax {jax.__version__}, "
        f"device {jax.devices()[0].device_kind}"
    )
    cmd_args = argv if argv is not None else sys.argv[1:]
    print(f"command: {' '.join([os.path.basename(sys.argv[0])] + cmd_args)}")
    print(
        f"measuring: {args.preset} {args.mode}, batch {args.batch}, remat={args.remat}, "
        f"{repeats} repeat(s)"
    )

    # Warm up the backend (first-compile overheads) so neither variant pays for it.
    measure(dataclasses.replace(get_preset("tiny"), scan_layers=True), args.mode, args.batch)
    results: dict[str, list[tuple[float, float]]] = {"loop": [], "scan": []}
    for _ in range(repeats):
        for name in ("loop", "scan"):
            cfg = dataclasses.replace(base, scan_layers=(name == "scan"))
            lower_s, compile_s = measure(cfg, args.mode, args.batch)
            results[name].append((lower_s, compile_s))
            print(
                f"  {name:<4}: lower {lower_s:6.2f}s  compile {compile_s:6.2f}s  "
                f"total {lower_s + compile_s:6.2f}s"
            )

    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "lower_s": round(statistics.median(r[0] for r in runs), 3),
            "compile_s": round(statistics.median(r[1] for r in runs), 3),
            "total_s": round(statistics.median(r[0] + r[1] for r in runs), 3),
        }
    speedup = summary["loop"]["total_s"] / summary["scan"]["total_s"]
    print(
        f"median lower+compile: loop {summary['loop']['total_s']:.2f}s, "
        f"scan {summary['scan']['total_s']:.2f}s "
        f"-> scan is {speedup:.2f}x faster"
    )
    if args.quick:
        print(
            json.dumps(
                {
                    "benchmark": "compile_scan",
                    "preset": args.preset,
                    "mode": args.mode,
                    "batch": args.batch,
                    **summary,
                    "speedup": round(speedup, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
