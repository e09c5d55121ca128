"""`python -m clipjax.demo` (behind `make demo`): the whole job on a CPU in a few minutes.

1. generate the procedural shapes dataset (train + held-out test shards) through the shard writer;
2. train `get_config()` below (a tiny CLIP; `experiments/demo.py` for the training CLI) with
   progress lines, checkpoints and metrics;
3. evaluate on the held-out split: zero-shot classification (12 colour x shape classes, prompt
   ensemble) and image<->text retrieval recall@K, next to chance;
4. export the model directory and load it back with `clipjax.load` as a check;
then print the command that indexes the held-out images and serves them (`clipjax.search`).

Everything goes under --out (default demo_out/). The run starts fresh unless --resume is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

from clipjax.cli import add_verbose_flag, quiet_libraries

DEFAULT_DATA = os.path.join("demo_out", "data")
# (train, held-out) images of the demo dataset per variant.
DATASET_SIZES = {"": (12000, 600), "quick": (256, 64)}


# The demo's model: the 'tiny' preset, narrower (compute-bound on 2 CPU cores, and the shapes need
# little), with a 16-token context (the demo captions are at most 14 tokens with start/end, so
# this halves the text tower's work).
DEMO_MODEL = dict(
    vision_width=64, vision_heads=2, text_width=64, text_heads=2, embed_dim=64, context_length=16
)
# The `quick` smoke run's model: one layer per tower on 16-pixel images.
QUICK_MODEL = dict(
    image_size=16,
    patch_size=8,
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    text_width=32,
    text_layers=1,
    text_heads=2,
    embed_dim=32,
    context_length=16,
)


def get_config(arg: str | None = None):
    """The demo's train config; `arg`: comma-separated `quick` (a smoke run) and `data=DIR` (the
    generated demo data, default demo_out/data). The data must exist (`make_demo_data`)."""
    from clipjax.data.demo import DEMO_CLASSNAMES, DEMO_TEMPLATES
    from clipjax.train.config import base_config, parse_config_arg

    a = parse_config_arg(arg, "the demo config", quick=False, data=DEFAULT_DATA)
    c = base_config()
    c.seed = 0
    c.model.preset = "tiny"
    c.model.overrides.update(DEMO_MODEL)
    c.data.train = os.path.join(a["data"], "train", "*.tfrecord")
    c.data.shuffle_buffer = 4000
    c.data.crop_scale = (0.8, 1.0)
    c.num_steps = 900
    c.batch_size = 128
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.1
    c.log_every = 50
    c.checkpoint.every_steps = 300
    c.checkpoint.keep = 2
    test = os.path.join(a["data"], "test", "*.tfrecord")
    c.eval.zeroshot.shards = test
    c.eval.zeroshot.classnames = ",".join(DEMO_CLASSNAMES)
    c.eval.zeroshot.templates = "|".join(DEMO_TEMPLATES)
    c.eval.retrieval.shards = test
    c.eval.batch_size = 200
    if a["quick"]:
        _quick(c)
    return c


def _quick(c) -> None:
    """A handful of steps on tiny images (tests and smoke runs)."""
    c.num_steps = 6
    c.batch_size = 16
    c.data.shuffle_buffer = 64
    c.optimizer.warmup_steps = 2
    c.log_every = 1
    c.checkpoint.every_steps = 2
    c.eval.batch_size = 32
    c.compiler_options = {"xla_backend_optimization_level": 0}  # compiling dominates here
    c.model.overrides.update(QUICK_MODEL)


def make_demo_data(data_dir: str, variant: str = "", progress: bool = False):
    """Generate (or find already generated) the demo dataset of `variant` in `data_dir`."""
    from clipjax.data.demo import make_demo_dataset

    if variant not in DATASET_SIZES:
        raise ValueError(f"demo variant {variant!r}: expected one of {sorted(DATASET_SIZES)}")
    n_train, n_test = DATASET_SIZES[variant]
    return make_demo_dataset(data_dir, n_train=n_train, n_test=n_test, progress=progress)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from clipjax.train.metrics import progress_to_stdout

    progress_to_stdout(indent="  ")


def _report(result, workdir: str, model_dir: str, t0: float, train_s: float) -> None:
    """Steps 3 and 4: the held-out metrics next to chance; the exported model loaded back."""
    ev = result.eval_metrics
    classes = int(ev.get("zeroshot/num_classes", 12))
    n_test = int(ev.get("retrieval/num_images", 1))
    print(f"[3/4] held-out evaluation ({int(ev.get('zeroshot/num_examples', 0))} images)")
    print(
        f"      zero-shot top-1 {ev['zeroshot/top1']:.1%}  top-5 {ev['zeroshot/top5']:.1%}  "
        f"(chance {1 / classes:.1%} / {min(5, classes) / classes:.1%})"
    )
    for direction in ("image_to_text", "text_to_image"):
        recalls = "  ".join(f"R@{k} {ev[f'retrieval/{direction}/R@{k}']:.1%}" for k in (1, 5, 10))
        print(
            f"      {direction.replace('_', ' '):13s} {recalls}  (chance R@1 {1 / n_test:.1%}, "
            f"R@10 {min(10, n_test) / n_test:.1%})"
        )

    print(f"[4/4] exported model -> {model_dir}")
    import clipjax

    model, params, preprocess = clipjax.load(model_dir)
    print(
        f"      clipjax.load('{model_dir}') -> {type(model).__name__}, image size "
        f"{model.config.image_size}"
    )
    total = time.perf_counter() - t0
    print(
        f"done in {total:.0f}s (training + evaluation {train_s:.0f}s); metrics in "
        f"{workdir}/metrics.jsonl, TensorBoard in {workdir}/tensorboard"
    )


def serve_command(out: str) -> str:
    """The shell command that indexes the demo's held-out images and serves the search page."""
    import shlex

    model, index = os.path.join(out, "model"), os.path.join(out, "search-index")
    shards = os.path.join(out, "data", "test", "*.tfrecord")
    return (
        f"python -m clipjax.search index --model {shlex.quote(model)} --tfrecord "
        f"{shlex.quote(shards)} --out {shlex.quote(index)} && python -m clipjax.search serve "
        f"--index {shlex.quote(index)} --model {shlex.quote(model)}"
    )


def main(argv: list[str] | None = None) -> int:
    from clipjax.data import use_pooled_tf_allocator

    use_pooled_tf_allocator()
    parser = argparse.ArgumentParser(
        prog="python -m clipjax.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    parser.add_argument(
        "--variant",
        default=None,
        choices=["quick"],
        help="'quick' for a smoke run (a few steps on tiny images)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT/workdir instead of starting fresh",
    )
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_libraries(args.verbose)
    _setup_logging()
    t0 = time.perf_counter()

    variant = args.variant or ""
    data_dir = os.path.join(args.out, "data")
    workdir = os.path.join(args.out, "workdir")
    model_dir = os.path.join(args.out, "model")
    if not args.resume and os.path.isdir(workdir):
        shutil.rmtree(workdir)

    print(f"[1/4] demo dataset -> {data_dir}")
    t = time.perf_counter()
    make_demo_data(data_dir, variant)
    config = get_config(",".join(filter(None, [variant, f"data={data_dir}"])))
    config.export.dir = model_dir
    print(
        f"      train {config.data.train}, held-out {config.eval.zeroshot.shards} "
        f"({time.perf_counter() - t:.1f}s)"
    )

    import jax

    from clipjax.train.loop import train

    print(
        f"[2/4] training a '{config.model.preset}' CLIP for {config.num_steps} steps of "
        f"{config.batch_size} on {jax.device_count()} {jax.devices()[0].platform} device(s) "
        f"-> {workdir}"
    )
    t = time.perf_counter()
    result = train(config, workdir)
    train_s = time.perf_counter() - t

    _report(result, workdir, model_dir, t0, train_s)
    if result.status != "completed":
        return 1
    print("search the held-out images in a browser at http://127.0.0.1:8000/:")
    print(f"  {serve_command(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
