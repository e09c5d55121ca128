"""Write TFRecord shards for training from an image folder, class folders, webdataset tars or tfds.

  python -m clipjax.data.make_shards --out DIR --captions caps.jsonl --images IMG_DIR
  python -m clipjax.data.make_shards --out DIR --coco captions_train2017.json --images IMG_DIR
  python -m clipjax.data.make_shards --out DIR --class-folders ROOT [--template "a photo of a {}."]
  python -m clipjax.data.make_shards --out DIR --webdataset 'tars/*.tar'
  python -m clipjax.data.make_shards --out DIR --tfds NAME --split train --label-field label
A captions file row may hold several captions of its image ('captions': [...]) and named ones
('caption_synthetic': ...); COCO annotations give each image all its captions (schema's `txt`
list). Options: --shard-size N, --max-side PX (resize on write), --workers N, --no-progress,
--seed N / --keep-order, --shuffle-buffer N, --max-member-mb N (webdataset member size cap).
Records are shuffled across the whole source with --seed (default 0), because sources sorted by
class (class folders, sorted CSVs, per-query scrapes) would give batches of one category;
--keep-order writes them in source order. Re-running with the same arguments skips shards already
complete (the same seed puts the same records in each shard); a different order is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from clipjax.cli import add_verbose_flag, setup_logging
from clipjax.data import order, sources, writer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clipjax.data.make_shards", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    add_verbose_flag(p)
    _add_source_args(p)
    _add_writing_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _add_source_args(p: argparse.ArgumentParser) -> None:
    """Where the examples come from: one source kind, plus its own options."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--captions",
        help="JSONL ({'image','caption'} or {'image','captions': [...]} per line, plus "
        "optional 'caption_<name>' fields) or CSV with columns image,caption[,caption_<name>]; "
        "needs --images",
    )
    src.add_argument(
        "--coco",
        help="COCO caption annotations JSON (e.g. captions_train2017.json); needs --images",
    )
    src.add_argument("--class-folders", help="root with one sub-directory of images per class")
    src.add_argument("--webdataset", help="comma-separated globs of webdataset .tar shards")
    src.add_argument("--tfds", help="tfds dataset name (already prepared under --data-dir)")
    p.add_argument("--images", help="image directory the --captions / --coco paths are under")
    p.add_argument(
        "--template",
        default="a photo of a {}.",
        help="caption for labelled sources without text; '{}' = class name",
    )
    p.add_argument("--split", default="train", help="tfds split")
    p.add_argument("--data-dir", default=None, help="tfds data directory")
    p.add_argument("--image-field", default="image", help="tfds image feature")
    p.add_argument("--text-field", default=None, help="tfds caption feature")
    p.add_argument("--label-field", default=None, help="tfds class label feature")


def _add_writing_args(p: argparse.ArgumentParser) -> None:
    """How the shards are written: size, image resizing, order, workers."""
    p.add_argument("--shard-size", type=int, default=1000, help="examples per shard")
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="resize images whose longer side exceeds this many pixels",
    )
    p.add_argument("--workers", type=int, default=1, help="processes decoding/re-encoding images")
    p.add_argument(
        "--prefix", default=None, help="shard file prefix (default: shard, or the tfds split)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the shuffle across the whole source (default 0)",
    )
    p.add_argument(
        "--keep-order",
        action="store_true",
        help="write records in source order instead of shuffling them",
    )
    p.add_argument(
        "--shuffle-buffer",
        type=int,
        default=order.DEFAULT_BUFFER,
        help="items held by the bounded shuffle of streamed sources (tfds, "
        "compressed tars), whose images cannot all be held in memory",
    )
    p.add_argument(
        "--max-member-mb",
        type=int,
        default=sources.DEFAULT_MAX_MEMBER_BYTES >> 20,
        help="webdataset: skip (and count) a key whose image or text member is larger than "
        "this many MiB, without reading it",
    )


def make_source(args: argparse.Namespace) -> sources.Source:
    if args.captions:
        if not args.images:
            raise ValueError("--captions needs --images (the directory its paths are relative to)")
        return sources.captions_source(args.captions, args.images)
    if args.coco:
        if not args.images:
            raise ValueError("--coco needs --images (the directory of its file_names)")
        return sources.coco_source(args.coco, args.images)
    if args.class_folders:
        return sources.class_folder_source(args.class_folders, args.template)
    if args.webdataset:
        return sources.webdataset_source(args.webdataset, args.max_member_mb << 20)
    return sources.tfds_source(
        args.tfds,
        args.split,
        args.data_dir,
        args.image_field,
        args.text_field,
        args.label_field,
        args.template,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, level=logging.INFO if args.verbose else logging.ERROR)
    for flag in ("shard_size", "workers", "max_side", "shuffle_buffer", "max_member_mb"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.keep_order and args.seed is not None:
        parser.error("--seed and --keep-order exclude each other (--keep-order does not shuffle)")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    seed = None if args.keep_order else (args.seed if args.seed is not None else 0)
    try:
        source = make_source(args)
        prefix = args.prefix or (args.split if args.tfds else "shard")
        manifest = writer.write_shards(
            source,
            args.out,
            source=source.description,
            shard_size=args.shard_size,
            max_side=args.max_side,
            workers=args.workers,
            prefix=prefix,
            classnames=source.classnames,
            total=source.total,
            progress=not args.no_progress,
            shuffle_seed=seed,
            shuffle_buffer=args.shuffle_buffer,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = [s for shard in manifest["shards"] for s in shard["skipped"]]
    for s in skipped[:50]:
        print(f"skipped {s['origin']}: {s['reason']}")
    if len(skipped) > 50:
        print(f"... and {len(skipped) - 50} more (see manifest.json)")
    print(
        f"wrote {manifest['num_examples']} examples in {len(manifest['shards'])} shards to "
        f"{args.out} {order.describe(manifest['order'])}; skipped {manifest['num_skipped']}; "
        "manifest: "
        f"{os.path.join(args.out, 'manifest.json')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
