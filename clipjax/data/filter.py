"""CLIP-score filtering of a pool of image-text shards (DataComp's CLIP-score baselines).

  python -m clipjax.data.filter --model M --shards GLOB --out DIR
      (--min-score S | --top-fraction F) [--dedup COS] [--batch-size N] [--no-progress]

Pass 1 scores every record: the cosine of its image and (first) caption embeddings under model M
(any path `clipjax.load` reads), batched over all local devices by `evaluate.embed.Encoder` on
`EvalPipeline` batches. Each input shard's keys, scores and image embeddings are saved as
`DIR/scores/NNNNN.npz` when the shard is done, so a rerun continues with the first shard not
scored yet (the model's fingerprint must match). Pass 2 decides: scores >= S, or the top
fraction F of all scored records (ties broken by pool order); `--dedup COS` then drops, in score
order, every image whose embedding cosine with an image already kept is >= COS. It writes the
kept records byte for byte (every feature kept) as `DIR/filtered-NNNNN.tfrecord` (input shard i
-> output shard i) with a manifest, and the table of every scored record `DIR/scores.jsonl`
(key, shard, score, kept; also `scores.parquet` when pyarrow is installed), plus
`DIR/kept_uids.npy` (DataComp's sorted `u8,u8` uid array) when every key is a 32-hex-digit uid,
and a summary `DIR/filter.json`.

Keys must be non-empty and unique within a shard (img2dataset and make_shards write them).
Records the pipelines cannot use (corrupt image, empty caption) are not scored and not kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from clipjax.cli import add_verbose_flag, setup_logging
from clipjax.data import schema, writer
from clipjax.data.shards import count_records, dataset_classnames, list_shards
from clipjax.files import atomic_path, write_json, write_text

SCORES_DIR = "scores"
PREFIX = "filtered"
_UID = re.compile(r"^[0-9a-fA-F]{32}$")


class ShardScores:
    """One input shard's scored records: keys [n] (str), scores [n] float32, image embeddings
    [n, D] float16 (normalised)."""

    def __init__(self, keys: np.ndarray, scores: np.ndarray, embeds: np.ndarray):
        self.keys, self.scores, self.embeds = keys, scores, embeds

    def save(self, path: str) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=self.keys.astype(str), scores=self.scores, embeds=self.embeds)

    @classmethod
    def load(cls, path: str) -> ShardScores:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["keys"], z["scores"], z["embeds"])


def _part_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, SCORES_DIR, f"{index:05d}.npz")


def _check_meta(out_dir: str, meta: dict) -> None:
    """Scores already in `out_dir` must come from this model and these shards; else an error."""
    path = os.path.join(out_dir, SCORES_DIR, "meta.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != meta:
            differs = sorted(k for k in meta if old.get(k) != meta[k])
            raise ValueError(
                f"{out_dir} holds scores from another run (different {', '.join(differs)}); "
                "rerun with the same --model and --shards to resume, or use a fresh --out"
            )
    else:
        write_json(path, meta)


def score_shard(encoder, path: str, image_size: int, context_length: int) -> ShardScores:
    """Keys, image-caption cosines and image embeddings of one shard's usable records."""
    from clipjax.data.eval_pipeline import EvalPipeline

    pipe = EvalPipeline(
        path,
        global_batch=encoder.batch_size,
        image_size=image_size,
        context_length=context_length,
        process_index=0,
        process_count=1,
    )
    keys, scores, embeds = [], [], []
    for batch in pipe:
        rows = np.flatnonzero(batch["mask"])
        if not rows.size:
            continue
        img = encoder.images(batch["image"][rows])
        txt = encoder.texts(batch["text"][rows])
        keys.extend(batch["key"][rows].tolist())
        scores.append(np.sum(img * txt, axis=1))
        embeds.append(img.astype(np.float16))
    missing = [i for i, k in enumerate(keys) if not k]
    if missing:
        raise ValueError(
            f"{path}: record {missing[0]} has no key; filtering needs a unique 'key' per record"
        )
    unique, counts = np.unique(np.asarray(keys, dtype=str), return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"{path}: key {unique[counts > 1][0]!r} is on {counts.max()} records; filtering "
            "needs a unique 'key' per record within a shard"
        )
    d = encoder.embed_dim
    return ShardScores(
        np.asarray(keys, dtype=str),
        np.concatenate(scores) if scores else np.zeros(0, np.float32),
        np.concatenate(embeds) if embeds else np.zeros((0, d), np.float16),
    )


def score_pool(
    model,
    params,
    files: Sequence[str],
    out_dir: str,
    *,
    fingerprint: str,
    batch_size: int = 256,
    progress: bool = True,
) -> list[ShardScores]:
    """Pass 1: every shard's scores, from `out_dir/scores` where saved, else computed (and
    saved when the shard is done)."""
    from tqdm.auto import tqdm

    from clipjax.evaluate.embed import Encoder
    from clipjax.parallel.mesh import make_mesh

    _check_meta(out_dir, {"model": fingerprint, "shards": [os.path.abspath(f) for f in files]})
    encoder = None
    out = []
    for index, path in enumerate(tqdm(files, unit="shard", desc="scoring", disable=not progress)):
        part = _part_path(out_dir, index)
        if os.path.exists(part):
            out.append(ShardScores.load(part))
            continue
        if encoder is None:
            encoder = Encoder(model, params, mesh=make_mesh(), batch_size=batch_size)
        cfg = model.config
        scores = score_shard(encoder, path, cfg.image_size, cfg.context_length)
        scores.save(part)
        out.append(scores)
    return out


def select(
    scores: np.ndarray,
    *,
    min_score: float | None = None,
    top_fraction: float | None = None,
    embeds: np.ndarray | None = None,
    dedup: float | None = None,
) -> np.ndarray:
    """Pass 2's decision: a keep mask [N] over the pool's scores (in pool order)."""
    n = scores.shape[0]
    if (min_score is None) == (top_fraction is None):
        raise ValueError("give exactly one of min_score and top_fraction")
    if min_score is not None:
        keep = scores >= min_score
    else:
        k = min(n, int(math.floor(top_fraction * n + 0.5)))
        keep = np.zeros(n, bool)
        keep[np.argsort(-scores, kind="stable")[:k]] = True
    return keep if dedup is None else deduplicated(keep, scores, embeds, dedup)


def deduplicated(keep: np.ndarray, scores: np.ndarray, embeds: np.ndarray, threshold: float):
    """`keep` less its near-duplicate images, best score first (see near_duplicate_free)."""
    order = np.flatnonzero(keep)
    order = order[np.argsort(-scores[order], kind="stable")]
    out = np.zeros_like(keep)
    out[near_duplicate_free(embeds, order, threshold)] = True
    return out


def near_duplicate_free(
    embeds: np.ndarray, order: np.ndarray, threshold: float, block: int = 1024
) -> np.ndarray:
    """The indices of `order` kept by a greedy pass in that order: one is dropped when its
    embedding's cosine with one already kept is >= `threshold`."""
    emb = np.asarray(embeds, np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    kept: list[np.ndarray] = []
    kept_emb = np.zeros((0, emb.shape[1]), np.float32)
    for start in range(0, len(order), block):
        idx = order[start : start + block]
        e = emb[idx]
        ok = np.ones(len(idx), bool)
        if kept_emb.shape[0]:
            ok = (e @ kept_emb.T).max(axis=1) < threshold
        inner = e @ e.T
        for i in range(len(idx)):
            if ok[i]:
                ok[i + 1 :] &= inner[i, i + 1 :] < threshold
        kept.append(idx[ok])
        kept_emb = np.concatenate([kept_emb, e[ok]])
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def _kept_records(path: str, keep: set[str]) -> Iterator[bytes]:
    """The serialized records of shard `path` whose key is in `keep`, in shard order."""
    import tensorflow as tf

    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        example = tf.train.Example.FromString(record)
        key = example.features.feature[schema.KEY].bytes_list.value
        if key and key[0].decode("utf-8", "replace") in keep:
            yield record


def write_table(
    out_dir: str, files: Sequence[str], parts: list[ShardScores], kept_per_shard
) -> list[str]:
    """scores.jsonl (and .parquet with pyarrow) of every scored record (`kept_per_shard`: each
    shard's keep mask); kept_uids.npy when the keys are uids. Returns the files written."""
    rows = []
    for path, part, kept in zip(files, parts, kept_per_shard):
        rows += [
            {"key": k, "shard": path, "score": round(float(s), 6), "kept": bool(c)}
            for k, s, c in zip(part.keys.tolist(), part.scores.tolist(), kept.tolist())
        ]
    written = [os.path.join(out_dir, "scores.jsonl")]
    write_text(written[0], "".join(json.dumps(r) + "\n" for r in rows))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = None
    if pa is not None:
        written.append(os.path.join(out_dir, "scores.parquet"))
        with atomic_path(written[-1]) as tmp:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
    if rows and all(_UID.match(r["key"]) for r in rows):
        uids = sorted((int(r["key"][:16], 16), int(r["key"][16:], 16)) for r in rows if r["kept"])
        written.append(os.path.join(out_dir, "kept_uids.npy"))
        with atomic_path(written[-1]) as tmp, open(tmp, "wb") as f:
            np.save(f, np.array(uids, np.dtype("u8,u8")))
    return written


def run_filter(
    model_path: str,
    shards: str | Sequence[str],
    out_dir: str,
    *,
    min_score: float | None = None,
    top_fraction: float | None = None,
    dedup: float | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict:
    """Score (resumably), select, write; returns the summary also saved as filter.json."""
    import jax

    from clipjax.export.load import load, model_fingerprint

    _check_thresholds(min_score, top_fraction, dedup, batch_size)
    if jax.process_count() > 1:
        raise ValueError("clipjax.data.filter runs in one process (over all its local devices)")
    files = list_shards(shards)
    model, params, _ = load(model_path)
    parts = score_pool(
        model,
        params,
        files,
        out_dir,
        fingerprint=model_fingerprint(model.config, params),
        batch_size=batch_size,
        progress=progress,
    )
    scores = np.concatenate([p.scores for p in parts])
    embeds = np.concatenate([p.embeds for p in parts]) if dedup is not None else None
    by_score = select(scores, min_score=min_score, top_fraction=top_fraction)
    keep = by_score if dedup is None else deduplicated(by_score, scores, embeds, dedup)
    per_shard = np.split(keep, np.cumsum([len(p.scores) for p in parts])[:-1])
    kept_keys = [set(p.keys[k].tolist()) for p, k in zip(parts, per_shard)]
    manifest = writer.write_record_shards(
        (_kept_records(path, k) for path, k in zip(files, kept_keys)),
        out_dir,
        source={
            "kind": "filter",
            "model": model_path,
            "shards": [os.path.abspath(f) for f in files],
        },
        prefix=PREFIX,
        classnames=dataset_classnames(files),
    )
    table = write_table(out_dir, files, parts, per_shard)
    total = count_records(files)
    summary = {
        "model": model_path,
        "shards": len(files),
        "records": total,
        "scored": int(scores.size),
        "unusable": int(total - scores.size),
        "kept_by_score": int(by_score.sum()),
        "near_duplicates_dropped": int(by_score.sum() - keep.sum()),
        "kept": int(manifest["num_examples"]),
        "min_score": min_score,
        "top_fraction": top_fraction,
        "dedup": dedup,
        "lowest_kept_score": float(scores[keep].min()) if keep.any() else None,
        "files": [os.path.basename(f) for f in table],
    }
    write_json(os.path.join(out_dir, "filter.json"), summary)
    return summary


def _check_thresholds(min_score, top_fraction, dedup, batch_size) -> None:
    if (min_score is None) == (top_fraction is None):
        raise ValueError("give exactly one of --min-score and --top-fraction")
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise ValueError(f"--min-score {min_score}: expected a cosine in [-1, 1]")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"--top-fraction {top_fraction}: expected a fraction in (0, 1]")
    if dedup is not None and not 0.0 < dedup <= 1.0:
        raise ValueError(f"--dedup {dedup}: expected a cosine in (0, 1]")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clipjax.data.filter",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model dir, HF CLIP dir, workdir, state dict")
    p.add_argument("--shards", required=True, help="glob(s) of the pool's TFRecord shards")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--min-score", type=float, help="keep records with cosine >= this")
    how.add_argument("--top-fraction", type=float, help="keep this fraction, best scores first")
    p.add_argument("--dedup", type=float, help="drop images with cosine >= this to a kept one")
    p.add_argument("--batch-size", type=int, default=256, help="records embedded per batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        summary = run_filter(
            args.model,
            args.shards,
            args.out,
            min_score=args.min_score,
            top_fraction=args.top_fraction,
            dedup=args.dedup,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"kept {summary['kept']} of {summary['scored']} scored records "
        f"({summary['unusable']} unusable, {summary['near_duplicates_dropped']} near-duplicates "
        f"dropped) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
