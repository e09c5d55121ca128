"""Evaluate a model: a suite of tasks, or one zero-shot / retrieval / probe task.

  python -m clipjax.evaluate --model PATH --suite default|demo|SUITE.json|SUITE.py
      [--data-dir TFDS_DIR] [--out results.json]
  python -m clipjax.evaluate --model PATH --task zeroshot --data GLOB|DIR|tfds:NAME[:SPLIT]
      [--classnames imagenet|demo|FILE|a,b,c] [--templates openai|simple|photo|demo|FILE]
  python -m clipjax.evaluate --model PATH --task retrieval --data GLOB|DIR|tfds:NAME[:SPLIT]
  python -m clipjax.evaluate --model PATH --task linear_probe --train-data SPEC --data SPEC
  python -m clipjax.evaluate --model PATH --task fewshot --shots 1,5,10,25 --train-data SPEC
      --data SPEC

Given --classnames are matched by name to the dataset's own class names (class folders, shard
manifest, tfds), so label i is always scored against class i's prompts.

PATH is a clipjax model directory, a Hugging Face CLIP directory, a training workdir (latest
checkpoint, or --step) or an OpenAI/open_clip state dict. A suite (clipjax/evaluate/suite.py)
lists tasks with their data; tasks whose data is missing are skipped with the reason. Prints a
table; --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from clipjax.cli import add_verbose_flag, setup_logging
from clipjax.export.__main__ import add_trust_flag
from clipjax.files import write_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clipjax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model dir, HF CLIP dir, workdir, state dict")
    p.add_argument("--step", type=int, help="checkpoint step of a workdir (default: latest)")
    p.add_argument("--suite", help="packaged suite name, or a .json / .py suite file")
    p.add_argument("--task", choices=("zeroshot", "retrieval", "linear_probe", "fewshot"))
    p.add_argument(
        "--data",
        help="test data: GLOB|DIR of TFRecord shards, class-folder DIR, or tfds:NAME[:SPLIT]",
    )
    p.add_argument("--train-data", help="linear_probe / fewshot: the train split (as --data)")
    p.add_argument("--shots", default="1,5,10,25", help="fewshot: examples per class")
    p.add_argument("--seeds", type=int, default=3, help="fewshot: draws averaged per shot")
    p.add_argument("--data-dir", help="where tfds data sets are prepared (tfds: specs)")
    p.add_argument(
        "--classnames",
        help="imagenet | demo | FILE | comma-separated names (default: the dataset's own class "
        "names). Where the dataset names its classes, given names are matched to them by name "
        "(any order); names matching none, as many as its classes, are display names in label "
        "order (the mapping is printed); any other mismatch is an error",
    )
    p.add_argument(
        "--templates",
        help="openai | simple | photo | demo | FILE (default: demo "
        "for the demo classes, else openai)",
    )
    p.add_argument("--batch-size", type=int, help="default 64 (a suite may set its own)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--image-field", help="tfds: image feature (default image)")
    p.add_argument("--label-field", help="tfds: label feature (default label)")
    p.add_argument("--text-field", help="tfds: caption feature (retrieval)")
    p.add_argument("--out", help="write the results as JSON here")
    add_verbose_flag(p)
    add_trust_flag(p)
    return p


def _tfds_fields(args: argparse.Namespace) -> dict[str, str]:
    return {
        k: v
        for k, v in (
            ("image_field", args.image_field),
            ("label_field", args.label_field),
            ("text_field", args.text_field),
        )
        if v
    }


def format_table(title: str, metrics: dict[str, float]) -> str:
    """A two-column text table of metric -> value (fractions shown as percentages)."""
    from clipjax.evaluate.suite import format_value

    rows = [(k, format_value(k, v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * (width + 12)] + [f"{k:<{width}}  {v:>9}" for k, v in rows]
    return "\n".join(lines)


def _check_args(args: argparse.Namespace) -> None:
    if (args.suite is None) == (args.task is None):
        raise ValueError("give either --suite or --task")
    if args.task and not args.data:
        raise ValueError(f"--task {args.task} needs --data")
    if args.task in ("linear_probe", "fewshot") and not args.train_data:
        raise ValueError(f"--task {args.task} needs --train-data (the split to fit on)")
    if args.batch_size is not None and args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")


def _shots(spec: str) -> list[int]:
    try:
        shots = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        shots = []
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots {spec!r}: expected comma-separated positive integers")
    return shots


def run_suite_cli(args: argparse.Namespace) -> dict:
    """Load the suite (checked before the model), run it, and return the JSON result."""
    from clipjax.evaluate.suite import load_suite, run_suite
    from clipjax.export.load import load
    from clipjax.parallel.mesh import make_mesh

    suite = load_suite(args.suite)
    model, params, _ = load(args.model, step=args.step, trust_torchscript=args.trust_torchscript)
    start = time.time()
    tasks = run_suite(
        suite, model, params, mesh=make_mesh(), batch_size=args.batch_size, data_dir=args.data_dir
    )
    return {
        "suite": suite.name,
        "suite_source": suite.source,
        "model": args.model,
        "step": args.step,
        "tasks": tasks,
        "seconds": round(time.time() - start, 2),
    }


def run(args: argparse.Namespace) -> dict:
    """Run the --task zeroshot/retrieval (or a probe) evaluation; the JSON result."""
    from clipjax.evaluate.data import open_eval_data
    from clipjax.export.load import load
    from clipjax.parallel.mesh import make_mesh

    _check_args(args)
    if args.task in ("linear_probe", "fewshot"):
        return _run_probe(args)
    args.batch_size = args.batch_size or 64
    classnames, templates = _prompts(args)
    model, params, _ = load(args.model, step=args.step, trust_torchscript=args.trust_torchscript)
    cfg = model.config
    if args.task == "zeroshot" and args.text_field:
        raise ValueError("--text-field is for --task retrieval")
    data = open_eval_data(
        args.data,
        image_size=cfg.image_size,
        context_length=cfg.context_length,
        batch_size=args.batch_size,
        limit=args.limit,
        tfds_fields=_tfds_fields(args),
        data_dir=args.data_dir,
    )
    mesh = make_mesh()
    start = time.time()
    if args.task == "zeroshot":
        from clipjax.evaluate.zeroshot import zeroshot_accuracy

        classnames = _zeroshot_classnames(args, classnames, data.classnames)
        metrics = zeroshot_accuracy(model, params, data, classnames, templates, mesh=mesh)
    else:
        from clipjax.evaluate.retrieval import retrieval_recall

        metrics = retrieval_recall(model, params, data, mesh=mesh, batch_size=args.batch_size)
    metrics["skipped"] = float(data.skipped)
    result = {
        "model": args.model,
        "step": args.step,
        "task": args.task,
        "data": args.data,
        "data_description": data.description,
        "metrics": metrics,
        "seconds": round(time.time() - start, 2),
    }
    if templates is not None:
        result["num_templates"] = len(templates)
    return result


def _prompts(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    """(--classnames, --templates) loaded; templates only for zero-shot (default: openai's,
    or the demo's with --classnames demo)."""
    from clipjax.evaluate.classnames import load_classnames, load_templates

    classnames = load_classnames(args.classnames) if args.classnames else None
    templates = None
    if args.task == "zeroshot":
        templates = load_templates(
            args.templates or ("demo" if args.classnames == "demo" else "openai")
        )
    return classnames, templates


def _zeroshot_classnames(
    args: argparse.Namespace, given: list[str] | None, dataset: list[str] | None
) -> list[str]:
    """The class names to classify into: --classnames aligned with the dataset's (notes
    printed), else the dataset's own."""
    from clipjax.evaluate.classnames import align_classnames

    classnames = given
    if classnames is not None:
        classnames, notes = align_classnames(classnames, dataset)
        for line in notes:
            print(f"note: {line}")
    classnames = classnames or dataset
    if not classnames:
        raise ValueError(
            f"--data {args.data}: the dataset names no classes; pass "
            f"--classnames imagenet|demo|FILE"
        )
    return classnames


def _run_probe(args: argparse.Namespace) -> dict:
    from clipjax.evaluate.suite import Task, run_task
    from clipjax.export.load import load
    from clipjax.parallel.mesh import make_mesh

    options = {"shots": _shots(args.shots), "seeds": args.seeds} if args.task == "fewshot" else {}
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    task = Task(
        name=args.task,
        kind=args.task,
        data=args.data,
        train=args.train_data,
        limit=args.limit,
        train_limit=args.limit,
        fields=_tfds_fields(args),
        options=options,
    )
    model, params, _ = load(args.model, step=args.step, trust_torchscript=args.trust_torchscript)
    start = time.time()
    metrics = run_task(
        task,
        model,
        params,
        mesh=make_mesh(),
        batch_size=args.batch_size or 64,
        data_dir=args.data_dir,
    )
    return {
        "model": args.model,
        "step": args.step,
        "task": args.task,
        "data": args.data,
        "train_data": args.train_data,
        "data_description": args.data,
        "metrics": metrics,
        "seconds": round(time.time() - start, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        _check_args(args)
        if args.suite:
            return _main_suite(args)
        result = run(args)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        format_table(
            f"{args.task} | {args.model} | {result['data_description']}", result["metrics"]
        )
    )
    if args.out:
        write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _main_suite(args: argparse.Namespace) -> int:
    from clipjax.evaluate.suite import format_suite_table

    result = run_suite_cli(args)
    print(format_suite_table(result["tasks"], f"suite {result['suite']} | {args.model}"))
    if args.out:
        write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    failed = [t["name"] for t in result["tasks"] if t["status"] == "failed"]
    if failed:
        print(f"error: {len(failed)} task(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
