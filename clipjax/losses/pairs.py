"""Which pairs of a contrastive batch are positives, negatives or left out (false-negative rules).

Plain InfoNCE treats every off-diagonal pair as a negative, which is wrong when a batch holds
several pairs of one category ("a batch all about cats"). The rules here decide, for an anchor row
(an image, or a text) and a candidate column (a text, or an image, of the batch or of the momentum
queue):

- positive: the pair's own partner, or any pair of the same *group* (identical caption tokens, or
  the same label) when group positives are on;
- left out: a candidate that the momentum (EMA) encoders judge a near-duplicate of the anchor's
  positive (cosine above `duplicate_threshold`), every in-batch candidate when in-batch negatives
  are off (MoCo-style: negatives come from the queue only), and queue entries of the anchor's group;
- negative: everything else.

With in-batch negatives off, the in-batch candidates are the momentum encoders' embeddings of the
partners (MoCo's keys), so positives and queue negatives live in one, slowly moving space that
the online encoders cannot leave together: pulling every embedding together no longer pays.

The row loss is `logsumexp(kept logits) - mean(positive logits)`; with one positive per row and
every other pair kept it is the usual InfoNCE row. `batch_homogeneity` measures how clustered a
batch is, so the trainer can say when these rules are needed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Two independent 32-bit polynomial hashes of a token row: equal rows always match; two
# different rows collide with probability ~2^-64 per pair.
_HASH_BASES = (1_000_003, 2_654_435_761)


class PairRules(NamedTuple):
    """The false-negative rules of a softmax contrastive loss (defaults: plain InfoNCE)."""

    group_positives: bool = False  # pairs of equal group (caption / label) are positives
    duplicate_threshold: float | None = None  # EMA cosine above which a negative is left out
    batch_negatives: bool = True  # False: in-batch pairs are never negatives (queue only)

    @property
    def needs_ema(self) -> bool:
        """The rules read the momentum encoders' embeddings of the batch (PairInfo.ema_*)."""
        return self.duplicate_threshold is not None or not self.batch_negatives

    @property
    def plain(self) -> bool:
        return (
            not self.group_positives and self.duplicate_threshold is None and self.batch_negatives
        )


class PairInfo(NamedTuple):
    """Per-pair inputs of the rules, aligned with the batch rows (gradient-free)."""

    group: jax.Array | None = None  # [B, G] int32: equal rows = same group
    ema_image: jax.Array | None = None  # [B, D] momentum-encoder image embeddings
    ema_text: jax.Array | None = None  # [B, D] momentum-encoder text embeddings


def check_pair_info(rules: PairRules, pairs: PairInfo | None, batch: int, queue=None) -> None:
    """Raise ValueError when `pairs` lacks what `rules` read, or shapes disagree."""
    pairs = pairs or PairInfo()
    if rules.group_positives:
        if pairs.group is None or pairs.group.ndim != 2 or pairs.group.shape[0] != batch:
            raise ValueError(
                f"group positives need PairInfo.group [{batch}, G], got "
                f"{None if pairs.group is None else pairs.group.shape}"
            )
        if queue is not None and queue.image.shape[0] and queue.group is None:
            raise ValueError("group positives need a queue with groups (queue_init group_width)")
        if (
            queue is not None
            and queue.group is not None
            and (queue.group.shape[1] != pairs.group.shape[1])
        ):
            raise ValueError(
                f"queue groups have width {queue.group.shape[1]}, the batch's "
                f"{pairs.group.shape[1]}"
            )
    if rules.needs_ema:
        what = "duplicate_threshold" if rules.duplicate_threshold is not None else "queue-only"
        for name in ("ema_image", "ema_text"):
            a = getattr(pairs, name)
            if a is None or a.ndim != 2 or a.shape[0] != batch:
                raise ValueError(
                    f"{what} needs PairInfo.{name} [{batch}, D], got "
                    f"{None if a is None else a.shape}"
                )


def caption_groups(text: jax.Array) -> jax.Array:
    """[B, L] token ids -> [B, 2] int32 hashes; identical captions get identical rows."""
    length = text.shape[-1]
    cols = []
    for base in _HASH_BASES:
        powers = np.array([pow(base, k, 1 << 32) for k in range(length)], np.uint32)
        h = jnp.sum(text.astype(jnp.uint32) * jnp.asarray(powers), axis=-1, dtype=jnp.uint32)
        cols.append(lax.bitcast_convert_type(h, jnp.int32))
    return jnp.stack(cols, axis=-1)


def label_groups(label: jax.Array) -> jax.Array:
    """[B] int labels -> [B, 1] int32 groups."""
    return label.astype(jnp.int32)[:, None]


def same_group(rows: jax.Array, cols: jax.Array) -> jax.Array:
    """[n, G], [m, G] -> [n, m] bool: the two pairs belong to one group."""
    return jnp.all(rows[:, None, :] == cols[None, :, :], axis=-1)


def batch_masks(
    diag: jax.Array, rules: PairRules, group_r=None, group_c=None, dup_r=None, dup_c=None
) -> tuple[jax.Array, jax.Array]:
    """(positive, kept) [n, m] bool masks of anchors vs in-batch candidates.

    `diag` marks each anchor's own partner; `dup_r`/`dup_c` are the EMA embeddings that judge
    near-duplicates (text for image anchors, image for text anchors).
    """
    pos = diag
    if rules.group_positives:
        pos = pos | same_group(group_r, group_c)
    neg = ~pos if rules.batch_negatives else jnp.zeros_like(pos)
    if rules.duplicate_threshold is not None:
        neg = neg & (dup_r @ dup_c.T <= rules.duplicate_threshold)
    return pos, pos | neg


def queue_keep(
    valid: jax.Array, n: int, rules: PairRules, group_r=None, group_q=None, dup_r=None, dup_q=None
) -> jax.Array:
    """[n, k] bool: queue entries that are negatives for each of `n` anchors (filled, not of the
    anchor's group, not a near-duplicate of its positive)."""
    keep = jnp.broadcast_to(valid[None, :], (n, valid.shape[0]))
    if rules.group_positives:
        keep = keep & ~same_group(group_r, group_q)
    if rules.duplicate_threshold is not None:
        keep = keep & (dup_r @ dup_q.T <= rules.duplicate_threshold)
    return keep


def masked_row_losses(logits: jax.Array, pos: jax.Array, keep: jax.Array) -> jax.Array:
    """Per row: logsumexp over kept logits minus the mean positive logit ([n])."""
    lse = jax.nn.logsumexp(jnp.where(keep, logits, -jnp.inf), axis=1)
    n_pos = jnp.sum(pos, axis=1)
    return lse - jnp.sum(jnp.where(pos, logits, 0.0), axis=1) / n_pos


def top1_is_positive(logits: jax.Array, pos: jax.Array) -> jax.Array:
    """[n] bool: the row's highest in-batch logit is one of its positives."""
    return jnp.take_along_axis(pos, jnp.argmax(logits, axis=1)[:, None], axis=1)[:, 0]


def equal_pair_share(keys: jax.Array) -> jax.Array:
    """Share of ordered off-diagonal pairs (i != j) whose key rows [B, G] are equal, by sorting
    (O(B log B), no B x B matrix)."""
    b, g = keys.shape
    cols = lax.sort(tuple(keys[:, i] for i in range(g)), num_keys=g)
    same_prev = jnp.ones((b - 1,), bool)
    for c in cols:
        same_prev = same_prev & (c[1:] == c[:-1])
    idx = jnp.arange(b)
    run_start = lax.cummax(jnp.where(jnp.concatenate([jnp.ones((1,), bool), ~same_prev]), idx, 0))
    # float: b * (b - 1) and the pair count pass int32 beyond a 46k batch
    pairs = jnp.sum((idx - run_start).astype(jnp.float32))
    return 2.0 * pairs / float(max(b * (b - 1), 1))


def mean_offdiag_cosine(emb: jax.Array) -> jax.Array:
    """Mean cosine over ordered off-diagonal pairs of L2-normalised rows [B, D], in O(B D)."""
    b = emb.shape[0]
    emb = emb.astype(jnp.float32)
    total = jnp.sum(emb, axis=0)
    return (total @ total - jnp.sum(emb * emb)) / float(max(b * (b - 1), 1))


def batch_homogeneity(
    text: jax.Array,
    text_embeds: jax.Array,
    label: jax.Array | None = None,
    prev_text_mean: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """How clustered a batch is: shares of off-diagonal pairs with identical captions / equal
    labels, the mean off-diagonal text cosine and (given the previous batch's mean text
    embedding) the same cosine across the two batches, which i.i.d. batches roughly equal."""
    text_embeds = lax.stop_gradient(text_embeds).astype(jnp.float32)
    out = {
        "batch/same_caption": equal_pair_share(caption_groups(text)),
        "batch/text_cos": mean_offdiag_cosine(text_embeds),
    }
    if label is not None:
        out["batch/same_label"] = equal_pair_share(label_groups(label))
    if prev_text_mean is not None:
        out["batch/text_cos_prev"] = jnp.mean(text_embeds, axis=0) @ prev_text_mean
    return out
