"""CLIP-score filtering of a noisy pool: what it removes, and what training on the result gives.

    nice python benchmarks/clip_filter.py [--out DIR] [--pool N] [--wrong 0.3] [--steps 300]

1. Generates the procedural demo data (clipjax.data.demo): a clean train split (seed 0) with its
   held-out test split, and a separate pool of N records (seed 1).
2. Corrupts the pool: a seeded `--wrong` share of its records get another record's caption (the
   captions of the chosen records moved along one random cycle, so none keeps its own); keys are
   32-hex-digit uids, so the filter also writes DataComp's uid array.
3. Trains the scorer: the demo config on the clean split for `--steps` steps, exported.
4. Filters the pool with it (`clipjax.data.filter`, `--top-fraction 1 - wrong`) and reports the
   share of wrong pairs removed and of good pairs kept (also per class-changing swaps: a moved
   caption may name the record's own colour and shape).
5. Trains the same config for `--steps` steps on the unfiltered pool and on the filtered pool,
   and reports each run's zero-shot top-1 on the clean held-out split.
Ends with one JSON line.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor()


def corrupt_pool(src_glob: str, out_dir: str, wrong: float, seed: int) -> dict:
    """Write the pool with a `wrong` share of captions moved; returns {uid: (wrong, changed
    class)}."""
    import tensorflow as tf

    from clipjax.data import schema, writer
    from clipjax.data.shards import list_shards

    examples = []
    for path in list_shards(src_glob):
        for rec in tf.data.TFRecordDataset(path).as_numpy_iterator():
            examples.append(tf.train.Example.FromString(rec))
    n = len(examples)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, int(round(wrong * n)), replace=False)
    cycle = rng.permutation(chosen)
    captions = [bytes(e.features.feature[schema.TEXT].bytes_list.value[0]) for e in examples]
    labels = [int(e.features.feature[schema.LABEL].int64_list.value[0]) for e in examples]
    truth = {}
    source_of = {int(dst): int(src) for src, dst in zip(cycle, np.roll(cycle, 1))}
    for i, e in enumerate(examples):
        uid = hashlib.md5(f"pool-{i}".encode()).hexdigest()
        e.features.feature[schema.KEY].bytes_list.value[:] = [uid.encode()]
        src = source_of.get(i, i)
        e.features.feature[schema.TEXT].bytes_list.value[:] = [captions[src]]
        truth[uid] = (src != i, labels[src] != labels[i])
    parts = [[e.SerializeToString() for e in examples[s : s + 1000]] for s in range(0, n, 1000)]
    writer.write_record_shards(
        parts, out_dir, source={"kind": "corrupted demo pool", "wrong": wrong}, prefix="pool"
    )
    return truth


def train(data_dir: str, train_glob: str, steps: int, workdir: str, export: str = "") -> dict:
    """The demo config on `train_glob` for `steps` steps; the end-of-training eval metrics."""
    import shutil

    from clipjax.demo import get_config
    from clipjax.train.loop import train as run

    c = get_config(f"data={data_dir}")
    c.data.train = train_glob
    c.num_steps = steps
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 2)
    c.checkpoint.every_steps = steps
    c.log_every = max(1, steps // 4)
    c.eval.retrieval.shards = ""
    c.export.dir = export
    shutil.rmtree(workdir, ignore_errors=True)
    t = time.perf_counter()
    result = run(c, workdir)
    return {**result.eval_metrics, "seconds": round(time.perf_counter() - t, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/clip_filter_bench")
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument("--clean", type=int, default=4000)
    p.add_argument("--wrong", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()

    from clipjax.data import use_pooled_tf_allocator

    use_pooled_tf_allocator()
    from clipjax.data import filter as filter_lib
    from clipjax.data.demo import make_demo_dataset

    t0 = time.perf_counter()
    clean = make_demo_dataset(os.path.join(args.out, "clean"), n_train=args.clean, n_test=600)
    src = make_demo_dataset(os.path.join(args.out, "poolsrc"), n_train=args.pool, n_test=1, seed=1)
    pool_dir = os.path.join(args.out, "pool")
    truth = corrupt_pool(src.train, pool_dir, args.wrong, seed=0)
    pool_glob = os.path.join(pool_dir, "*.tfrecord")
    print(f"pool: {len(truth)} records, {sum(w for w, _ in truth.values())} wrong captions")

    data_dir = os.path.join(args.out, "clean")
    scorer_dir = os.path.join(args.out, "scorer")
    scorer = train(
        data_dir, clean.train, args.steps, os.path.join(args.out, "w_scorer"), scorer_dir
    )
    print(f"scorer: zero-shot top-1 {scorer['zeroshot/top1']:.3f} ({scorer['seconds']} s)")

    fdir = os.path.join(args.out, "filtered")
    t = time.perf_counter()
    summary = filter_lib.run_filter(
        scorer_dir, pool_glob, fdir, top_fraction=1 - args.wrong, batch_size=200, progress=False
    )
    filter_s = time.perf_counter() - t
    kept = {
        r["key"] for r in map(json.loads, open(os.path.join(fdir, "scores.jsonl"))) if r["kept"]
    }
    uids = np.load(os.path.join(fdir, "kept_uids.npy"))

    def share(select, of_kept):
        keys = [k for k, v in truth.items() if select(v)]
        return sum((k in kept) == of_kept for k in keys) / max(1, len(keys))

    figures = {
        "wrong_removed": share(lambda v: v[0], False),
        "wrong_other_class_removed": share(lambda v: v[1], False),
        "wrong_same_class_removed": share(lambda v: v[0] and not v[1], False),
        "good_kept": share(lambda v: not v[0], True),
        "kept": summary["kept"],
        "uids_in_npy": int(uids.size),
        "filter_seconds": round(filter_s, 1),
    }
    print(json.dumps(figures))

    runs = {}
    for name, glob in (
        ("unfiltered", pool_glob),
        ("filtered", os.path.join(fdir, "filtered-*.tfrecord")),
    ):
        runs[name] = train(data_dir, glob, args.steps, os.path.join(args.out, f"w_{name}"))
        print(
            f"{name}: zero-shot top-1 {runs[name]['zeroshot/top1']:.3f} ({runs[name]['seconds']} s)"
        )

    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "pool": len(truth),
        "wrong": args.wrong,
        "steps": args.steps,
        "scorer_zeroshot_top1": scorer["zeroshot/top1"],
        **figures,
        **{f"{k}_zeroshot_top1": v["zeroshot/top1"] for k, v in runs.items()},
        **{f"{k}_zeroshot_top5": v["zeroshot/top5"] for k, v in runs.items()},
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
