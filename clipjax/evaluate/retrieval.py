"""Image<->text retrieval recall@K, with several captions per image.

image->text: an image is a hit at K if any of its captions ranks in the top K texts.
text->image: a caption is a hit at K if its own image ranks in the top K images.
Ranks count strictly better scores, so ties resolve in favour of the right answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from clipjax.evaluate.embed import Encoder

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)


def retrieval_metrics(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways from normalised embeddings.

    image_embeds [N, D], text_embeds [M, D], text_to_image [M] (index of each caption's image).
    Returns {'image_to_text/R@1': ..., 'text_to_image/R@1': ..., ...} as fractions in [0, 1].
    """
    image_embeds = np.asarray(image_embeds, np.float32)
    text_embeds = np.asarray(text_embeds, np.float32)
    text_to_image = np.asarray(text_to_image, np.int64)
    n, m = image_embeds.shape[0], text_embeds.shape[0]
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image has shape {text_to_image.shape}, expected ({m},)")
    if m and (text_to_image.min() < 0 or text_to_image.max() >= n):
        raise ValueError(f"text_to_image must index the {n} images")
    if n == 0 or m == 0:
        raise ValueError(f"retrieval needs at least one image and one caption (got {n} and {m})")
    has_caption = np.bincount(text_to_image, minlength=n) > 0
    if not has_caption.all():
        raise ValueError(f"{int((~has_caption).sum())} of {n} images have no caption")

    # image -> text: rank of the best-scoring own caption among all captions.
    i2t_rank = np.empty(n, np.int64)
    for start in range(0, n, chunk):
        sims = image_embeds[start : start + chunk] @ text_embeds.T  # [c, M]
        rows = np.arange(start, min(start + chunk, n))
        own = text_to_image[None, :] == rows[:, None]  # [c, M]
        best_own = np.where(own, sims, -np.inf).max(axis=1)
        i2t_rank[start : start + chunk] = (sims > best_own[:, None]).sum(axis=1)

    # text -> image: rank of the caption's own image among all images.
    t2i_rank = np.empty(m, np.int64)
    for start in range(0, m, chunk):
        sims = text_embeds[start : start + chunk] @ image_embeds.T  # [c, N]
        own_score = sims[np.arange(sims.shape[0]), text_to_image[start : start + chunk]]
        t2i_rank[start : start + chunk] = (sims > own_score[:, None]).sum(axis=1)

    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text/R@{k}"] = float((i2t_rank < k).mean())
        out[f"text_to_image/R@{k}"] = float((t2i_rank < k).mean())
    out["num_images"] = float(n)
    out["num_texts"] = float(m)
    return out


def retrieval_recall(
    model: Any,
    params: Mapping[str, Any],
    batches: Iterable[Mapping[str, Any]],
    *,
    mesh: Mesh | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Embed an eval set and compute recall@K both ways; usable as a periodic training hook.

    Each batch has 'image' [B, H, W, 3] float32 and 'text' int32 token ids, either [B, L]
    (one caption per row) or [B, C, L] (up to C captions; all-zero rows are absent captions);
    'texts' [B, C, L], where present, is used instead (EvalPipeline's every caption of a record).
    Optional: 'mask' [B] marks real rows (padding counts nothing); 'key' [B] (str) names the
    image of each row, so rows sharing a key are several captions of one image (the layout of
    clipjax.data's EvalPipeline). Rows without a key are distinct images.
    """
    encoder: Encoder | None = None
    image_embs, text_embs, owners = [], [], []
    key_to_image: dict[Any, int] = {}
    n_images = 0
    for batch in batches:
        images, text, mask, keys = _unpack(batch)
        if encoder is None:
            encoder = Encoder(model, params, mesh=mesh, batch_size=batch_size or len(mask))
        row_image, new_rows = _image_of_rows(mask, keys, key_to_image, n_images)
        if new_rows:
            image_embs.append(encoder.images(images[new_rows]))
            n_images += len(new_rows)
        rows, caps = np.nonzero((text != 0).any(axis=-1) & mask[:, None])  # present captions
        if rows.size:
            text_embs.append(encoder.texts(text[rows, caps]))
            owners.append(row_image[rows])
    if encoder is None or n_images == 0:
        raise ValueError("retrieval: the evaluation data produced no examples")
    if not text_embs:
        raise ValueError("retrieval: the evaluation data has no captions")
    metrics = retrieval_metrics(
        np.concatenate(image_embs), np.concatenate(text_embs), np.concatenate(owners), ks=ks
    )
    log.info(
        "retrieval over %d images / %d captions: %s",
        n_images,
        int(metrics["num_texts"]),
        {k: round(v, 4) for k, v in metrics.items() if "R@" in k},
    )
    return metrics


def _unpack(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """A retrieval batch as (images, text [B, C, L], mask [B] bool, keys [B] or Nones)."""
    images = np.asarray(batch["image"])
    text = np.asarray(batch["texts"] if "texts" in batch else batch["text"])
    b = images.shape[0]
    mask = np.asarray(batch.get("mask", np.ones(b, bool))).astype(bool)
    keys = batch.get("key")
    keys = [None] * b if keys is None else [_key(k) for k in np.asarray(keys).tolist()]
    if text.ndim == 2:
        text = text[:, None, :]
    if text.ndim != 3 or text.shape[0] != b:
        raise ValueError(
            f"batch 'text(s)' has shape {text.shape}; expected [B, L] or [B, C, L] with B = {b}"
        )
    return images, text, mask, keys


def _image_of_rows(
    mask: np.ndarray, keys: list, key_to_image: dict[Any, int], n_images: int
) -> tuple[np.ndarray, list[int]]:
    """(image index of each row, -1 for padding; the rows holding images not seen before).
    Rows sharing a key share an image; `key_to_image` is updated with the new keys."""
    new_rows, row_image = [], np.full(len(mask), -1, np.int64)
    for i in np.flatnonzero(mask):
        if keys[i] is not None and keys[i] in key_to_image:
            row_image[i] = key_to_image[keys[i]]
            continue
        row_image[i] = n_images + len(new_rows)
        new_rows.append(i)
        if keys[i] is not None:
            key_to_image[keys[i]] = row_image[i]
    return row_image, new_rows


def _key(k: Any) -> Any:
    """A hashable image key, or None for 'no key' (empty string / bytes)."""
    if isinstance(k, bytes):
        k = k.decode("utf-8", "replace")
    return None if k in ("", None) else k
