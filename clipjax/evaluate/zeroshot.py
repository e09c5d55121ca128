"""Zero-shot classification: prompt-ensembled class embeddings, top-1/top-5 accuracy.

Each class embedding is the mean of its normalised prompt embeddings ("a photo of a {}.", ...),
renormalised. Images are scored against all classes inside one jitted step whose batch is
split over the mesh's batch axes; only the per-class hit counts leave the devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clipjax.evaluate.embed import Encoder, pad_rows, put_replicated
from clipjax.export.modeldir import variables_of
from clipjax.parallel.mesh import batch_axis_size
from clipjax.parallel.placement import to_global

log = logging.getLogger(__name__)

DEFAULT_TOPK = (1, 5)


def format_prompts(classname: str, templates: Sequence[str]) -> list[str]:
    """Fill each template's '{}' with the class name."""
    return [t.replace("{}", classname) for t in templates]


def classifier_weights(
    model: Any,
    params: Mapping[str, Any],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    tokenize: Callable[..., np.ndarray] | None = None,
) -> np.ndarray:
    """Class embeddings [D, C] (float32, unit columns) from a prompt ensemble."""
    if not classnames:
        raise ValueError("zero-shot: no class names given")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("zero-shot: templates must be non-empty strings containing '{}'")
    if tokenize is None:
        from clipjax.data.tokenizer import tokenize
    context_length = int(model.config.context_length)
    encoder = Encoder(model, params, mesh=mesh, batch_size=batch_size)
    prompts = [p for c in classnames for p in format_prompts(c, templates)]
    emb = encoder.texts(tokenize(prompts, context_length=context_length))  # [C*T, D]
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    return np.ascontiguousarray(emb.T, dtype=np.float32)


def topk_hits(logits: jax.Array, labels: jax.Array, ks: Sequence[int]) -> jax.Array:
    """[len(ks), B] bool: whether the label is among each row's k highest logits."""
    kmax = min(max(ks), logits.shape[-1])
    _, top = jax.lax.top_k(logits, kmax)  # [B, kmax]
    hit = top == labels[:, None]
    return jnp.stack([hit[:, : min(k, kmax)].any(axis=-1) for k in ks])


def make_eval_step(model: Any, ks: Sequence[int]) -> Callable:
    """Jitted (params, weights [D,C], images, labels, mask) -> (hits per k [K, C], count [C])."""

    def step(params, weights, images, labels, mask):
        emb = model.apply(variables_of(params), images, method="encode_image").astype(jnp.float32)
        logits = emb @ weights  # [B, C]
        hits = topk_hits(logits, labels, ks) & mask[None, :]  # [K, B]
        num_classes = weights.shape[1]
        per_class_hits = jax.vmap(
            lambda h: jnp.zeros(num_classes, jnp.int32).at[labels].add(h.astype(jnp.int32))
        )(hits)
        per_class_count = jnp.zeros(num_classes, jnp.int32).at[labels].add(mask.astype(jnp.int32))
        return per_class_hits, per_class_count

    return jax.jit(step)


def zeroshot_accuracy(
    model: Any,
    params: Mapping[str, Any],
    batches: Iterable[Mapping[str, Any]],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    mesh: Mesh | None = None,
    ks: Sequence[int] = DEFAULT_TOPK,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Top-k accuracy of zero-shot classification; usable as a periodic training hook.

    Each batch has 'image' [B, H, W, 3] float32 (eval-transformed), 'label' [B] int, and an
    optional 'mask' [B] (padding rows count nothing). Returns {'top1': ..., 'top5': ...,
    'mean_per_class_top1': ..., 'num_examples': ...}. Pass precomputed `weights` [D, C] to
    skip re-encoding the prompts.
    """
    if weights is None:
        weights = classifier_weights(model, params, classnames, templates, mesh=mesh)
    num_classes = weights.shape[1]
    if num_classes != len(classnames):
        raise ValueError(f"classifier has {num_classes} classes, but {len(classnames)} names")
    step = make_eval_step(model, tuple(ks))
    params = put_replicated(params, mesh)
    weights_dev = put_replicated(weights, mesh)
    divisor = max(1, batch_axis_size(mesh) // jax.process_count())
    hits = np.zeros((len(ks), num_classes), np.int64)
    counts = np.zeros(num_classes, np.int64)
    for batch in batches:
        images, labels, mask = _unpack(batch, num_classes)
        rows = -(-images.shape[0] // divisor) * divisor  # pad so the batch splits over the mesh
        h, c = step(
            params,
            weights_dev,
            to_global(pad_rows(images, rows), mesh),
            to_global(pad_rows(labels, rows), mesh),
            to_global(pad_rows(mask, rows), mesh),
        )
        hits += np.asarray(h)
        counts += np.asarray(c)
    return _accuracies(hits, counts, ks)


def _unpack(batch: Mapping[str, Any], num_classes: int) -> tuple[np.ndarray, ...]:
    """A zero-shot batch as (images, labels [B], mask [B]), checked; padding rows get label 0."""
    images = np.asarray(batch["image"], np.float32)
    labels = np.asarray(batch["label"]).astype(np.int32).reshape(-1)
    b = images.shape[0]
    mask = np.asarray(batch.get("mask", np.ones(b, bool))).astype(bool).reshape(-1)
    if labels.shape[0] != b or mask.shape[0] != b:
        raise ValueError(
            f"batch has {b} images but {labels.shape[0]} labels / {mask.shape[0]} mask entries"
        )
    bad = mask & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"label {int(labels[bad][0])} is outside the {num_classes} class "
            f"names; check --classnames matches the dataset"
        )
    return images, np.where(mask, labels, 0), mask


def _accuracies(hits: np.ndarray, counts: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """zeroshot_accuracy's result from per-class hits [len(ks), C] and example counts [C]."""
    total = int(counts.sum())
    if total == 0:
        raise ValueError("zero-shot: the evaluation data produced no (unmasked) examples")
    out = {f"top{k}": float(hits[i].sum() / total) for i, k in enumerate(ks)}
    seen = counts > 0
    out["mean_per_class_top1"] = float((hits[0][seen] / counts[seen]).mean())
    out["num_examples"] = float(total)
    out["num_classes"] = float(len(counts))
    log.info("zero-shot over %d examples: %s", total, out)
    return out
