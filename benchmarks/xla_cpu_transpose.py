"""XLA CPU: an elementwise computation written in transposed order vs in its natural order.

    python benchmarks/xla_cpu_transpose.py [--quick] [--repeats 20]

In the B/32 train step XLA feeds the weight-gradient matmuls transposed operands. Where such an
operand is a fused elementwise result (the QuickGELU backward, the LayerNorm backward), XLA's CPU
backend computes the elementwise chain directly in transposed order, and that loop runs far
slower than the same chain in natural order followed by a plain transpose. This script measures
the three, side by side in one process (calls alternated, best of `--repeats`), on the train
step's shapes: the text MLP hidden [2464, 2048] and an image LayerNorm-backward-like chain of six
[1600, 768] inputs. It also times the two forms a weight-gradient matmul x^T @ dy can take (text MLP
fc: x [2464, 512], dy [2464, 2048]): XLA's Eigen dot with a transposed operand, and a transpose of x
followed by the YNNPACK dot. `--option KEY=VALUE` (repeatable) passes an XLA compiler option to
every jitted function. `--quick` (5 repeats) ends with one JSON line like the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import machine  # noqa: E402


def quick_gelu_grad(h, g):
    import jax

    s = jax.nn.sigmoid(1.702 * h)
    return g * s * (1 + 1.702 * h * (1 - s))


def layer_norm_grad_like(a, b, c, d, e, f):
    return a * b + (c - d.mean(-1, keepdims=True)) * e + f


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="XLA compiler option, e.g. xla_cpu_enable_fast_math=true",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 5
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    options = {}
    for opt in args.option:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {opt!r}: expected KEY=VALUE")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    import jax
    import numpy as np

    def compiled(fn, *xs):
        return jax.jit(fn).lower(*xs).compile(compiler_options=options or None)

    rng = np.random.default_rng(0)

    def arrays(n, shape):
        return [jax.device_put(rng.standard_normal(shape, dtype=np.float32)) for _ in range(n)]

    [x], [dy] = arrays(1, (2464, 512)), arrays(1, (2464, 2048))
    cases = {
        name: {
            "natural": (fn, xs),
            "transposed (fused)": (lambda *a, fn=fn: fn(*a).T, xs),
            "plain transpose of the result": (lambda y: y.T, [jax.jit(fn)(*xs)]),
        }
        for name, (fn, xs) in {
            "quick_gelu_grad [2464,2048]": (quick_gelu_grad, arrays(2, (2464, 2048))),
            "layer_norm_grad_like [1600,768]": (layer_norm_grad_like, arrays(6, (1600, 768))),
        }.items()
    }
    cases["weight gradient x^T dy [512,2048]"] = {
        "Eigen dot, transposed operand": (
            lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ()))),
            [x, dy],
        ),
        "YNNPACK dot on x^T": (lambda a, b: a @ b, [x.T.copy(), dy]),
        "transpose of x": (lambda a: a.T, [x]),
    }
    results = {}
    for name, variants in cases.items():
        calls = {v: (compiled(f, *a), a) for v, (f, a) in variants.items()}
        times = {v: [] for v in calls}
        for f, a in calls.values():
            jax.block_until_ready(f(*a))
        for _ in range(args.repeats):
            for v, (f, a) in calls.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(*a))
                times[v].append(time.perf_counter() - t0)
        results[name] = {v: round(1e3 * min(ts), 2) for v, ts in times.items()}
        # Which calls XLA handed to YNNPACK (its fusions are named ynn_fusion).
        uses_ynn = {v: "ynn_fusion" in f.as_text() for v, (f, _) in calls.items()}
        print(
            f"{name}: "
            + ", ".join(
                f"{v} {ms:.2f} ms" + (" [YNNPACK fusion]" if uses_ynn[v] else "")
                for v, ms in results[name].items()
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "benchmark": "xla_cpu_transpose",
                "machine": machine(),
                "jax": jax.__version__,
                "repeats": args.repeats,
                "options": options,
                "best_ms": results,
            }
        )
    )


if __name__ == "__main__":
    main()
