"""Exact image-search latency: clipjax's index (one matmul + argpartition) vs naive baselines.

    python benchmarks/search.py [--quick] [--rows 100000] [--dim 512] [--queries 200] [-k 10]

Writes an index of `rows` random unit vectors (float16 storage, as `--float16` indexes are) with
the project's IndexWriter, times `Index.load`, then times single text-style queries (one [D]
vector, top-k) after load with:
  clipjax      Index.search: float32 matrix-vector product (BLAS) + argpartition + sort of k
  f16-native   the same on the float16 matrix kept as stored (numpy has no float16 BLAS)
  full-sort    float32 product + a full argsort of all scores (the naive top-k)
and a batch of 64 queries through Index.search (per-query cost when queries are batched).
All methods are checked to return the same top-k scores. Each latency is the median (and p95) of
`queries` repeats; wall time and the process CPU time per query are both reported, since the
machine may be shared. `--quick` (< 1 min) ends with one JSON line.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipjax.search.index import Index, IndexWriter, exact_topk  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def time_fn(fn, queries: np.ndarray) -> dict:
    """Median / p95 wall ms and mean CPU ms per call of fn(query) over the rows of `queries`."""
    fn(queries[0])  # warm-up (page-in, BLAS thread start)
    walls = []
    cpu0 = time.process_time()
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        walls.append(1000 * (time.perf_counter() - t0))
    cpu = 1000 * (time.process_time() - cpu0) / len(queries)
    return {
        "median_ms": float(np.median(walls)),
        "p95_ms": float(np.percentile(walls, 95)),
        "cpu_ms": cpu,
    }


def full_sort_topk(emb: np.ndarray, q: np.ndarray, k: int):
    scores = emb @ q
    ids = np.argsort(-scores, kind="stable")[:k]
    return scores[ids], ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args()
    n_queries = 30 if args.quick else args.queries
    print(
        f"machine: {platform.machine()} {cpu_name()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"command: python benchmarks/search.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"date: {datetime.date.today().isoformat()}; index: {args.rows} x {args.dim}, "
        f"float16 storage; k={args.k}; {n_queries} single queries"
    )

    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="search-bench-")
    try:
        with IndexWriter(tmp, dim=args.dim, dtype="float16", model_fingerprint="bench") as writer:
            for start in range(0, args.rows, 10_000):
                n = min(10_000, args.rows - start)
                emb = rng.standard_normal((n, args.dim), dtype=np.float32)
                emb /= np.linalg.norm(emb, axis=1, keepdims=True)
                writer.add_chunk([f"/images/{start + i:07d}.jpg" for i in range(n)], emb)
        t0 = time.perf_counter()
        index = Index.load(tmp)
        load_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp)
    emb16 = index.embeddings.astype(np.float16)
    queries = rng.standard_normal((n_queries, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    # Same answers first (scores compared: ties may order ids differently).
    for q in queries[:5]:
        s_a, _ = index.search(q, args.k)
        s_b, _ = full_sort_topk(index.embeddings, q, args.k)
        s_c, _ = exact_topk(emb16, q, args.k)
        assert np.allclose(s_a, s_b, atol=1e-6), "clipjax vs full sort differ"
        assert np.allclose(s_a, s_c, atol=2e-3), "clipjax vs float16 differ"

    results = {
        "clipjax": time_fn(lambda q: index.search(q, args.k), queries),
        "f16-native": time_fn(
            lambda q: exact_topk(emb16, q, args.k), queries[: max(5, n_queries // 10)]
        ),
        "full-sort": time_fn(lambda q: full_sort_topk(index.embeddings, q, args.k), queries),
    }
    batch = queries[:64] if len(queries) >= 64 else np.resize(queries, (64, args.dim))
    t0 = time.perf_counter()
    reps = 3 if args.quick else 10
    for _ in range(reps):
        index.search(batch, args.k)
    batched_ms = 1000 * (time.perf_counter() - t0) / (reps * 64)

    print(f"\nIndex.load: {load_s:.2f} s ({index.embeddings.nbytes / 2**20:.0f} MiB as float32)")
    print(f"{'method':<12} {'median ms':>10} {'p95 ms':>8} {'CPU ms':>8}")
    for name, r in results.items():
        print(f"{name:<12} {r['median_ms']:10.2f} {r['p95_ms']:8.2f} {r['cpu_ms']:8.2f}")
    print(f"{'batched x64':<12} {batched_ms:10.2f}  (per query)")
    speedup = results["full-sort"]["median_ms"] / results["clipjax"]["median_ms"]
    print(
        f"\nclipjax vs full sort: {speedup:.1f}x; target < 50 ms per query: "
        f"{'met' if results['clipjax']['p95_ms'] < 50 else 'NOT met'} "
        f"(p95 {results['clipjax']['p95_ms']:.1f} ms)"
    )
    if args.quick:
        print(
            json.dumps(
                {
                    "bench": "search",
                    "rows": args.rows,
                    "dim": args.dim,
                    "k": args.k,
                    "load_s": round(load_s, 3),
                    **{f"{n}_median_ms": round(r["median_ms"], 3) for n, r in results.items()},
                    "clipjax_p95_ms": round(results["clipjax"]["p95_ms"], 3),
                    "batched_per_query_ms": round(batched_ms, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
