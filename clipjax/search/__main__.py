"""Image search over an embedding index.

  python -m clipjax.search index --model PATH --images DIR|GLOB --out INDEX [--float16]
  python -m clipjax.search index --model PATH --tfrecord GLOB | --webdataset GLOB --out INDEX
  python -m clipjax.search ann --index INDEX [--memory-budget 4G] [--factory STR]
  python -m clipjax.search query --index INDEX --model PATH "a text" [--image FILE] -k 10
      [--html OUT.html]
  python -m clipjax.search serve --index INDEX [--index INDEX ...] --model PATH
      [--host 127.0.0.1] [--port 8000]

`index` is resumable and incremental: re-running it continues a killed run or adds new files
(records of shards keep their caption and key). Above 100,000 images it also builds an
approximate index (faiss), and extends an existing one with the new images without a rebuild;
`ann` builds one on request (see `clipjax.search.ann`). `serve` runs the web page and JSON API of
`clipjax.search.server` on 127.0.0.1 (another --host needs --allow-remote).
`query` embeds a text (or an image not in the index) with --model, which must be the model the
index was built with. The model path recorded in the index is opened only with
--trust-torchscript: an index may come from anyone, and it names any path it likes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from clipjax.cli import INPUT_ERRORS, add_verbose_flag, setup_logging
from clipjax.export.__main__ import add_trust_flag

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clipjax.search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="embed images into an index (resumable, incremental)")
    ix.add_argument("--model", required=True, help="model dir, HF CLIP dir, workdir, state dict")
    what = ix.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", help="directory (recursive) or glob of images")
    what.add_argument("--tfrecord", help="glob of TFRecord shards (clipjax / img2dataset schema)")
    what.add_argument("--webdataset", help="glob of uncompressed webdataset .tar shards")
    ix.add_argument("--out", required=True, help="index directory (created or extended)")
    ix.add_argument("--float16", action="store_true", help="store embeddings as float16")
    ix.add_argument("--batch-size", type=int, default=64)
    ix.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        help="images per persisted chunk (work lost if killed is at most this)",
    )
    ix.add_argument("--no-progress", action="store_true")
    ix.add_argument("--no-ann", action="store_true", help="no approximate index, whatever the size")
    add_trust_flag(ix)
    add_verbose_flag(ix)
    an = sub.add_parser("ann", help="build the approximate (faiss) index of an index")
    an.add_argument("--index", required=True)
    an.add_argument(
        "--memory-budget",
        default="4G",
        help="bytes the faiss index may take (suffix K/M/G); picks IVF-Flat or IVF-PQ",
    )
    an.add_argument("--factory", help="a faiss index_factory string instead (e.g. HNSW32)")
    an.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to tune for")
    add_verbose_flag(an)
    q = sub.add_parser("query", help="rank indexed images by a text and/or image query")
    q.add_argument("--index", required=True)
    q.add_argument(
        "--model",
        help="model to encode the query: the one the index was built "
        "with (needed for text queries)",
    )
    q.add_argument("text", nargs="?", help="text query")
    q.add_argument("--image", help="image query (a file; indexed images need no model)")
    q.add_argument("-k", type=int, default=10, help="number of results")
    q.add_argument("--html", help="also write an HTML page of thumbnails here")
    add_trust_flag(q, also="; without --model, also load the model path the index records")
    add_verbose_flag(q)
    sv = sub.add_parser("serve", help="web page and JSON API over one or more indexes")
    sv.add_argument("--index", action="append", required=True, help="an index (repeatable)")
    sv.add_argument("--model", required=True, help="the model the indexes were built with")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than this machine (anyone reaching it reads the images)",
    )
    sv.add_argument("--max-upload-mb", type=float, default=16, help="largest image upload")
    sv.add_argument(
        "--max-upload-megapixels", type=float, default=40, help="largest image upload in pixels"
    )
    add_trust_flag(sv)
    add_verbose_flag(sv)
    return p


def parse_bytes(text: str) -> int:
    """'4G', '512M', '100000' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        n = -1
    if n <= 0:
        raise ValueError(f"--memory-budget {text!r}: expected a size such as 4G, 512M or 10000")
    return int(n)


def _index_items(args: argparse.Namespace):
    """What to index: file paths, or an iterator of shard records (checked before any work)."""
    from clipjax.files import expand_globs
    from clipjax.search import sources
    from clipjax.search.build import list_images

    if args.images:
        return list_images(args.images)
    if args.tfrecord:
        shards = expand_globs(
            [args.tfrecord],
            files_only=True,
            missing=lambda p: ValueError(f"--tfrecord {p!r} matches no files"),
        )
        for shard in shards:  # the first record of each must parse
            next(sources.tfrecord_offsets(shard), None)
        return sources.tfrecord_items(shards)
    items = sources.webdataset_items(args.webdataset)
    return items


def run_index(args: argparse.Namespace) -> None:
    from clipjax.export.load import load, model_fingerprint
    from clipjax.search.build import build_index

    if args.batch_size <= 0 or args.chunk_size <= 0:
        raise ValueError("--batch-size and --chunk-size must be positive")
    paths = _index_items(args)  # fails fast, before the model is loaded
    model, params, preprocess = load(args.model, trust_torchscript=args.trust_torchscript)
    stats = build_index(
        args.out,
        paths,
        model=model,
        params=params,
        preprocess=preprocess,
        fingerprint=model_fingerprint(model.config, params),
        model_path=os.path.abspath(args.model),
        float16=args.float16,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )
    print(
        f"{args.out}: {stats.index_size} images indexed ({stats.added} added, "
        f"{stats.already} already present, {stats.failed} unreadable skipped)"
    )
    from clipjax.search import ann

    has_ann = os.path.isfile(os.path.join(args.out, ann.ANN_META))
    if args.no_ann or not (has_ann or stats.index_size >= ann.EXACT_BELOW):
        return
    from clipjax.search.index import Index

    embeddings = Index.load(args.out).embeddings
    if has_ann:
        meta = ann.extend_ann(args.out, embeddings)
    else:
        meta = ann.build_ann(args.out, embeddings)
    _print_ann(args.out, meta)


def _print_ann(where: str, meta) -> None:
    print(
        f"{where}: approximate index {meta.factory} over {meta.count} images "
        f"({meta.file_bytes / 2**20:.1f} MiB); recall@10 {meta.recall_at_10:.3f} against exact "
        f"search on {meta.recall_queries} held-out queries at nprobe {meta.nprobe}"
    )


def run_ann(args: argparse.Namespace) -> None:
    from clipjax.search.ann import build_ann
    from clipjax.search.index import Index

    budget = parse_bytes(args.memory_budget)
    index = Index.load(args.index)
    meta = build_ann(
        args.index,
        index.embeddings,
        factory=args.factory,
        memory_budget=budget,
        target_recall=args.target_recall,
    )
    _print_ann(args.index, meta)
    print(f"built in {meta.build_s:.1f} s")


def run_serve(args: argparse.Namespace) -> None:
    from clipjax.search.server import check_host, serve
    from clipjax.search.service import SearchService

    check_host(args.host, args.allow_remote)
    if not 0 < args.port < 65536 or args.max_upload_mb <= 0 or args.max_upload_megapixels <= 0:
        raise ValueError("--port must be in 1..65535 and the upload limits positive")
    service = SearchService(
        args.index,
        args.model,
        trust_torchscript=args.trust_torchscript,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_upload_pixels=int(args.max_upload_megapixels * 1e6),
    )
    for c in service.collections.values():
        d = c.describe()
        print(f"index {d['name']}: {d['count']} images, {d['search']} search")
    print(f"serving on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    serve(service, args.host, args.port)


def _index_model_path(args: argparse.Namespace, index) -> str:
    """The model path the index records, only when the user trusts it (--trust-torchscript)."""
    recorded = index.meta.model_path
    if not args.trust_torchscript:
        built = f" (it records {recorded})" if recorded else ""
        raise ValueError(
            f"{args.index}: this query needs the model the index was built with"
            f"{built}; pass --model PATH. The index's own record is not opened "
            f"unasked, since an index can name any file; --trust-torchscript "
            f"opens it"
        )
    if not recorded:
        raise ValueError(f"{args.index}: the index does not record its model; pass --model")
    if not os.path.exists(recorded):
        raise FileNotFoundError(
            f"{recorded}: the model this index was built with is gone; "
            f"pass --model with the same model"
        )
    log.warning(
        "loading the model the index %s records, %s (--trust-torchscript)", args.index, recorded
    )
    return recorded


def _encode_queries(args: argparse.Namespace, index) -> np.ndarray:
    """The normalised query vector: text and/or image (their normalised sum when both)."""
    from clipjax.search.index import check_compatible

    vectors = []
    image_emb = index.lookup(args.image) if args.image else None
    if args.image and image_emb is None and not os.path.isfile(args.image):
        raise FileNotFoundError(f"--image {args.image}: no such file")
    need_model = args.text is not None or (args.image and image_emb is None)
    if need_model:
        from clipjax.evaluate.embed import Encoder
        from clipjax.export.load import load, model_fingerprint

        model_path = args.model or _index_model_path(args, index)
        model, params, preprocess = load(model_path, trust_torchscript=args.trust_torchscript)
        check_compatible(
            index.meta,
            model_fingerprint(model.config, params),
            model.config.embed_dim,
            where=args.index,
        )
        encoder = Encoder(model, params, batch_size=1)
        if args.text is not None:
            from clipjax.data.tokenizer import tokenize

            vectors.append(encoder.texts(tokenize([args.text], model.config.context_length))[0])
        if args.image and image_emb is None:
            from clipjax.search.build import load_image

            vectors.append(encoder.images(load_image(args.image, preprocess)[None])[0])
    if image_emb is not None:
        vectors.append(image_emb)
    q = np.sum(vectors, axis=0)
    return q / np.linalg.norm(q)


def run_query(args: argparse.Namespace) -> None:
    from clipjax.search.index import Index, display_path

    if args.text is None and args.image is None:
        raise ValueError("query: give a text, --image FILE, or both")
    if args.k <= 0:
        raise ValueError(f"-k must be positive, got {args.k}")
    index = Index.load(args.index)
    if len(index) == 0:
        raise ValueError(f"{args.index}: the index is empty")
    query = _encode_queries(args, index)
    start = time.perf_counter()
    scores, ids = index.search(query, args.k)
    ms = 1000 * (time.perf_counter() - start)
    parts = [repr(args.text) if args.text else "", f"image {args.image}" if args.image else ""]
    label = display_path(" + ".join(x for x in parts if x))
    print(f"{label}: top {len(ids)} of {len(index)} images ({ms:.1f} ms)")
    for rank, (s, i) in enumerate(zip(scores, ids), start=1):
        print(f"{rank:4d}  {s:.4f}  {display_path(index.paths[i])}")
    if args.html:
        from clipjax.files import write_text
        from clipjax.search.html import results_page

        results = [(float(s), index.entry(int(i))) for s, i in zip(scores, ids)]
        write_text(args.html, results_page(label, results, args.html))
        print(f"wrote {args.html}")


def main(argv: Sequence[str] | None = None) -> int:
    from clipjax.search.index import IndexBusyError

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        commands = {"index": run_index, "ann": run_ann, "query": run_query, "serve": run_serve}
        commands[args.command](args)
    except (*INPUT_ERRORS, IndexBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
