"""Image-search latency: exact (clipjax's index vs naive baselines), approximate (faiss) vs exact,
and the served text query end to end, alone and under 50 concurrent clients.

    python benchmarks/search.py [--quick] [--rows 100000] [--dim 512] [--queries 200] [-k 10]
    python benchmarks/search.py --ann [--rows 1000000] [--memory-budget 4G]
    python benchmarks/search.py --serve [--clients 50] [--seconds 30]

Default mode (exact):

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

--ann: `rows` synthetic unit vectors with cluster structure (1000 centres drawn uniformly on the
sphere; each vector = its centre + isotropic Gaussian noise of norm ~1, normalised: cosine ~0.7 to
its centre) and 200 held-out queries drawn the same way but not indexed. Builds the approximate
index `clipjax.search.ann.build_ann` picks for the memory budget (tuned to recall@10 0.95 on
held-out rows), reports build time, file size, resident memory opened memory-mapped and in RAM,
recall@10 against exact search on the held-out queries, and single-query latency of both, side
by side; then exact search over the first 100,000 rows.

--serve: the demo's model architecture (`clipjax.demo.DEMO_MODEL`; random weights, the cost is
the same) and an index of the demo's 600 held-out images, served by `python -m clipjax.search
serve` in its own process on 127.0.0.1. Text queries end to end (HTTP GET -> encode -> search ->
JSON) one at a time, then `clients` threads each sending queries back to back for `seconds`
(a bounded loop that stops by itself): errors, p50/p99 and queries/s.
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


def clustered_unit(rng, n: int, centres: np.ndarray) -> np.ndarray:
    """n unit vectors: a random centre each plus isotropic noise of norm ~1, normalised."""
    dim = centres.shape[1]
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_ann(args) -> None:
    import faiss

    from clipjax.search.__main__ import parse_bytes
    from clipjax.search.ann import AnnIndex, build_ann, recall_at_k

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    x = clustered_unit(rng, args.rows, centres)
    queries = clustered_unit(rng, 200, centres)
    print(f"generated {args.rows} x {args.dim} in {time.perf_counter() - t0:.1f} s")
    tmp = tempfile.mkdtemp(prefix="ann-bench-")
    try:
        meta = build_ann(tmp, x, memory_budget=parse_bytes(args.memory_budget))
        print(
            f"built {meta.factory} in {meta.build_s:.1f} s (+ tuning), file "
            f"{meta.file_bytes / 2**20:.0f} MiB, trained on {meta.trained_on} rows; "
            f"held-out-row recall@10 {meta.recall_at_10:.3f} at nprobe {meta.nprobe}"
        )
        _, truth = exact_topk(x, queries, args.k)
        rows = {}
        for mmap in (True, False):
            before = rss_mib()
            ann = AnnIndex.load(tmp, mmap=mmap)
            _, found = ann.search(x, queries, args.k)  # also pages the probed lists in
            timing = time_fn(lambda q, ann=ann: ann.search(x, q[None], args.k), queries)
            rows["mmap" if mmap else "in RAM"] = (
                timing,
                recall_at_k(found, truth),
                rss_mib() - before,
            )
            del ann
        exact = time_fn(lambda q: exact_topk(x, q, args.k), queries[:30])
        sub = np.ascontiguousarray(x[:100_000])
        exact100k = time_fn(lambda q: exact_topk(sub, q, args.k), queries)
        faiss_threads = faiss.omp_get_max_threads()
    finally:
        shutil.rmtree(tmp)
    print(
        f"\n{'search (k=' + str(args.k) + ')':<34} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>9} "
        f"{'RSS +MiB':>9}"
    )
    for name, (t, rec, mem) in rows.items():
        label = f"{meta.factory} nprobe {meta.nprobe}, {name}"
        print(f"{label:<34} {t['median_ms']:8.2f} {t['p95_ms']:8.2f} {rec:9.3f} {mem:9.0f}")
    print(
        f"{'exact over ' + str(args.rows):<34} {exact['median_ms']:8.2f} {exact['p95_ms']:8.2f} "
        f"{1.0:9.3f} {x.nbytes / 2**20:9.0f}"
    )
    print(
        f"{'exact over 100000':<34} {exact100k['median_ms']:8.2f} {exact100k['p95_ms']:8.2f} "
        f"{1.0:9.3f} {sub.nbytes / 2**20:9.0f}"
    )
    print(f"(faiss {faiss.__version__}, {faiss_threads} OpenMP threads; 200 held-out queries)")


def run_serve(args) -> None:
    import socket
    import subprocess
    import threading

    import flax
    import jax
    import requests

    from clipjax.data.demo import DEMO_CLASSNAMES, make_demo_dataset
    from clipjax.demo import DEMO_MODEL
    from clipjax.export.load import load, model_fingerprint
    from clipjax.export.modeldir import save_model_dir
    from clipjax.models import abstract_variables, build_config
    from clipjax.search.build import build_index
    from clipjax.search.sources import tfrecord_items

    tmp = tempfile.mkdtemp(prefix="serve-bench-")
    proc = None
    try:
        cfg = build_config("tiny", DEMO_MODEL)
        rng = np.random.default_rng(0)
        shapes = flax.core.meta.unbox(abstract_variables(cfg))["params"]
        params = jax.tree.map(
            lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes
        )
        save_model_dir(os.path.join(tmp, "model"), cfg, params)
        ds = make_demo_dataset(os.path.join(tmp, "data"), n_train=1, n_test=600)
        model, params, preprocess = load(os.path.join(tmp, "model"))
        import glob

        build_index(
            os.path.join(tmp, "index"),
            tfrecord_items(sorted(glob.glob(ds.test))),
            model=model,
            params=params,
            preprocess=preprocess,
            fingerprint=model_fingerprint(model.config, params),
            progress=False,
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
        cmd = [
            sys.executable,
            "-m",
            "clipjax.search",
            "serve",
            "--index",
            os.path.join(tmp, "index"),
            "--model",
            os.path.join(tmp, "model"),
            "--port",
            str(port),
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.3)
        texts = [f"a photo of a {c}." for c in DEMO_CLASSNAMES]
        session = requests.Session()
        lat, server_ms = [], []
        for i in range(args.queries):
            t0 = time.perf_counter()
            r = session.get(url + "/api/search", params={"q": texts[i % 12], "k": 20})
            lat.append(1000 * (time.perf_counter() - t0))
            assert r.status_code == 200 and len(r.json()["results"]) == 20
            t = r.json()["timings_ms"]
            server_ms.append(t["encode"] + t["search"])
        print(
            f"one client, {args.queries} text queries (k=20): end to end p50 "
            f"{np.median(lat):.1f} ms, p95 {np.percentile(lat, 95):.1f} ms; in the server "
            f"(encode + search) p50 {np.median(server_ms):.1f} ms"
        )
        results: list[list[float]] = [[] for _ in range(args.clients)]
        errors = [0] * args.clients
        stop_at = time.monotonic() + args.seconds

        def client(j: int) -> None:
            s = requests.Session()
            i = j
            while time.monotonic() < stop_at:  # bounded: stops by itself
                t0 = time.perf_counter()
                try:
                    r = s.get(url + "/api/search", params={"q": texts[i % 12], "k": 20}, timeout=30)
                    ok = r.status_code == 200 and len(r.json()["results"]) == 20
                except requests.RequestException:
                    ok = False
                if ok:
                    results[j].append(1000 * (time.perf_counter() - t0))
                else:
                    errors[j] += 1
                i += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(j,)) for j in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        allr = np.concatenate([np.asarray(r) for r in results])
        print(
            f"{args.clients} concurrent clients for {args.seconds} s: {len(allr)} queries, "
            f"{sum(errors)} errors, {len(allr) / wall:.1f} queries/s, latency p50 "
            f"{np.median(allr):.1f} ms, p99 {np.percentile(allr, 99):.1f} ms"
        )
        metrics = session.get(url + "/metrics").text
        for stage in ("encode_text", "search", "request"):
            n = [
                ln
                for ln in metrics.splitlines()
                if ln.startswith(f'clipjax_search_stage_seconds_sum{{stage="{stage}"}}')
            ]
            c = [
                ln
                for ln in metrics.splitlines()
                if ln.startswith(f'clipjax_search_stage_seconds_count{{stage="{stage}"}}')
            ]
            if n and c and float(c[0].split()[-1]):
                mean = 1000 * float(n[0].split()[-1]) / float(c[0].split()[-1])
                print(f"  server /metrics: {stage} mean {mean:.2f} ms")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ann", action="store_true", help="approximate vs exact (see above)")
    p.add_argument("--serve", action="store_true", help="served queries (see above)")
    p.add_argument("--memory-budget", default="4G")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args()
    n_queries = 30 if args.quick else args.queries
    if args.ann or args.serve:
        print(
            f"machine: {platform.machine()} {cpu_name()}, {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f}; date {datetime.date.today().isoformat()}"
        )
        print(f"command: python benchmarks/search.py {' '.join(sys.argv[1:])}")
        run_ann(args) if args.ann else run_serve(args)
        return
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
