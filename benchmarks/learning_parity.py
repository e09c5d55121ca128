"""Learning parity with open_clip: the same model, data and recipe trained by both, several seeds.

    python benchmarks/learning_parity.py --bench-python VENV/bin/python [--seeds 0,1,2]
        [--steps 1000] [--batch 128] [--per-class 1000] [--test-per-class 100]
        [--fashion-mnist DIR] [--workdir DIR] [--out results.json]
    python benchmarks/learning_parity.py --bench-python VENV/bin/python --quick

`--quick`: tiny sizes and one seed, a smoke run that ends with one JSON line (the summary).

Data: Fashion-MNIST (real photographs of clothing, 28x28 grey; default: Debian's
`dataset-fashion-mnist` package), the first `per_class` train images of each class, captioned with
the class name in one of several wordings (benchmarks/clustered.py's captions), written once in a
seeded random order as shards for clipjax and as arrays for open_clip, with the same token ids; the
held-out test split (`test_per_class` per class of the official test set) is preprocessed once
(bicubic resize to the model's size, CLIP normalisation) and embedded by both sides.

clipjax trains with its real trainer (`clipjax.train.loop.train`: its input pipeline, random
resized crop, InfoNCE, AdamW with masked decay, warm-up + cosine, clipping); open_clip with its
`CLIP` and `ClipLoss` under the same recipe (benchmarks/openclip_parity.py, run with
`--bench-python`, an environment with the `bench` extra). Both sides: the `tiny` preset with the
demo's narrower widths (benchmarks/openclip_step.py maps it onto open_clip's config), the same
steps, batch, learning rate, warm-up, weight decay and crop scale; seed s sets init, data order
and augmentation on each side (not the same draws: the frameworks differ).

Reported per run and as mean and sample standard deviation per side: zero-shot top-1 on the test
split (the class prompts of benchmarks/clustered.py, averaged) and class-level text->image
precision@1/@10 (the share of the top-k images of the caption's class: captions name a class,
so the paired image is one of many right answers), and the last training loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from clustered import (  # noqa: E402
    FASHION_CAPTIONS,
    FASHION_CLASSNAMES,
    FASHION_DEFAULT_DIR,
    FASHION_TEMPLATES,
    _fashion_file,
    _png,
    _write,
    read_idx,
)

from clipjax.demo import DEMO_MODEL  # noqa: E402

RESULT_TAG = "RESULT "
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float
    crop_scale: tuple[float, float]
    shuffle_buffer: int


def model_overrides() -> dict:
    return dict(DEMO_MODEL)


def prepare(root: str, directory: str, per_class: int, test_per_class: int, cfg) -> dict:
    """Write the train shards (clipjax) and arrays.npz (open_clip, and the shared test inputs)."""
    from PIL import Image

    import clipjax
    from clipjax.data.writer import SourceItem

    rng = np.random.default_rng(0)
    arrays = {}
    for split, stem, n in (("train", "train", per_class), ("test", "t10k", test_per_class)):
        images = read_idx(_fashion_file(directory, f"{stem}-images-idx3-ubyte"))
        labels = read_idx(_fashion_file(directory, f"{stem}-labels-idx1-ubyte"))
        idx = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(10)])
        if len(idx) != 10 * n:
            raise ValueError(f"Fashion-MNIST {split}: fewer than {n} images of some class")
        idx = idx[rng.permutation(len(idx))]  # one seeded order, shared by both sides
        captions = [
            FASHION_CAPTIONS[int(rng.integers(len(FASHION_CAPTIONS)))].format(
                FASHION_CLASSNAMES[int(labels[i])]
            )
            for i in idx
        ]
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx].astype(np.int32)
        arrays[f"{split}_tokens"] = clipjax.tokenize(captions, cfg.context_length)
        if split == "train":
            items = [
                SourceItem(
                    key=f"train/{i:05d}",
                    origin=f"fashion train[{i}]",
                    caption=c,
                    read=lambda a=images[i]: _png(a),
                    label=int(labels[i]),
                )
                for i, c in zip(idx, captions)
            ]
            source = {"kind": "learning-parity-fashion-mnist", "per_class": n}
            _write(items, os.path.join(root, "train"), source, FASHION_CLASSNAMES, 1000)
    size = cfg.image_size
    test = [
        np.asarray(Image.fromarray(a).convert("RGB").resize((size, size), Image.BICUBIC))
        for a in arrays["test_images"]
    ]
    arrays["test_inputs"] = ((np.stack(test).astype(np.float32) / 255.0) - MEAN) / STD
    prompts = [t.format(name) for name in FASHION_CLASSNAMES for t in FASHION_TEMPLATES]
    arrays["prompt_tokens"] = clipjax.tokenize(prompts, cfg.context_length)
    path = os.path.join(root, "arrays.npz")
    np.savez(path, **arrays)
    return {"shards": os.path.join(root, "train", "*.tfrecord"), "arrays": path}


def train_config(shards: str, recipe: Recipe, seed: int):
    from clipjax.train.config import base_config

    c = base_config()
    c.seed = seed
    c.model.preset = "tiny"
    c.model.overrides.update(model_overrides())
    c.data.train = shards
    c.data.shuffle_buffer = recipe.shuffle_buffer
    c.data.crop_scale = recipe.crop_scale
    c.num_steps = recipe.steps
    c.batch_size = recipe.batch
    c.optimizer.lr = recipe.lr
    c.optimizer.warmup_steps = recipe.warmup
    c.optimizer.weight_decay = recipe.weight_decay
    c.log_every = recipe.steps
    c.tensorboard = False
    c.checkpoint.every_steps = 0  # the final one only
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    c.eval.at_end = False
    return c


def run_clipjax(paths: dict, recipe: Recipe, seed: int, workdir: str) -> tuple[dict, dict]:
    """Train with clipjax's trainer; (info, embeddings of the test images/captions/prompts)."""
    import jax

    import clipjax
    from clipjax.train.loop import train

    run_dir = os.path.join(workdir, f"clipjax-{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    result = train(train_config(paths["shards"], recipe, seed), run_dir)
    seconds = time.perf_counter() - t0
    model, variables, _ = clipjax.load(run_dir)
    data = np.load(paths["arrays"])
    image = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))
    text = jax.jit(lambda v, t: model.apply(v, t, method="encode_text"))
    emb = {
        "image": np.asarray(image(variables, data["test_inputs"])),
        "text": np.asarray(text(variables, data["test_tokens"])),
        "prompts": np.asarray(text(variables, data["prompt_tokens"])),
    }
    info = {
        "seconds": round(seconds, 1),
        "loss": result.final_metrics.get("loss"),
        "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables))),
    }
    return info, emb


def run_open_clip(
    python: str, paths: dict, recipe: Recipe, seed: int, cfg, workdir: str, threads: int
) -> tuple[dict, dict]:
    out = os.path.join(workdir, f"open_clip-{seed}.npz")
    spec = {
        "data": paths["arrays"],
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "steps": recipe.steps,
        "batch": recipe.batch,
        "lr": recipe.lr,
        "warmup": recipe.warmup,
        "weight_decay": recipe.weight_decay,
        "crop_scale": list(recipe.crop_scale),
        "threads": threads,
        "out": out,
    }
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(
        [python, os.path.join(REPO, "benchmarks", "openclip_parity.py"), json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"open_clip run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads(lines[-1][len(RESULT_TAG) :])
    with np.load(out) as f:
        emb = {k: f[k] for k in f.files}
    info = {
        "seconds": round(res["train_s"], 1),
        "loss": res["loss"][-1],
        "num_params": res["num_params"],
        "versions": res,
    }
    return info, emb


def figures(emb: dict, labels: np.ndarray) -> dict:
    """Zero-shot top-1 and class-level text->image precision@1/@10 (in %)."""

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    image, text = unit(emb["image"]), unit(emb["text"])
    prompts = unit(emb["prompts"]).reshape(len(FASHION_CLASSNAMES), len(FASHION_TEMPLATES), -1)
    classes = unit(prompts.mean(axis=1))
    top1 = float(np.mean(np.argmax(image @ classes.T, axis=1) == labels))
    ranked = np.argsort(-(text @ image.T), axis=1)
    right = labels[ranked] == labels[:, None]
    return {
        "zeroshot_top1": 100 * top1,
        "t2i_p@1": 100 * float(right[:, 0].mean()),
        "t2i_p@10": 100 * float(right[:, :10].mean()),
    }


def summary(rows: list[dict]) -> dict:
    out = {}
    for side in ("clipjax", "open_clip"):
        mine = [r for r in rows if r["side"] == side]
        for key in ("zeroshot_top1", "t2i_p@1", "t2i_p@10", "loss"):
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                out[f"{side}/{key}"] = {"mean": statistics.mean(values), "sd": sd, "n": len(values)}
    return out


def run_all(a, recipe: Recipe, cfg, seeds: list[int], workdir: str) -> list[dict]:
    """Every seed on each side; one row per run (printed as it ends)."""
    paths = prepare(workdir, a.fashion_mnist, a.per_class, a.test_per_class, cfg)
    labels = np.load(paths["arrays"])["test_labels"]
    rows = []
    for side in ("clipjax", "open_clip"):
        for seed in seeds:
            if side == "clipjax":
                info, emb = run_clipjax(paths, recipe, seed, workdir)
            else:
                info, emb = run_open_clip(
                    a.bench_python, paths, recipe, seed, cfg, workdir, a.threads
                )
            row = {"side": side, "seed": seed, **info, **figures(emb, labels)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "versions"}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-python", required=True, help="Python with the `bench` extra")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the open_clip side")
    p.add_argument("--fashion-mnist", default=FASHION_DEFAULT_DIR)
    p.add_argument(
        "--workdir", default=None, help="default: a temporary directory, removed at the end"
    )
    p.add_argument("--out", default=None, help="write the rows and summary as JSON here")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, seed 0")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.batch, a.warmup, a.per_class, a.test_per_class = "0", 4, 16, 1, 4, 2
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.warmup > a.steps or a.steps < 1 or a.batch > 10 * a.per_class:
        p.error("need 1 <= --warmup <= --steps and --batch <= 10 * --per-class")
    if not os.path.exists(a.bench_python):
        p.error(f"--bench-python {a.bench_python} does not exist")
    _fashion_file(a.fashion_mnist, "train-images-idx3-ubyte")  # a clear error before any work

    from clipjax.train.config import model_config

    recipe = Recipe(a.steps, a.batch, a.lr, a.warmup, 0.2, (0.9, 1.0), 10 * a.per_class)
    cfg = model_config(train_config("unused", recipe, 0))
    workdir = a.workdir or tempfile.mkdtemp(prefix="learning_parity_")
    try:
        rows = run_all(a, recipe, cfg, seeds, workdir)
    finally:
        if a.workdir is None:  # a temporary directory: nothing left behind
            shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "args": vars(a),
        "recipe": dataclasses.asdict(recipe),
        "model": dataclasses.asdict(cfg),
        "rows": rows,
        "summary": summary(rows),
    }
    for key, s in result["summary"].items():
        print(f"{key}: {s['mean']:.2f} +- {s['sd']:.2f} (n={s['n']})")
    if a.out:
        from clipjax.files import write_json

        write_json(a.out, result)
    if a.quick:
        print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
