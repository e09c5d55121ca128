"""Class-sorted shards vs false-negative-aware losses: zero-shot top-1 after the same training.

    python benchmarks/clustered.py [--dataset demo|fashion|all] [--steps N] [--runs A,B,...]
                                   [--fashion-mnist DIR] [--workdir DIR] [--out results.json]
    python benchmarks/clustered.py --quick        # tiny sizes, a few steps; ends with one JSON line

Shards written in class order (class folders, sorted CSVs, per-query scrapes) give batches of one
or two classes: the other pairs of a batch are then mostly true matches that plain InfoNCE pushes
apart. This script makes such data itself, from two sources, each written twice with the
project's shard writer — once in class order, once shuffled — with the same records:

  demo     the procedural shapes (`clipjax.data.demo`: 12 colour x shape classes, captions in
           eight wordings), n per class, generated and sorted by label;
  fashion  Fashion-MNIST (10 clothing classes, 28x28 grey), read from the IDX files of a local
           copy (default: the directory of Debian's `dataset-fashion-mnist` package); captions
           are the class name in one of several templates, so identical captions are only part
           of the same-label pairs.

The class-sorted copy is one shard, so the pipeline's file interleaving cannot mix classes, and
every run reads with a shuffle buffer smaller than a class, so most batches hold one or two
classes. The held-out test split (class-balanced) is the same for both copies.

Each run of the table `RUNS` trains a small CLIP with the real trainer
(`clipjax.train.loop.train`), the same steps and seed for every run of a dataset, and reports
the built-in end-of-training zero-shot top-1 on the test split, next to the batch homogeneity of
its training data, measured on the first `HOMOGENEITY_BATCHES` batches of the real
`TrainPipeline` with the run's settings: the share of off-diagonal pairs of a batch with equal
labels (shuffled: about 1/classes) and with identical caption tokens. Runs whose loss keys this
clipjax does not have are listed as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gzip
import inspect
import io
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clipjax.demo import DEMO_MODEL, QUICK_MODEL  # noqa: E402

FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_CLASSNAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Training captions: several wordings of the class name, so that identical captions are only a
# part of the same-label pairs (as in real captions of one category).
FASHION_CAPTIONS = (
    "a photo of a {}.",
    "a {} on a plain background.",
    "a picture of a {}.",
    "a grayscale photo of a {}.",
    "a {}.",
    "a product photo of a {}.",
    "a low resolution image of a {}.",
    "this is a {}.",
)
FASHION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
HOMOGENEITY_BATCHES = 20
SEED = 0


@dataclasses.dataclass(frozen=True)
class Run:
    """One row: which copy of the data, which config.loss overrides. A value 'ALL' for
    queue_size means the whole train set (rounded up to a batch multiple)."""

    name: str
    data: str  # 'sorted' | 'shuffled'
    loss: dict
    note: str = ""
    read_windows: int = 1  # config.data.read_windows

    @property
    def reading(self) -> str:
        """The data copy and how it is read (the key of its homogeneity figures)."""
        return self.data if self.read_windows == 1 else f"{self.data}, {self.read_windows} windows"


QUEUE_CLASSES = 4096  # spans several classes of sorted data (4 demo classes of 1000)
_ALL = "ALL"  # queue_size: the whole train set, so the queue spans every class
RUNS = (
    Run("shuffled/plain", "shuffled", {}, "baseline: InfoNCE on mixed batches"),
    Run("sorted/plain", "sorted", {}, "the failure"),
    Run("sorted/queue", "sorted", {"queue_size": QUEUE_CLASSES}, "extra queue negatives"),
    Run("sorted/caption", "sorted", {"positives": "caption"}, "identical captions positive"),
    Run("sorted/label", "sorted", {"positives": "label"}, "equal labels positive"),
    Run("sorted/dup", "sorted", {"duplicate_threshold": 0.9}, "EMA near-duplicates left out"),
    Run(
        "sorted/queue-only+label",
        "sorted",
        {"in_batch_negatives": False, "positives": "label", "queue_size": _ALL},
        "MoCo-style negatives, labels positive",
    ),
    Run(
        "sorted/queue-only+auto+dup",
        "sorted",
        {
            "in_batch_negatives": False,
            "positives": "auto",
            "duplicate_threshold": 0.9,
            "queue_size": _ALL,
        },
        "MoCo-style, auto positives, EMA duplicates left out",
    ),
    Run(
        "sorted/queue+auto",
        "sorted",
        {"positives": "auto", "queue_size": _ALL},
        "in-batch + queue negatives, auto positives",
    ),
    Run(
        "shuffled/queue-only+auto+dup",
        "shuffled",
        {
            "in_batch_negatives": False,
            "positives": "auto",
            "duplicate_threshold": 0.9,
            "queue_size": _ALL,
        },
        "candidate on mixed batches",
    ),
    Run(
        "shuffled/queue+auto",
        "shuffled",
        {"positives": "auto", "queue_size": _ALL},
        "candidate on mixed batches",
    ),
    # Variations: a faster EMA (the default 0.995 still weighs the initial weights by 0.995^250
    # = 0.29 after 250 steps, so queue entries and duplicate tests come from a near-init model).
    Run(
        "sorted/queue+auto@m0.9",
        "sorted",
        {"positives": "auto", "queue_size": _ALL, "momentum": 0.9},
        "fast EMA",
    ),
    Run(
        "sorted/queue-only+label@m0.9",
        "sorted",
        {"in_batch_negatives": False, "positives": "label", "queue_size": _ALL, "momentum": 0.9},
        "MoCo-style with a fast EMA",
    ),
    Run(
        "sorted/queue-only+label@m0.99",
        "sorted",
        {"in_batch_negatives": False, "positives": "label", "queue_size": _ALL, "momentum": 0.99},
        "MoCo-style, EMA lag ~100 steps",
    ),
    Run(
        "sorted/queue-only+label@m0.999",
        "sorted",
        {"in_batch_negatives": False, "positives": "label", "queue_size": _ALL, "momentum": 0.999},
        "MoCo-style, keys from a near-frozen encoder (no drift between queue and batch keys)",
    ),
    Run(
        "shuffled/queue-only+label@m0.99",
        "shuffled",
        {"in_batch_negatives": False, "positives": "label", "queue_size": _ALL, "momentum": 0.99},
        "MoCo-style on mixed batches: does the queue-only loss learn at all",
    ),
    Run(
        "shuffled/queue+auto@m0.9",
        "shuffled",
        {"positives": "auto", "queue_size": _ALL, "momentum": 0.9},
        "fast EMA, mixed batches",
    ),
    # Reading the sorted shard at 16 places at once (no re-writing), alone and with label/caption
    # positives: the recommended setting for shards that are already sorted.
    Run("sorted/windows16", "sorted", {}, "data.read_windows=16", read_windows=16),
    Run(
        "sorted/windows16+auto",
        "sorted",
        {"positives": "auto"},
        "data.read_windows=16 + auto positives",
        read_windows=16,
    ),
    Run(
        "shuffled/windows16+auto",
        "shuffled",
        {"positives": "auto"},
        "the recommended setting on mixed batches",
        read_windows=16,
    ),
)


# --quick without --runs: one run per code path (plain, queue, the false-negative-aware options).
QUICK_RUNS = ("shuffled/plain", "sorted/queue", "sorted/queue-only+auto+dup")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes of one dataset's runs."""

    dataset: str
    per_class: int  # train records per class
    test_per_class: int
    steps: int
    batch: int
    shuffle_buffer: int
    overrides: dict  # model.overrides
    quick: bool = False


def make_setup(dataset: str, steps: int | None, quick: bool) -> Setup:
    if quick:
        return Setup(
            dataset,
            per_class=24,
            test_per_class=4,
            steps=steps or 4,
            batch=16,
            shuffle_buffer=8,
            overrides=QUICK_MODEL,
            quick=True,
        )
    return Setup(
        dataset,
        per_class=1000,
        test_per_class=100,
        steps=steps or 250,
        batch=128,
        shuffle_buffer=256,
        overrides=DEMO_MODEL,
    )


# ---------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
    sorted: str  # shard globs
    shuffled: str
    test: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    n_train: int


def _write(items: list, out_dir: str, source: dict, classnames, shard_size: int) -> None:
    """Write `items` in the given order (a writer that shuffles by default is told not to)."""
    from clipjax.data import writer

    kwargs = {}
    if "shuffle_seed" in inspect.signature(writer.write_shards).parameters:
        kwargs["shuffle_seed"] = None  # keep the order: the class order is the point here
    writer.write_shards(
        items,
        out_dir,
        source=source,
        shard_size=shard_size,
        prefix="data",
        classnames=list(classnames),
        total=len(items),
        progress=False,
        **kwargs,
    )


def _write_variants(
    root: str, train: list, test: list, classnames, source: dict
) -> tuple[dict, int]:
    """Train items sorted by label (one shard) and shuffled (one shard); the test items."""
    order = sorted(range(len(train)), key=lambda i: (train[i].label, i))
    in_class_order = [train[i] for i in order]
    perm = np.random.default_rng(SEED).permutation(len(train))
    shuffled = [train[i] for i in perm]
    n = len(train)
    paths = {}
    for name, items, shard in (
        ("sorted", in_class_order, n),
        ("shuffled", shuffled, n),
        ("test", test, 1000),
    ):
        out = os.path.join(root, name)
        _write(items, out, {**source, "variant": name, "n": len(items)}, classnames, shard)
        paths[name] = os.path.join(out, "*.tfrecord")
    return paths, n


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def demo_data(root: str, setup: Setup) -> Data:
    """The demo shapes: `per_class` train items per class (drawn until each class has them,
    then sorted by label) and a class-balanced test split, images at the model's size."""
    from clipjax.data import demo
    from clipjax.data.writer import SourceItem

    size = setup.overrides.get("image_size", 32)

    def balanced(split_id: int, per_class: int) -> list:
        items, counts, i = [], np.zeros(len(demo.DEMO_CLASSNAMES), int), 0
        while counts.min() < per_class:
            rng = np.random.default_rng([SEED, split_id, i])
            ex = demo.sample_example(rng)
            if counts[ex["label"]] < per_class:
                counts[ex["label"]] += 1

                def read(ex=ex, rng=rng) -> bytes:
                    return _png(demo.draw_example(ex, rng, size))

                items.append(
                    SourceItem(
                        key=f"{split_id}/{i:07d}",
                        origin=f"demo[{split_id},{i}]",
                        caption=ex["caption"],
                        read=read,
                        label=ex["label"],
                    )
                )
            i += 1
        return items

    source = {
        "kind": "clustered-demo",
        "per_class": setup.per_class,
        "test_per_class": setup.test_per_class,
        "image_size": size,
        "seed": SEED,
    }
    paths, n = _write_variants(
        root,
        balanced(0, setup.per_class),
        balanced(1, setup.test_per_class),
        demo.DEMO_CLASSNAMES,
        source,
    )
    return Data(
        paths["sorted"],
        paths["shuffled"],
        paths["test"],
        demo.DEMO_CLASSNAMES,
        demo.DEMO_TEMPLATES,
        n,
    )


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ValueError(f"{path}: {body.size} values for shape {shape}")
    return body.reshape(shape)


def _fashion_file(directory: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise FileNotFoundError(
        f"--fashion-mnist {directory}: no {stem}[.gz]; expected the four IDX files of "
        "Fashion-MNIST (e.g. Debian's dataset-fashion-mnist package)"
    )


def fashion_data(root: str, setup: Setup, directory: str) -> Data:
    """Fashion-MNIST: the first `per_class` train images of each class and the first
    `test_per_class` of each class of the official test split, captioned from templates."""
    from clipjax.data.writer import SourceItem

    splits = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images = read_idx(_fashion_file(directory, f"{stem}-images-idx3-ubyte"))
        labels = read_idx(_fashion_file(directory, f"{stem}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"--fashion-mnist {directory}: {split} images {images.shape} and "
                f"labels {labels.shape} do not match"
            )
        splits[split] = images, labels
    rng = np.random.default_rng(SEED)

    def take(split: str, per_class: int) -> list:
        images, labels = splits[split]
        items = []
        for c, name in enumerate(FASHION_CLASSNAMES):
            idx = np.flatnonzero(labels == c)[:per_class]
            if len(idx) < per_class:
                raise ValueError(
                    f"Fashion-MNIST {split}: class {name} has {len(idx)} images, "
                    f"fewer than {per_class}"
                )
            for i in idx:
                caption = FASHION_CAPTIONS[int(rng.integers(len(FASHION_CAPTIONS)))].format(name)
                items.append(
                    SourceItem(
                        key=f"{split}/{i:05d}",
                        origin=f"fashion {split}[{i}]",
                        caption=caption,
                        read=lambda a=images[i]: _png(a),
                        label=c,
                    )
                )
        items.sort(key=lambda it: it.key)  # the file's own order, not grouped by class
        return items

    source = {
        "kind": "clustered-fashion-mnist",
        "per_class": setup.per_class,
        "test_per_class": setup.test_per_class,
        "seed": SEED,
    }
    paths, n = _write_variants(
        root,
        take("train", setup.per_class),
        take("test", setup.test_per_class),
        FASHION_CLASSNAMES,
        source,
    )
    return Data(
        paths["sorted"], paths["shuffled"], paths["test"], FASHION_CLASSNAMES, FASHION_TEMPLATES, n
    )


# ---------------------------------------------------------------------------------------------
# Homogeneity and training
# ---------------------------------------------------------------------------------------------


def same_pair_share(keys: np.ndarray) -> float:
    """Share of ordered off-diagonal pairs (i != j) of a batch whose rows of `keys` are equal."""
    keys = keys.reshape(len(keys), -1)
    _, counts = np.unique(keys, axis=0, return_counts=True)
    b = len(keys)
    return float((counts * (counts - 1)).sum() / (b * (b - 1)))


def homogeneity(
    shards: str, setup: Setup, image_size: int, context_length: int, read_windows: int = 1
) -> dict:
    """Mean same-label / identical-caption pair shares over the first training batches, read
    through the real TrainPipeline with the settings the trainer uses."""
    from clipjax.data.train_pipeline import TrainPipeline

    pipe = TrainPipeline(
        shards,
        global_batch=setup.batch,
        image_size=image_size,
        context_length=context_length,
        seed=SEED,
        shuffle_buffer=setup.shuffle_buffer,
        crop_scale=(0.8, 1.0),
        read_windows=read_windows,
        process_index=0,
        process_count=1,
    )
    labels, captions, classes = [], [], []
    with contextlib.closing(iter(pipe)) as batches:  # closed: the pipeline's threads stop
        for i, (batch, _) in enumerate(batches):
            labels.append(same_pair_share(batch["label"]))
            captions.append(same_pair_share(batch["text"]))
            classes.append(len(np.unique(batch["label"])))
            if i + 1 >= HOMOGENEITY_BATCHES:
                break
    return {
        "same_label": float(np.mean(labels)),
        "same_caption": float(np.mean(captions)),
        "classes_per_batch": float(np.mean(classes)),
    }


def resolve_loss(run: Run, n_train: int, batch: int) -> dict:
    loss = dict(run.loss)
    if loss.get("queue_size") == _ALL:
        loss["queue_size"] = -(-n_train // batch) * batch
    return loss


def missing_loss_keys(loss: dict) -> list[str]:
    from clipjax.losses import LOSS_DEFAULTS

    return sorted(set(loss) - set(LOSS_DEFAULTS))


def train_config(setup: Setup, data: Data, shards: str, loss: dict, read_windows: int = 1):
    from clipjax.train.config import base_config

    c = base_config()
    c.seed = SEED
    c.model.preset = "tiny"
    c.model.overrides.update(setup.overrides)
    c.data.train = shards
    c.data.shuffle_buffer = setup.shuffle_buffer
    c.data.read_windows = read_windows
    c.data.crop_scale = (0.8, 1.0)
    c.num_steps = setup.steps
    c.batch_size = setup.batch
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = max(1, min(30, setup.steps // 10))
    c.optimizer.weight_decay = 0.1
    c.log_every = max(1, setup.steps // 4)
    c.tensorboard = False
    c.checkpoint.every_steps = 10 * setup.steps  # only the final one
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    c.eval.zeroshot.shards = data.test
    c.eval.zeroshot.classnames = ",".join(data.classnames)
    c.eval.zeroshot.templates = "|".join(data.templates)
    c.eval.batch_size = 200 if not setup.quick else 16
    if setup.quick:
        c.compiler_options = {"xla_backend_optimization_level": 0}
    for k, v in loss.items():
        c.loss[k] = v
    return c


def run_one(run: Run, setup: Setup, data: Data, workdir: str) -> dict:
    from clipjax.train.loop import train

    loss = resolve_loss(run, data.n_train, setup.batch)
    row = {
        "run": run.name,
        "dataset": setup.dataset,
        "data": run.data,
        "reading": run.reading,
        "loss": loss,
        "note": run.note,
        "steps": setup.steps,
        "batch": setup.batch,
    }
    missing = missing_loss_keys(loss)
    if missing:
        row["skipped"] = f"this clipjax has no loss key(s) {missing}"
        return row
    shards = data.sorted if run.data == "sorted" else data.shuffled
    config = train_config(setup, data, shards, loss, run.read_windows)
    run_dir = os.path.join(workdir, "runs", setup.dataset, run.name.replace("/", "__"))
    if os.path.exists(run_dir):  # a fresh run, never a resume of an older one
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    try:
        result = train(config, run_dir)
    except Exception as e:  # one broken option must not cost the rest of the table
        logging.getLogger(__name__).exception("run %s failed", run.name)
        row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        return row
    if result.status != "completed":  # SIGTERM: the trainer saved and stopped; so do we
        raise SystemExit(f"{run.name}: training stopped at step {result.step} ({result.status})")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    ev = result.eval_metrics
    row["top1"] = ev.get("zeroshot/top1")
    row["top5"] = ev.get("zeroshot/top5")
    row["final_loss"] = result.final_metrics.get("loss")
    row["trainer_same_label"] = result.final_metrics.get("batch/same_label")  # last batch
    return row


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _fmt(v, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def table(rows: list[dict], homog: dict) -> str:
    lines = [
        "| run | loss overrides | zero-shot top-1 % | top-5 % | same-label pairs | "
        "same-caption pairs | final loss | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h = homog.get(r["reading"], {})
        loss = ", ".join(f"{k}={v}" for k, v in r["loss"].items()) or "(defaults)"
        if "skipped" in r or "failed" in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['failed']}"
            lines.append(f"| {r['run']} | {loss} | {why} | | | | | |")
            continue
        lines.append(
            f"| {r['run']} | {loss} | {_fmt(r['top1'])} | {_fmt(r['top5'])} | "
            f"{_fmt(h.get('same_label'), False)} | {_fmt(h.get('same_caption'), False)} "
            f"| {_fmt(r['final_loss'], False)} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("demo", "fashion", "all"), default="all")
    p.add_argument("--steps", type=int, default=None, help="train steps per run (default 250)")
    p.add_argument("--runs", default="", help="comma-separated run names (default: all)")
    p.add_argument(
        "--fashion-mnist",
        default=FASHION_DEFAULT_DIR,
        help="directory with Fashion-MNIST's IDX files",
    )
    p.add_argument(
        "--workdir",
        default="",
        help="data and run directories (default: a temp "
        "directory); data already written there is reused",
    )
    p.add_argument("--out", default="", help="write all rows and figures as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke check")
    p.add_argument("--verbose", action="store_true", help="the trainer's log and progress lines")
    a = p.parse_args(argv)

    known = {r.name: r for r in RUNS}
    names = [n.strip() for n in a.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--runs: unknown run(s) {unknown}; expected names from {list(known)}")
    if not names:
        names = list(QUICK_RUNS) if a.quick else list(known)
    runs = [known[n] for n in names]
    if a.steps is not None and a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    datasets = ["demo", "fashion"] if a.dataset == "all" else [a.dataset]
    if "fashion" in datasets:
        for stem in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            try:
                _fashion_file(a.fashion_mnist, stem)
            except FileNotFoundError as e:
                p.error(str(e))

    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not a.verbose:
        logging.getLogger("absl").setLevel(logging.ERROR)
    import jax

    workdir = a.workdir or tempfile.mkdtemp(prefix="clustered-")
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "datasets": {},
    }
    for dataset in datasets:
        setup = make_setup(dataset, a.steps, a.quick)
        root = os.path.join(workdir, "data", dataset + ("-quick" if a.quick else ""))
        t0 = time.perf_counter()
        data = (
            demo_data(root, setup)
            if dataset == "demo"
            else fashion_data(root, setup, a.fashion_mnist)
        )
        print(
            f"[{dataset}] data: {data.n_train} train records, {len(data.classnames)} classes, "
            f"written/found in {time.perf_counter() - t0:.0f}s under {root}",
            flush=True,
        )
        from clipjax.train.config import base_config, model_config

        probe = base_config()
        probe.model.overrides.update(setup.overrides)
        mcfg = model_config(probe)
        readings = {r.reading: r for r in runs}
        homog = {
            key: homogeneity(
                getattr(data, r.data), setup, mcfg.image_size, mcfg.context_length, r.read_windows
            )
            for key, r in readings.items()
        }
        for v, h in homog.items():
            print(
                f"[{dataset}] {v}: same-label pairs {h['same_label']:.3f} (1/classes = "
                f"{1 / len(data.classnames):.3f}), identical-caption pairs "
                f"{h['same_caption']:.3f}, classes per batch {h['classes_per_batch']:.1f} "
                f"(first {HOMOGENEITY_BATCHES} batches of {setup.batch})",
                flush=True,
            )
        rows = []
        for run in runs:
            row = run_one(run, setup, data, workdir)
            rows.append(row)
            if "skipped" in row or "failed" in row:
                print(f"[{dataset}] {run.name}: {row.get('skipped') or row['failed']}", flush=True)
            else:
                print(
                    f"[{dataset}] {run.name}: top-1 {_fmt(row['top1'])}%, top-5 "
                    f"{_fmt(row['top5'])}%, final loss {_fmt(row['final_loss'], False)}, "
                    f"{row['seconds']:.0f}s",
                    flush=True,
                )
            if a.out:  # partial results survive an interrupted table
                report["datasets"][dataset] = {
                    "setup": dataclasses.asdict(setup),
                    "homogeneity": homog,
                    "rows": rows,
                }
                _dump(a.out, report)
        report["datasets"][dataset] = {
            "setup": dataclasses.asdict(setup),
            "homogeneity": homog,
            "rows": rows,
        }
        print(
            f"\n{dataset}: {setup.steps} steps of {setup.batch}, shuffle buffer "
            f"{setup.shuffle_buffer}, {len(data.classnames)} classes x {setup.per_class} "
            f"train / {setup.test_per_class} test\n" + table(rows, homog) + "\n",
            flush=True,
        )
    if a.out:
        _dump(a.out, report)
    if a.quick:
        summary = {
            d: {
                "homogeneity": v["homogeneity"],
                "top1": {r["run"]: r.get("top1") for r in v["rows"]},
            }
            for d, v in report["datasets"].items()
        }
        print(json.dumps(summary))


def _dump(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
