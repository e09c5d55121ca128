"""`python -m clipjax.demo` (behind `make demo`): the whole job on a CPU in a few minutes.

1. generate the procedural shapes dataset (train + held-out test shards) through the shard writer;
2. train `experiments/demo.py` (a tiny CLIP) with progress lines, checkpoints and metrics;
3. evaluate on the held-out split: zero-shot classification (12 colour x shape classes, prompt
   ensemble) and image<->text retrieval recall@K, next to chance;
4. export the model directory and load it back with `clipjax.load` as a check.

Everything goes under --out (default demo_out/). The run starts fresh unless --resume is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, "experiments", "demo.py")


def load_experiment(path: str, arg: str | None):
    """get_config(arg) of an experiment file."""
    import importlib.util

    if not os.path.isfile(path):
        raise SystemExit(f"error: experiment file {path} not found (run from the repository)")
    spec = importlib.util.spec_from_file_location("demo_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from clipjax.train.metrics import progress_to_stdout

    progress_to_stdout(indent="  ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipjax.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    parser.add_argument("--variant", default=None,
                        help="experiments/demo.py variant, e.g. 'quick' for a smoke run")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUT/workdir instead of starting fresh")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _setup_logging()
    t0 = time.perf_counter()

    config = load_experiment(EXPERIMENT, args.variant)
    data_dir = os.path.join(args.out, "data")
    workdir = os.path.join(args.out, "workdir")
    model_dir = os.path.join(args.out, "model")
    config.data.demo_dir = data_dir
    config.export.dir = model_dir
    if not args.resume and os.path.isdir(workdir):
        shutil.rmtree(workdir)

    import jax

    from clipjax.train.loop import prepare_data, train

    print(f"[1/4] demo dataset -> {data_dir}")
    t = time.perf_counter()
    config = prepare_data(config)
    print(f"      train {config.data.train}, held-out {config.eval.zeroshot.shards} "
          f"({time.perf_counter() - t:.1f}s)")

    print(f"[2/4] training a '{config.model.preset}' CLIP for {config.num_steps} steps of "
          f"{config.batch_size} on {jax.device_count()} {jax.devices()[0].platform} device(s) "
          f"-> {workdir}")
    t = time.perf_counter()
    result = train(config, workdir)
    train_s = time.perf_counter() - t

    ev = result.eval_metrics
    classes = int(ev.get("zeroshot/num_classes", 12))
    n_test = int(ev.get("retrieval/num_images", 1))
    print(f"[3/4] held-out evaluation ({int(ev.get('zeroshot/num_examples', 0))} images)")
    print(f"      zero-shot top-1 {ev['zeroshot/top1']:.1%}  top-5 {ev['zeroshot/top5']:.1%}  "
          f"(chance {1 / classes:.1%} / {min(5, classes) / classes:.1%})")
    for direction in ("image_to_text", "text_to_image"):
        recalls = "  ".join(f"R@{k} {ev[f'retrieval/{direction}/R@{k}']:.1%}" for k in (1, 5, 10))
        print(f"      {direction.replace('_', ' '):13s} {recalls}  (chance R@1 {1 / n_test:.1%}, "
              f"R@10 {min(10, n_test) / n_test:.1%})")

    print(f"[4/4] exported model -> {model_dir}")
    import clipjax

    model, params, preprocess = clipjax.load(model_dir)
    print(f"      clipjax.load('{model_dir}') -> {type(model).__name__}, image size "
          f"{model.config.image_size}")
    total = time.perf_counter() - t0
    print(f"done in {total:.0f}s (training + evaluation {train_s:.0f}s); metrics in "
          f"{workdir}/metrics.jsonl, TensorBoard in {workdir}/tensorboard")
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
