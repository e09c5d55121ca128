"""Symmetric softmax InfoNCE: the full-matrix reference and the all-gather implementation.

Both take L2-normalised embeddings [B, D] and the *log* temperature `logit_scale`, and return
`(loss, aux)` with aux = {'i2t_acc', 't2i_acc'} (top-1 within the batch, queue excluded).
An optional momentum `QueueState` adds its filled entries as extra negatives in both directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from clipjax.losses.common import (BATCH_AXES, as_axes, batch_axis_size, check_divisible,
                                   check_pair, queue_mask)
from clipjax.losses.queue import QueueState


def _ce_rows(logits: jax.Array, diag: jax.Array) -> jax.Array:
    """Sum over rows of cross-entropy with the positive logit `diag`."""
    return (jax.nn.logsumexp(logits, axis=1) - diag).sum()


def infonce_reference(img: jax.Array, txt: jax.Array, logit_scale: jax.Array,
                      queue: QueueState | None = None) -> tuple[jax.Array, dict]:
    """Oracle: the full B x B logit matrix on global arrays (small B only)."""
    check_pair(img, txt)
    img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
    b = img.shape[0]
    s = jnp.exp(logit_scale)
    logits = s * img @ txt.T  # [B, B], rows = images
    diag = jnp.diagonal(logits)
    i2t, t2i = logits, logits.T
    if queue is not None and queue.image.shape[0] > 0:
        mask = queue_mask(queue)[None, :]
        q_img, q_txt = lax.stop_gradient(queue.image), lax.stop_gradient(queue.text)
        i2t = jnp.concatenate([i2t, jnp.where(mask, s * img @ q_txt.T, -jnp.inf)], axis=1)
        t2i = jnp.concatenate([t2i, jnp.where(mask, s * txt @ q_img.T, -jnp.inf)], axis=1)
    loss = (_ce_rows(i2t, diag) + _ce_rows(t2i, diag)) / (2 * b)
    target = jnp.arange(b)
    aux = {"i2t_acc": jnp.mean(jnp.argmax(logits, axis=1) == target),
           "t2i_acc": jnp.mean(jnp.argmax(logits, axis=0) == target)}
    return loss, aux


def _gathered_body(x, y, logit_scale, *queue, axes):
    # x, y: [b, D] local rows; queue (optional): q_img, q_txt [k, D] and mask [k] local shards.
    b = x.shape[0]
    s = jnp.exp(logit_scale)
    # All-gather the embeddings (never logits); the transpose in backward is a reduce-scatter.
    all_x = lax.all_gather(x, axes, tiled=True)  # [B, D]
    all_y = lax.all_gather(y, axes, tiled=True)  # [B, D]
    i2t = s * x @ all_y.T  # [b, B]: my images vs all texts
    t2i = s * y @ all_x.T  # [b, B]: my texts vs all images
    diag = s * jnp.sum(x * y, axis=1)
    target = lax.axis_index(axes) * b + jnp.arange(b)
    correct_i2t = jnp.sum(jnp.argmax(i2t, axis=1) == target)
    correct_t2i = jnp.sum(jnp.argmax(t2i, axis=1) == target)
    if queue:
        q_img, q_txt, mask = (lax.all_gather(a, axes, tiled=True) for a in queue)
        i2t = jnp.concatenate([i2t, jnp.where(mask[None], s * x @ q_txt.T, -jnp.inf)], axis=1)
        t2i = jnp.concatenate([t2i, jnp.where(mask[None], s * y @ q_img.T, -jnp.inf)], axis=1)
    part = _ce_rows(i2t, diag) + _ce_rows(t2i, diag)
    return part[None], correct_i2t[None], correct_t2i[None]


def infonce_gathered(img: jax.Array, txt: jax.Array, logit_scale: jax.Array, mesh: Mesh,
                     batch_axes: str | Sequence[str] = BATCH_AXES,
                     queue: QueueState | None = None) -> tuple[jax.Array, dict]:
    """shard_map over the batch axes; each shard all-gathers both modalities and computes its
    b x B rows in both directions. Per-shard memory O(b * B)."""
    check_pair(img, txt)
    axes = as_axes(batch_axes)
    n = batch_axis_size(mesh, axes)
    b_global = img.shape[0]
    check_divisible(b_global, n, "global batch size")
    args = [img.astype(jnp.float32), txt.astype(jnp.float32), jnp.asarray(logit_scale, jnp.float32)]
    if queue is not None and queue.image.shape[0] > 0:
        check_divisible(queue.image.shape[0], n, "queue size")
        args += [lax.stop_gradient(queue.image), lax.stop_gradient(queue.text), queue_mask(queue)]
    spec = P(axes)
    fn = jax.shard_map(partial(_gathered_body, axes=axes), mesh=mesh,
                       in_specs=(spec, spec, P()) + (spec,) * (len(args) - 3),
                       out_specs=(spec, spec, spec))
    part, c_i2t, c_t2i = fn(*args)
    loss = part.sum() / (2 * b_global)
    return loss, {"i2t_acc": c_i2t.sum() / b_global, "t2i_acc": c_t2i.sum() / b_global}
