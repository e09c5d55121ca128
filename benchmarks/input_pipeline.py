"""Input pipeline throughput: clipjax's tf.data TrainPipeline vs a PIL loop or open_clip's loader.

    python benchmarks/input_pipeline.py [--quick] [--images N] [--batch B]
    python benchmarks/input_pipeline.py --compare open_clip [--quick] [--batch B] [--repeats R]
    python benchmarks/input_pipeline.py --compare tar [--quick] [--batch B] [--repeats R]

Writes synthetic photo-like JPEGs (384x288, ~q90) into TFRecord shards with the project's writer,
then measures images/s of the full training path at 224px (read, parse, shuffle, decode, random
resized crop, resize, CLIP normalisation, tokenization, batching) with the process pinned to 1 and
to 2 CPU cores (tf.data private thread pool of that size). The baseline does the same work per
image with PIL in a Python loop (records pre-parsed, so it is *not* charged for TFRecord parsing;
PIL's bicubic resize of the crop box), in one process, and in a 2-process pool for 2 cores.
Each figure is the best of several alternating repeats (other load only ever slows a run down).
For scale it also estimates the most images/s a ViT-B/16 CLIP train step could consume on this
CPU: measured f32 matmul GFLOP/s divided by the model's training FLOPs per image (an upper bound,
as real steps run below peak matmul speed).
`--quick` (< 1 min) ends with one JSON line.

`--compare open_clip` instead measures images/s per CPU core against open_clip's own loader on the
same JPEG files: photo-like q90 JPEGs at 400x300 and 1024x768, written once into TFRecord shards
(the project's writer keeps the bytes) and as an image folder plus the tab-separated CSV that
open_clip's `CsvDataset` reads. open_clip: its ViT-B-32 train transform
(`open_clip.image_transform(224, is_train=True)`: RandomResizedCrop scale (0.9, 1), bicubic,
antialiased, CLIP normalisation) and tokenizer in its CsvDataset (PIL open, transform, tokenize)
under a torch DataLoader with 0 workers (1 core) and 2 workers (2 cores; torch runs each worker
with one thread). clipjax: TrainPipeline at 224 with a private thread pool of 1 and 2 threads on
1 and 2 cores. Rounds alternate between the loaders; each figure is the best of `--repeats`.
One table per image size, then one JSON line.

`--compare tar` measures the pipeline reading webdataset tars (img2dataset's default output, read
as they are) against reading TFRecord shards of the same samples: the same photo-like JPEGs and
captions in 4 TFRecord shards (the project's writer), 4 plain tars and 4 gzipped tars (members
KEY.jpg, KEY.txt, KEY.json, plus img2dataset's `_stats.json` per shard), TrainPipeline at 224 with
1 and 2 threads on 1 and 2 cores, rounds alternating between the formats, best of `--repeats`.
"""

import argparse
import contextlib
import datetime
import io
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time

import numpy as np

SIZE = 224
MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
WORDS = (
    "a photo of the small red dog cat car house tree on in at near big old new "
    "blue green street beach city field man woman child sitting running with"
).split()


def pin(cores: int) -> None:
    """Restrict every thread of this process (TF's pools included) to the first `cores` CPUs."""
    chosen = set(sorted(range(os.cpu_count() or 1))[:cores])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), chosen)
        except OSError:  # a thread that just exited
            pass


def photo_jpeg(rng, width: int, height: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: a smooth colour field, mid-scale texture and mild sensor noise (about 2
    bits per pixel at q90, like camera photos)."""
    from PIL import Image

    low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.float32)
    mid = rng.normal(128, 40, (height // 16 + 1, width // 16 + 1, 3)).clip(0, 255)
    mid = Image.fromarray(mid.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    img += 0.7 * (np.asarray(mid, np.float32) - 128) + rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def synthetic_images(n: int, unique: int, seed: int = 0):
    """Photo-like JPEGs (smooth random colour fields plus texture; `unique` distinct ones,
    repeated) with random captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        if i < unique:
            low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
            img = np.asarray(Image.fromarray(low).resize((384, 288), Image.BICUBIC), np.float32)
            img += rng.normal(0, 18, img.shape)
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            images.append(buf.getvalue())
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 16))))
        yield i, images[i % unique], caption


def write_shards(out_dir: str, n: int, unique: int) -> str:
    from clipjax.data.writer import SourceItem
    from clipjax.data.writer import write_shards as write

    items = (
        SourceItem(key=f"{i:06d}", origin=str(i), caption=c, read=lambda d=d: d)
        for i, d, c in synthetic_images(n, unique)
    )
    write(
        items,
        out_dir,
        source={"kind": "benchmark", "n": n},
        shard_size=max(1, n // 4),
        progress=False,
    )
    return os.path.join(out_dir, "*.tfrecord")


def cpu_seconds(pids=()) -> float:
    """CPU time (user + system) of this process's threads and of the processes `pids`."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def timed(step, steps: int, batch: int, pids=()) -> tuple[float, float]:
    """(images/s, images per CPU-second) over `steps` calls of `step`, each one batch. CPU time
    counts what the loader used whatever else runs on its cores: on a shared machine it is the
    steadier per-core figure."""
    start, cpu = time.perf_counter(), cpu_seconds(pids)
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
    return steps * batch / wall, steps * batch / cpu


def time_pipeline(pattern: str, cores: int, batch: int, steps: int) -> float:
    """The pipeline's images/s on `cores` cores."""
    return time_pipeline_cpu(pattern, cores, batch, steps)[0]


def time_pipeline_cpu(pattern: str, cores: int, batch: int, steps: int) -> tuple[float, float]:
    """(images/s, images per CPU-second) of TrainPipeline with `cores` threads on `cores` cores."""
    from clipjax.data.train_pipeline import TrainPipeline

    pin(cores)
    pipe = TrainPipeline(
        pattern,
        global_batch=batch,
        image_size=SIZE,
        seed=0,
        shuffle_buffer=1000,
        threads=cores,
        process_index=0,
        process_count=1,
    )
    with contextlib.closing(iter(pipe)) as it:  # closed: the pipeline's threads stop cleanly
        for _ in range(2):  # warm-up: graph building, tokenizer load, autotuning
            next(it)
        return timed(it.__next__, steps, batch)


# -- the PIL baseline ------------------------------------------------------------------------------


def _crop_box(rng, w, h, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    return 0, 0, w, h


def pil_batch(args):
    """Decode, random-resized-crop (bicubic), normalise and tokenize one batch with PIL."""
    from PIL import Image

    from clipjax.data.tokenizer import tokenize

    records, seed = args
    rng = np.random.default_rng(seed)
    images = []
    for jpg, _ in records:
        im = Image.open(io.BytesIO(jpg)).convert("RGB")
        box = _crop_box(rng, *im.size)
        im = im.resize((SIZE, SIZE), Image.BICUBIC, box=box)
        images.append((np.asarray(im, np.float32) / 255.0 - MEAN) / STD)
    return np.stack(images), tokenize([c for _, c in records])


def read_records(pattern: str):
    import tensorflow as tf

    out = []
    for path in sorted(tf.io.gfile.glob(pattern)):
        for r in tf.data.TFRecordDataset(path).as_numpy_iterator():
            f = tf.train.Example.FromString(r).features.feature
            out.append((f["jpg"].bytes_list.value[0], f["txt"].bytes_list.value[0].decode()))
    return out


def _batches(records, batch, steps):
    return [
        ([records[(s * batch + j) % len(records)] for j in range(batch)], s) for s in range(steps)
    ]


def time_pil(records, cores: int, batch: int, steps: int) -> float:
    pin(cores)
    work = _batches(records, batch, steps + 1)
    if cores == 1:
        pil_batch(work[0])  # warm-up (tokenizer load)
        start = time.perf_counter()
        for w in work[1:]:
            pil_batch(w)
        return steps * batch / (time.perf_counter() - start)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(cores) as pool:
        pool.map(pil_batch, work[:cores])  # start and warm the workers
        start = time.perf_counter()
        for _ in pool.imap(pil_batch, work[1:]):
            pass
        return steps * batch / (time.perf_counter() - start)


# -- open_clip's loader on the same files ---------------------------------------------------------

COMPARE_SIZES = ((400, 300), (1024, 768))


def write_same_files(out_dir: str, width: int, height: int, n: int, unique: int) -> tuple:
    """`unique` distinct photo-like JPEGs, `n` rows with random captions, as (TFRecord shard
    pattern written by the project's writer, open_clip CSV listing image files with the same
    bytes)."""
    from clipjax.data.writer import SourceItem
    from clipjax.data.writer import write_shards as write

    rng = np.random.default_rng(width)
    os.makedirs(os.path.join(out_dir, "img"))
    paths = []
    for i in range(unique):
        paths.append(os.path.join(out_dir, "img", f"{i:05d}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(photo_jpeg(rng, width, height))
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 16)))) for _ in range(n)]
    csv = os.path.join(out_dir, "train.csv")
    with open(csv, "w") as f:
        f.write("filepath\ttitle\n")
        f.writelines(f"{paths[i % unique]}\t{c}\n" for i, c in enumerate(captions))

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    items = (
        SourceItem(
            key=f"{i:06d}", origin=str(i), caption=c, read=lambda p=paths[i % unique]: read(p)
        )
        for i, c in enumerate(captions)
    )
    shards = os.path.join(out_dir, "shards")
    write(
        items,
        shards,
        source={"kind": "benchmark", "n": n},
        shard_size=max(1, n // 4),
        progress=False,
    )
    return os.path.join(shards, "*.tfrecord"), csv


def open_clip_csv_dataset():
    """open_clip_train's CsvDataset, or (where open_clip_train cannot be imported: it needs
    webdataset) a copy of it: PIL open -> the train transform -> tokenizer, one row at a time."""
    try:
        from open_clip_train.data import CsvDataset

        return CsvDataset, "open_clip_train.data.CsvDataset"
    except ImportError:
        return _CsvDataset, "copy of open_clip_train.data.CsvDataset (webdataset not installed)"


class _CsvDataset:
    """open_clip_train.data.CsvDataset (3.x) as written there, but the CSV read with the csv
    module (pandas is not installed) and imports moved inside (a map-style dataset: a torch
    Dataset subclass only adds `__add__`)."""

    def __init__(self, input_filename, transforms, img_key, caption_key, sep="\t", tokenizer=None):
        import csv

        with open(input_filename, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=sep))
        self.images = [r[img_key] for r in rows]
        self.captions = [r[caption_key] for r in rows]
        self.transforms = transforms
        self.tokenize = tokenizer

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, idx):
        from PIL import Image

        images = self.transforms(Image.open(str(self.images[idx])))
        texts = self.tokenize([str(self.captions[idx])])[0]
        return images, texts


def time_open_clip(csv: str, workers: int, batch: int, steps: int) -> tuple[float, float]:
    """open_clip_train's get_csv_dataset loader (shuffle, drop_last) with `workers` workers on
    max(1, workers) cores: (images/s, images per CPU-second) over `steps` batches after 2."""
    import open_clip
    import torch
    from torch.utils.data import DataLoader

    pin(max(1, workers))
    torch.set_num_threads(1)
    dataset_cls, _ = open_clip_csv_dataset()
    dataset = dataset_cls(
        csv,
        open_clip.image_transform(SIZE, is_train=True),
        img_key="filepath",
        caption_key="title",
        sep="\t",
        tokenizer=open_clip.get_tokenizer("ViT-B-32"),
    )
    if len(dataset) < (steps + 2) * batch:
        raise ValueError(f"{len(dataset)} rows, need {(steps + 2) * batch} for one pass")
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )
    it = iter(loader)
    for _ in range(2):  # warm-up: worker start, tokenizer load (2 workers deliver in pairs)
        images, _ = next(it)
    assert images.shape == (batch, 3, SIZE, SIZE)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    rates = timed(it.__next__, steps, batch, pids)
    del it
    return rates


def write_tars(out_dir: str, pattern: str, gzipped: bool) -> str:
    """The TFRecord shards' samples (same order and split) as webdataset tars, img2dataset
    style: KEY.jpg, KEY.txt, KEY.json per sample and a `_stats.json` per shard."""
    import tarfile

    import tensorflow as tf

    os.makedirs(out_dir, exist_ok=True)
    suffix = ".tar.gz" if gzipped else ".tar"
    for k, path in enumerate(sorted(tf.io.gfile.glob(pattern))):
        count = 0
        with tarfile.open(
            os.path.join(out_dir, f"{k:05d}{suffix}"), "w:gz" if gzipped else "w"
        ) as tar:
            for r in tf.data.TFRecordDataset(path).as_numpy_iterator():
                f = tf.train.Example.FromString(r).features.feature
                key = f["key"].bytes_list.value[0].decode()
                meta = json.dumps({"key": key, "status": "success", "width": 0, "height": 0})
                for ext, data in (
                    ("jpg", f["jpg"].bytes_list.value[0]),
                    ("txt", f["txt"].bytes_list.value[0]),
                    ("json", meta.encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        with open(os.path.join(out_dir, f"{k:05d}_stats.json"), "w") as f:
            json.dump({"count": count, "successes": count}, f)
    return os.path.join(out_dir, f"*{suffix}")


def compare_tar(args) -> None:
    """TrainPipeline over webdataset tars (plain, gzipped) vs TFRecords of the same samples."""
    steps, batch = (3 if args.quick else args.steps), args.batch
    n = args.images or (steps + 2) * batch * 2
    unique = min(n, 64 if args.quick else 256)
    width, height = COMPARE_SIZES[0]
    summary = {"benchmark": "input_pipeline_tar_vs_tfrecord", "image_size": SIZE, "batch": batch}
    summary |= {"steps": steps, "repeats": args.repeats, "images": n, "jpeg": f"{width}x{height}"}
    usable = len(os.sched_getaffinity(0))
    loads = [load_average()]
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pattern, _ = write_same_files(tmp, width, height, n, unique)
        kinds = {
            "tfrecord": pattern,
            "tar": write_tars(os.path.join(tmp, "tar"), pattern, gzipped=False),
            "tar.gz": write_tars(os.path.join(tmp, "targz"), pattern, gzipped=True),
        }
        for _ in range(args.repeats):
            for cores in (1, 2):
                if cores > usable:
                    continue
                for kind, files in kinds.items():
                    name = f"{kind} {cores}core"
                    rate, cpu_rate = time_pipeline_cpu(files, cores, batch, steps)
                    best[name] = max(best.get(name, 0.0), rate)
                    best_cpu[name] = max(best_cpu.get(name, 0.0), cpu_rate)
            loads.append(load_average())
    print(
        f"\n{width}x{height} q90 JPEGs ({unique} distinct, {n} samples) -> {SIZE}px, batch "
        f"{batch}, {steps} timed batches, best of {args.repeats}:"
    )
    print("| input | cores | images/s | images per CPU-second | vs TFRecord (per CPU-second) |")
    print("|---|---:|---:|---:|---:|")
    for name in best:
        kind, cores = name.split()
        ref = best_cpu[f"tfrecord {cores}"]
        ratio = best_cpu[name] / ref
        print(f"| {kind} | {cores[0]} | {best[name]:.0f} | {best_cpu[name]:.0f} | {ratio:.2f} |")
        summary[name.replace(" ", "_")] = round(best[name], 1)
        summary[name.replace(" ", "_") + "_per_cpu_s"] = round(best_cpu[name], 1)
        summary[name.replace(" ", "_") + "_ratio_per_cpu_s"] = round(ratio, 2)
    summary["load_average_1_5_15"] = loads
    print(f"load averages (1/5/15 min) before and after each round: {loads}")
    print(json.dumps(summary))


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def compare_open_clip(args) -> None:
    import open_clip

    steps = 2 if args.quick else args.steps
    batch = args.batch
    n = args.images or (steps + 2) * batch
    unique = min(n, 64 if args.quick else 256)
    _, dataset_name = open_clip_csv_dataset()
    print(f"open_clip {open_clip.__version__}; dataset: {dataset_name}")
    configs = (  # (name, loader, cores, workers or threads)
        ("open_clip 0 workers", "open_clip", 1, 0),
        ("clipjax tf.data 1 thread", "clipjax", 1, 1),
        ("open_clip 2 workers", "open_clip", 2, 2),
        ("clipjax tf.data 2 threads", "clipjax", 2, 2),
    )
    usable = len(os.sched_getaffinity(0))
    configs = tuple(c for c in configs if c[2] <= usable)
    summary = {
        "benchmark": "input_pipeline_vs_open_clip",
        "image_size": SIZE,
        "batch": batch,
        "steps": steps,
        "repeats": args.repeats,
        "open_clip": open_clip.__version__,
    }
    loads = [load_average()]
    for width, height in COMPARE_SIZES:
        best: dict[str, float] = {}
        best_cpu: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            pattern, csv = write_same_files(tmp, width, height, n, unique)
            jpg_kb = os.path.getsize(os.path.join(tmp, "img", "00000.jpg")) / 1024
            for _ in range(args.repeats):
                for name, loader, cores, k in configs:
                    if loader == "open_clip":
                        rate, cpu_rate = time_open_clip(csv, k, batch, steps)
                    else:
                        rate, cpu_rate = time_pipeline_cpu(pattern, cores, batch, steps)
                    best[name] = max(best.get(name, 0.0), rate)
                    best_cpu[name] = max(best_cpu.get(name, 0.0), cpu_rate)
                loads.append(load_average())
        print(
            f"\n{width}x{height} q90 JPEGs (~{jpg_kb:.0f} KB, {unique} distinct, {n} rows) -> "
            f"{SIZE}px, batch {batch}, best of {args.repeats}:"
        )
        per_core = {name: best[name] / cores for name, _, cores, _ in configs}
        print("| loader | cores | images/s | images/s per core | images per CPU-second |")
        print("|---|---:|---:|---:|---:|")
        for name, _, cores, _ in configs:
            print(
                f"| {name} | {cores} | {best[name]:.0f} | {per_core[name]:.0f} | "
                f"{best_cpu[name]:.0f} |"
            )
        key = f"{width}x{height}"
        row = {}
        for name in best:
            row[name.replace(" ", "_")] = round(best[name], 1)
            row[name.replace(" ", "_") + "_per_cpu_s"] = round(best_cpu[name], 1)
        ratios = []
        for label, figures in (("per core", per_core), ("per CPU-second", best_cpu)):
            oc = max(v for k, v in figures.items() if k.startswith("open_clip"))
            ours = max(v for k, v in figures.items() if k.startswith("clipjax"))
            tag = label.replace(" ", "_").replace("-", "_")
            row[f"ratio_{tag}_best"] = round(ours / oc, 2)
            text = []
            for c in (1, 2):
                o = [k for k, _, n, _ in configs if k.startswith("open_clip") and n == c]
                u = [k for k, _, n, _ in configs if k.startswith("clipjax") and n == c]
                if o and u:
                    row[f"ratio_{tag}_{c}core"] = round(figures[u[0]] / figures[o[0]], 2)
                    text.append(f"{c} core(s) {row[f'ratio_{tag}_{c}core']:.2f}x")
            text.append(f"best vs best {row[f'ratio_{tag}_best']:.2f}x")
            ratios.append(f"{label}: " + ", ".join(text))
        print("clipjax / open_clip " + "; ".join(ratios))
        summary[key] = row
    summary["load_average_1_5_15"] = loads
    print(f"load averages (1/5/15 min) before and after each round: {loads}")
    print(json.dumps(summary))


# -- what a ViT-B/16 CLIP train step consumes ------------------------------------------------------


def vit_b16_train_flops_per_image() -> float:
    """Forward+backward (3x forward) matmul FLOPs of CLIP ViT-B/16 at 224px + its text tower."""

    def transformer(tokens, width, layers):
        per_layer = 2 * tokens * (4 * width * width + 2 * width * 4 * width)  # qkv, out, mlp
        per_layer += 2 * 2 * tokens * tokens * width  # scores and weighted sum
        return layers * per_layer

    image = transformer(197, 768, 12) + 2 * 196 * (16 * 16 * 3) * 768 + 2 * 768 * 512
    text = transformer(77, 512, 12) + 2 * 512 * 512
    return 3.0 * (image + text)


def matmul_gflops(cores: int) -> float:
    pin(cores)
    import jax
    import jax.numpy as jnp

    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda x: (x @ x) @ x)
    f(a).block_until_ready()
    reps, start = 5, time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return reps * 2 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def main() -> None:
    from clipjax.data import use_pooled_tf_allocator

    use_pooled_tf_allocator()  # as the training CLI does
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="32; --compare open_clip: 128")
    p.add_argument("--repeats", type=int, default=None, help="best of this many (2; quick: 2)")
    p.add_argument(
        "--compare",
        choices=("pil", "open_clip", "tar"),
        default="pil",
        help="the baseline loader (tar: webdataset tars vs TFRecords of the same samples)",
    )
    p.add_argument("--steps", type=int, default=6, help="timed batches (--compare open_clip/tar)")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {cores} usable cores "
        f"(os.cpu_count={os.cpu_count()}), python {platform.python_version()}"
    )
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.date.today()}")
    if args.compare == "open_clip":
        args.repeats = args.repeats or 3
        args.batch = args.batch or 128
        compare_open_clip(args)
        return
    if args.compare == "tar":
        args.repeats = args.repeats or 3
        args.batch = args.batch or 64
        compare_tar(args)
        return
    args.repeats = args.repeats or 2
    args.batch = args.batch or 32
    n = args.images or (128 if args.quick else 512)
    steps = 4 if args.quick else 16
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        unique = 32 if args.quick else n
        pattern = write_shards(tmp, n, unique)
        print(
            f"wrote {n} records of synthetic 384x288 JPEGs ({unique} distinct) in "
            f"{time.perf_counter() - start:.1f}s"
        )
        records = read_records(pattern)
        for c in (1, 2):
            if c > cores:
                continue
            for _ in range(args.repeats):
                for name, fn, data in (
                    ("pil", time_pil, records),
                    ("pipeline", time_pipeline, pattern),
                ):
                    key = f"{name}_{c}core"
                    results[key] = max(results.get(key, 0.0), fn(data, c, args.batch, steps))
            print(
                f"{c} core(s): tf.data pipeline {results[f'pipeline_{c}core']:.1f} img/s, "
                f"PIL loop baseline {results[f'pil_{c}core']:.1f} img/s "
                f"({results[f'pipeline_{c}core'] / results[f'pil_{c}core']:.2f}x)"
            )
    gflops = matmul_gflops(min(2, cores))
    flops = vit_b16_train_flops_per_image()
    consume = gflops * 1e9 / flops
    best = max(v for k, v in results.items() if k.startswith("pipeline"))
    print(
        f"ViT-B/16 CLIP train step: {flops / 1e9:.1f} GFLOP/image; this CPU's f32 matmul peak "
        f"{gflops:.0f} GFLOP/s -> consumes at most {consume:.2f} img/s; the pipeline delivers "
        f"{best / consume:.0f}x that"
    )
    print(
        json.dumps(
            {
                "benchmark": "input_pipeline",
                "image_size": SIZE,
                "batch": args.batch,
                "images": n,
                **{k: round(v, 1) for k, v in results.items()},
                "speedup_1core": round(results["pipeline_1core"] / results["pil_1core"], 2),
                "vit_b16_max_consumption_img_s": round(consume, 2),
                "pipeline_over_vit_b16": round(best / consume, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
