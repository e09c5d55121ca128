"""Symmetric softmax InfoNCE: the full-matrix reference and the all-gather implementation.

Both take L2-normalised embeddings [B, D] and the *log* temperature `logit_scale`, and return
`(loss, aux)` with aux = {'i2t_acc', 't2i_acc'} (top-1 within the batch is a positive; queue
excluded). An optional momentum `QueueState` adds its filled entries as extra negatives in both
directions. `rules` + `pairs` (clipjax.losses.pairs) turn on the false-negative rules: group
positives, near-duplicate masking by the EMA encoders, queue-only negatives (MoCo-style: the
positive keys are then the momentum encoders' embeddings of the partners, as the queue's are).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clipjax.losses.common import (
    BATCH_AXES,
    as_axes,
    batch_axis_size,
    check_divisible,
    check_pair,
    queue_mask,
)
from clipjax.losses.pairs import (
    PairInfo,
    PairRules,
    batch_masks,
    check_pair_info,
    masked_row_losses,
    queue_keep,
    top1_is_positive,
)
from clipjax.losses.queue import QueueState


def _ce_rows(logits: jax.Array, diag: jax.Array) -> jax.Array:
    """Sum over rows of cross-entropy with the positive logit `diag`."""
    return (jax.nn.logsumexp(logits, axis=1) - diag).sum()


def _directions(x, y, all_x, all_y, s, row0, rules, pair, all_pair, queue):
    """Sum of the row losses of both directions and the top-1 hits, for local anchor rows
    `x`/`y` [b, D] (global rows row0 .. row0+b) against all candidates `all_x`/`all_y` [B, D].

    `pair`/`all_pair`: (group, ema_image, ema_text) of the local / all rows (entries may be
    None); `queue`: (q_image, q_text, q_group, valid) or None.
    """
    b, n = x.shape[0], all_x.shape[0]
    diag = (row0 + jnp.arange(b))[:, None] == jnp.arange(n)[None, :]
    total, hits = jnp.zeros((), jnp.float32), []
    if not rules.batch_negatives:  # MoCo-style: positive keys from the momentum encoders
        all_x, all_y = all_pair[1], all_pair[2]
    # i2t: image anchors, text candidates, duplicates judged on the texts; t2i the other way.
    for anchor, cands, dup_i, q_i in ((x, all_y, 2, 1), (y, all_x, 1, 0)):
        logits = s * anchor @ cands.T  # [b, B]
        if rules.plain and queue is None:
            total += _ce_rows(logits, jnp.sum(logits * diag, axis=1))
            hits.append(jnp.argmax(logits, axis=1) == row0 + jnp.arange(b))
            continue
        pos, keep = batch_masks(diag, rules, pair[0], all_pair[0], pair[dup_i], all_pair[dup_i])
        hits.append(top1_is_positive(logits, pos))
        if queue is not None:
            q_emb, q_group, valid = queue[q_i], queue[2], queue[3]
            keep = jnp.concatenate(
                [keep, queue_keep(valid, b, rules, pair[0], q_group, pair[dup_i], q_emb)], axis=1
            )
            pos = jnp.concatenate([pos, jnp.zeros_like(keep[:, n:])], axis=1)
            logits = jnp.concatenate([logits, s * anchor @ q_emb.T], axis=1)
        total += jnp.sum(masked_row_losses(logits, pos, keep))
    return total, hits


def _queue_args(queue: QueueState | None):
    if queue is None or queue.image.shape[0] == 0:
        return None
    return (
        lax.stop_gradient(queue.image).astype(jnp.float32),
        lax.stop_gradient(queue.text).astype(jnp.float32),
        queue.group,
        queue_mask(queue),
    )


def _pair_args(pairs: PairInfo | None) -> tuple:
    pairs = pairs or PairInfo()
    return tuple(None if a is None else lax.stop_gradient(a) for a in pairs)


def infonce_reference(
    img: jax.Array,
    txt: jax.Array,
    logit_scale: jax.Array,
    queue: QueueState | None = None,
    rules: PairRules = PairRules(),
    pairs: PairInfo | None = None,
) -> tuple[jax.Array, dict]:
    """Oracle: the full B x B logit matrix on global arrays (small B only)."""
    check_pair(img, txt)
    check_pair_info(rules, pairs, img.shape[0], queue)
    img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
    b = img.shape[0]
    pair = _pair_args(pairs)
    total, (hit_i2t, hit_t2i) = _directions(
        img, txt, img, txt, jnp.exp(logit_scale), 0, rules, pair, pair, _queue_args(queue)
    )
    return total / (2 * b), {"i2t_acc": jnp.mean(hit_i2t), "t2i_acc": jnp.mean(hit_t2i)}


def _gathered_body(x, y, logit_scale, pair, queue, *, axes, rules):
    # x, y: [b, D] local rows; pair: local (group, ema_image, ema_text); queue: local shards.
    b = x.shape[0]
    gather = partial(lax.all_gather, axis_name=axes, tiled=True)
    # All-gather the embeddings (never logits); the transpose in backward is a reduce-scatter.
    all_x, all_y = gather(x), gather(y)  # [B, D]
    all_pair = tuple(None if a is None else gather(a) for a in pair)
    if queue is not None:
        queue = tuple(None if a is None else gather(a) for a in queue)
    total, (hit_i2t, hit_t2i) = _directions(
        x,
        y,
        all_x,
        all_y,
        jnp.exp(logit_scale),
        lax.axis_index(axes) * b,
        rules,
        pair,
        all_pair,
        queue,
    )
    return total[None], jnp.sum(hit_i2t)[None], jnp.sum(hit_t2i)[None]


def infonce_gathered(
    img: jax.Array,
    txt: jax.Array,
    logit_scale: jax.Array,
    mesh: Mesh,
    batch_axes: str | Sequence[str] = BATCH_AXES,
    queue: QueueState | None = None,
    rules: PairRules = PairRules(),
    pairs: PairInfo | None = None,
) -> tuple[jax.Array, dict]:
    """shard_map over the batch axes; each shard all-gathers both modalities (and the pair
    info) and computes its b x B rows in both directions. Per-shard memory O(b * B)."""
    check_pair(img, txt)
    check_pair_info(rules, pairs, img.shape[0], queue)
    axes = as_axes(batch_axes)
    n = batch_axis_size(mesh, axes)
    b_global = img.shape[0]
    check_divisible(b_global, n, "global batch size")
    q = _queue_args(queue)
    if q is not None:
        check_divisible(q[0].shape[0], n, "queue size")
    spec = P(axes)
    pair = _pair_args(pairs)
    specs = lambda tree: jax.tree.map(lambda _: spec, tree)  # noqa: E731
    fn = jax.shard_map(
        partial(_gathered_body, axes=axes, rules=rules),
        mesh=mesh,
        in_specs=(spec, spec, P(), specs(pair), specs(q)),
        out_specs=(spec, spec, spec),
    )
    part, c_i2t, c_t2i = fn(
        img.astype(jnp.float32),
        txt.astype(jnp.float32),
        jnp.asarray(logit_scale, jnp.float32),
        pair,
        q,
    )
    loss = part.sum() / (2 * b_global)
    return loss, {"i2t_acc": c_i2t.sum() / b_global, "t2i_acc": c_t2i.sum() / b_global}
