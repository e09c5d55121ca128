"""Image search over an embedding index.

  python -m clipjax.search index --model PATH --images DIR|GLOB --out INDEX [--float16]
  python -m clipjax.search query --index INDEX --model PATH "a text" [--image FILE] -k 10
      [--html OUT.html]

`index` is resumable and incremental: re-running it continues a killed run or adds new files.
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
    ix.add_argument("--images", required=True, help="directory (recursive) or glob of images")
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
    add_trust_flag(ix)
    add_verbose_flag(ix)
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
    return p


def run_index(args: argparse.Namespace) -> None:
    from clipjax.export.load import load, model_fingerprint
    from clipjax.search.build import build_index, list_images

    if args.batch_size <= 0 or args.chunk_size <= 0:
        raise ValueError("--batch-size and --chunk-size must be positive")
    paths = list_images(args.images)  # fails fast, before the model is loaded
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

        results = [(float(s), index.paths[i]) for s, i in zip(scores, ids)]
        write_text(args.html, results_page(label, results, args.html))
        print(f"wrote {args.html}")


def main(argv: Sequence[str] | None = None) -> int:
    from clipjax.search.index import IndexBusyError

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        run_index(args) if args.command == "index" else run_query(args)
    except (*INPUT_ERRORS, IndexBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
