"""Tokenizer throughput: clipjax.tokenize vs OpenAI's reference tokenizer, same captions, same run.

    python benchmarks/tokenizer.py [--quick] [--num N]

Captions are ~10 words drawn with a Zipf law from the English words of the CLIP vocabulary
(capitalised, with punctuation), plus a non-ASCII set that takes the full-cleaning path. The
process is pinned to one CPU core. `--quick` (< 1 min) ends with one JSON line.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import sys
import time

import numpy as np

from clipjax.data import tokenizer as tok


def load_reference():
    spec = importlib.util.find_spec("clip")
    if spec is None:
        sys.exit("the reference tokenizer needs clip-anytorch (installed by `make install`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "simple_tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def reference_tokenize(reference, texts, context_length=77):
    """OpenAI's clip.tokenize(..., truncate=True) minus the torch tensor: numpy int32 rows."""
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
        ids = [tok.SOT_ID] + reference.encode(text) + [tok.EOT_ID]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = tok.EOT_ID
        out[row, : len(ids)] = ids
    return out


def make_captions(n, seed, non_ascii=False):
    words = sorted(
        w[:-4]
        for w in tok.default_tokenizer().encoder
        if w.endswith("</w>") and w[:-4].isalpha() and w[:-4].isascii() and len(w) > 5
    )
    rng = random.Random(seed)
    cum_weights = np.cumsum([1.0 / (rank + 10) for rank in range(len(words))]).tolist()  # Zipf
    extras = ["café", "naïve", "日本", "😀", "über", "señor", "Ελλάδα", "москва"]
    captions = []
    for _ in range(n):
        ws = rng.choices(words, cum_weights=cum_weights, k=rng.randint(8, 12))
        if non_ascii:
            ws[rng.randrange(len(ws))] = rng.choice(extras)
        if rng.random() < 0.3:
            ws[rng.randrange(len(ws))] += ","
        captions.append(" ".join(ws).capitalize() + rng.choice([".", "", "!"]))
    return captions


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown cpu"


def rate(fn, texts, repeats, count=None):
    """Best of `repeats` runs: (captions per wall second, captions per CPU second of this process).

    The CPU-time figure is the one that does not depend on other load on a shared machine.
    """
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn(texts)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    count = len(texts) if count is None else count
    return count / best_wall, count / best_cpu


def drain(dataset):
    for _ in dataset:
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (< 1 min), JSON line last")
    parser.add_argument("--num", type=int, default=None, help="captions per set")
    args = parser.parse_args()
    n = args.num or (10_000 if args.quick else 100_000)
    n_ref = max(n // 10, 1000)
    repeats = 3 if args.quick else 5
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    print(
        f"machine: {platform.machine()} {cpu_name()}, "
        f"{os.cpu_count()} cores (pinned to 1), python {platform.python_version()}"
    )
    print(f"command: python {' '.join(sys.argv)}")
    print(f"date: {datetime.date.today()}")

    reference = load_reference()
    plain = make_captions(n, seed=0)
    mixed = make_captions(n, seed=1, non_ascii=True)
    mean_words = np.mean([len(c.split()) for c in plain])
    print(f"{n} captions per set, {mean_words:.1f} words each on average; reference on {n_ref}")

    # Same ids first: a benchmark of a wrong tokenizer would be meaningless.
    for texts in (plain[:n_ref], mixed[:n_ref]):
        if not np.array_equal(tok.tokenize(texts), reference_tokenize(reference, texts)):
            sys.exit("clipjax ids differ from the reference ids")

    cold = tok.Tokenizer()  # empty caches: every distinct word and chunk is new
    results = {
        "clipjax_ascii": rate(tok.tokenize, plain, repeats),
        "clipjax_ascii_cold_cache": rate(cold, plain, 1),
        "clipjax_non_ascii": rate(tok.tokenize, mixed, repeats),
        "reference_ascii": rate(lambda t: reference_tokenize(reference, t), plain[:n_ref], repeats),
        "reference_non_ascii": rate(
            lambda t: reference_tokenize(reference, t), mixed[:n_ref], repeats
        ),
    }
    try:
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices(plain).batch(256).map(tok.tokenize_tf)
        drain(dataset.take(2))
        results["clipjax_tf_data_batch256"] = rate(drain, dataset.prefetch(4), 1, count=n)
    except ImportError:
        pass

    print(f"{'captions/s':45s} {'wall':>10s} {'cpu':>10s}")
    for key, (wall, cpu) in results.items():
        print(f"{key:45s} {wall:10,.0f} {cpu:10,.0f}")
    for kind in ("ascii", "non_ascii"):
        ours, theirs = results[f"clipjax_{kind}"], results[f"reference_{kind}"]
        print(
            f"speed-up over the reference, {kind}: {ours[0] / theirs[0]:.1f}x wall, "
            f"{ours[1] / theirs[1]:.1f}x cpu"
        )
    if args.quick:
        summary = {"benchmark": "tokenizer", "num_captions": n}
        for key, (wall, cpu) in results.items():
            summary[f"{key}_captions_per_s"] = round(wall)
            summary[f"{key}_captions_per_cpu_s"] = round(cpu)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
