"""Evaluate a model: zero-shot classification or image<->text retrieval.

  python -m clipjax.evaluate --model PATH --task zeroshot --data GLOB|DIR|tfds:NAME[:SPLIT]
      [--classnames imagenet|demo|FILE|a,b,c] [--templates openai|simple|photo|demo|FILE]
  python -m clipjax.evaluate --model PATH --task retrieval --data GLOB|DIR|tfds:NAME[:SPLIT]

PATH is a clipjax model directory, a Hugging Face CLIP directory, a training workdir (latest
checkpoint, or --step) or an OpenAI/open_clip state dict. Prints a table; --out writes JSON.
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
    p.add_argument("--task", required=True, choices=("zeroshot", "retrieval"))
    p.add_argument(
        "--data",
        required=True,
        help="GLOB|DIR of TFRecord shards, class-folder DIR, or tfds:NAME[:SPLIT]",
    )
    p.add_argument(
        "--classnames",
        help="imagenet | demo | FILE | comma-separated names "
        "(default: the dataset's own class names)",
    )
    p.add_argument(
        "--templates",
        help="openai | simple | photo | demo | FILE (default: demo "
        "for the demo classes, else openai)",
    )
    p.add_argument("--batch-size", type=int, default=64)
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
    rows = [
        (
            k,
            f"{100 * v:6.2f} %"
            if k.startswith(("top", "mean_per_class")) or "R@" in k
            else f"{v:g}",
        )
        for k, v in metrics.items()
    ]
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * (width + 12)] + [f"{k:<{width}}  {v:>9}" for k, v in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    from clipjax.evaluate.classnames import load_classnames, load_templates
    from clipjax.evaluate.data import open_eval_data
    from clipjax.export.load import load
    from clipjax.parallel.mesh import make_mesh

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    classnames = load_classnames(args.classnames) if args.classnames else None
    templates = None
    if args.task == "zeroshot":
        templates = load_templates(
            args.templates or ("demo" if args.classnames == "demo" else "openai")
        )
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
    )
    mesh = make_mesh()
    start = time.time()
    if args.task == "zeroshot":
        from clipjax.evaluate.zeroshot import zeroshot_accuracy

        classnames = classnames or data.classnames
        if not classnames:
            raise ValueError(
                f"--data {args.data}: the dataset names no classes; pass "
                f"--classnames imagenet|demo|FILE"
            )
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
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


if __name__ == "__main__":
    sys.exit(main())
