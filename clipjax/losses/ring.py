"""Ring (blockwise) softmax InfoNCE: no shard ever holds more than a [tile, b] block of logits.

Images stay put; text blocks rotate one shard per step with `ppermute`. Each shard keeps an online
(max, sum-exp) state for its image rows (image->text), while the state of the text columns
(text->image) travels with the text block and arrives home after the last step, so one rotation
yields both directions. A custom VJP stores only embeddings and the two [B] log-sum-exps, and the
backward pass recomputes each block in a second ring pass (dtext accumulators travel with the
block). Communication per shard: forward (n-1)·b·D + n·3b floats, backward (2n-1)·b·D + n·b.

With false-negative rules (clipjax.losses.pairs) a second, masked path runs: the block's pair info
(groups, EMA embeddings) and its queue shard's groups travel with it, each block's positive and
kept masks are built in forward and rebuilt in backward, and both directions also accumulate
positive counts and positive logit sums (rows at home, columns travelling). With in-batch
negatives off, the rows' candidates are the travelling block's EMA texts and the columns' the
resident EMA images (MoCo's keys), so the two directions have separate logit blocks. Plain rules
take the unmasked path above, unchanged.
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
    block_lse,
    check_divisible,
    check_pair,
    from_tiles,
    lse_combine,
    queue_mask,
    ring_perm,
    tile_size,
    to_tiles,
)
from clipjax.losses.pairs import PairInfo, PairRules, batch_masks, check_pair_info, queue_keep
from clipjax.losses.queue import QueueState


def _permute(tree, axes, n):
    if n == 1:
        return tree
    return jax.tree.map(lambda a: lax.ppermute(a, axes, ring_perm(n)), tree)


def _rotate(n, step, carry, rotating, axes):
    """Run `step(carry, rotating)` n times, rotating `rotating[0]` (the block) n-1 times and the
    travelling accumulators `rotating[1]` n times so they end at their owner."""

    def body(_, c):
        carry, rot = c
        carry, acc = step(carry, rot)
        return carry, _permute((rot[0], acc), axes, n)

    carry, rot = lax.fori_loop(0, n - 1, body, (carry, rotating))
    carry, acc = step(carry, rot)
    return carry, _permute(acc, axes, n)


def _fwd_block(x, row, blk, col, q_img, s, t):
    """One text block against this shard's images (tiled over image rows).

    row: (m, l, m_batch) [b] for my image rows; col: same for the visiting text columns.
    blk: (y [b, D], q_txt [k, D] | None, q_txt_mask [k] | None); q_img: (q_img, mask) | None.
    """
    y, q_txt, q_txt_mask = blk

    def row_tile(col, inp):
        x_t, (m, l, mb) = inp
        sim = s * x_t @ y.T  # [t, b]
        mb = jnp.maximum(mb, sim.max(1))
        sim_rows = sim
        if q_txt is not None:
            sim_q = jnp.where(q_txt_mask[None], s * x_t @ q_txt.T, -jnp.inf)
            sim_rows = jnp.concatenate([sim, sim_q], axis=1)
        m, l = lse_combine(m, l, *block_lse(sim_rows, 1))
        cm, cl, cmb = col
        cm, cl = lse_combine(cm, cl, *block_lse(sim, 0))
        return (cm, cl, jnp.maximum(cmb, sim.max(0))), (m, l, mb)

    row_tiles = jax.tree.map(lambda a: to_tiles(a, t), row)
    col, row_t = lax.scan(row_tile, col, (to_tiles(x, t), row_tiles))
    row = jax.tree.map(from_tiles, row_t)
    if q_img is not None:  # my queue images are extra rows for the visiting text columns
        qi, qi_mask = q_img
        tq = tile_size(qi.shape[0], t)

        def q_tile(col, inp):
            qi_t, mask_t = inp
            sim_q = jnp.where(mask_t[:, None], s * qi_t @ y.T, -jnp.inf)  # [tq, b]
            cm, cl, cmb = col
            cm, cl = lse_combine(cm, cl, *block_lse(sim_q, 0))
            return (cm, cl, cmb), None

        col, _ = lax.scan(q_tile, col, (to_tiles(qi, tq), to_tiles(qi_mask, tq)))
    return row, col


def _bwd_block(x, lse_r, dx, blk, lse_c, dy, q_img, s, t):
    """Gradient contributions of one block: returns (dx, dls), (dy) accumulators (unscaled)."""
    y, q_txt, q_txt_mask = blk

    def row_tile(carry, inp):
        dy, dls = carry
        x_t, lse_t, dx_t = inp
        sim = s * x_t @ y.T  # [t, b], recomputed
        g = jnp.exp(sim - lse_t[:, None]) + jnp.exp(sim - lse_c[None, :])  # softmax rows + cols
        dx_t = dx_t + g @ y
        dy = dy + g.T @ x_t
        dls = dls + jnp.sum(g * sim)
        if q_txt is not None:
            sim_q = s * x_t @ q_txt.T
            p_q = jnp.where(q_txt_mask[None], jnp.exp(sim_q - lse_t[:, None]), 0.0)
            dx_t = dx_t + p_q @ q_txt
            dls = dls + jnp.sum(p_q * sim_q)
        return (dy, dls), dx_t

    (dy, dls), dx_t = lax.scan(
        row_tile,
        (dy, jnp.zeros((), jnp.float32)),
        (to_tiles(x, t), to_tiles(lse_r, t), to_tiles(dx, t)),
    )
    dx = from_tiles(dx_t)
    if q_img is not None:
        qi, qi_mask = q_img
        tq = tile_size(qi.shape[0], t)

        def q_tile(carry, inp):
            dy, dls = carry
            qi_t, mask_t = inp
            sim_q = s * qi_t @ y.T  # [tq, b]
            q_q = jnp.where(mask_t[:, None], jnp.exp(sim_q - lse_c[None, :]), 0.0)
            return (dy + q_q.T @ qi_t, dls + jnp.sum(q_q * sim_q)), None

        (dy, dls_q), _ = lax.scan(
            q_tile, (dy, jnp.zeros((), jnp.float32)), (to_tiles(qi, tq), to_tiles(qi_mask, tq))
        )
        dls = dls + dls_q
    return dx, dls, dy


def _split_queue(queue):
    """(travelling (q_text, mask), resident (q_image, mask)) shards of the plain path's queue
    (q_image, q_text, mask), or Nones for the empty tuple (no queue)."""
    if not queue:
        return (None, None), None
    q_img, q_txt, mask = queue
    return (q_txt, mask), (q_img, mask)


def _ring_fwd_body(x, y, logit_scale, queue, *, axes, n, tile):
    """Plain forward ring on one shard -> (part, (lse_r, lse_c), c_i2t, c_t2i)."""
    b = x.shape[0]
    s = jnp.exp(logit_scale)
    t = tile_size(b, tile)
    (q_txt, q_txt_mask), q_img = _split_queue(queue)
    init = (jnp.full((b,), -jnp.inf), jnp.zeros((b,)), jnp.full((b,), -jnp.inf))

    def step(row, rot):
        blk, col = rot
        return _fwd_block(x, row, blk, col, q_img, s, t)

    row, col = _rotate(n, step, init, ((y, q_txt, q_txt_mask), init), axes)
    lse_r = row[0] + jnp.log(row[1])
    lse_c = col[0] + jnp.log(col[1])
    diag = s * jnp.sum(x * y, axis=1)
    part = jnp.sum(lse_r - diag) + jnp.sum(lse_c - diag)
    # Top-1 is right when the positive reaches the batch max. `diag` and the block maxima come
    # from different reductions, so cosines within 1e-5 of the max count as ties (right).
    tol = 1e-5 * s
    c_i2t = jnp.sum(diag >= row[2] - tol)
    c_t2i = jnp.sum(diag >= col[2] - tol)
    return part[None], (lse_r, lse_c), c_i2t[None], c_t2i[None]


def _ring_bwd_body(x, y, logit_scale, queue, saved, g, *, axes, n, tile, b_global):
    """Plain backward ring on one shard -> (dx, dy, dls)."""
    lse_r, lse_c = saved
    s = jnp.exp(logit_scale)
    t = tile_size(x.shape[0], tile)
    (q_txt, q_txt_mask), q_img = _split_queue(queue)

    def step(carry, rot):
        dx, dls = carry
        (blk, lse_c_blk), dy = rot
        dx, dls_blk, dy = _bwd_block(x, lse_r, dx, blk, lse_c_blk, dy, q_img, s, t)
        return (dx, dls + dls_blk), dy

    init = (jnp.zeros_like(x), jnp.zeros((), jnp.float32))
    (dx, dls), dy = _rotate(
        n, step, init, (((y, q_txt, q_txt_mask), lse_c), jnp.zeros_like(y)), axes
    )
    # The positives: d(-diag)/d(.) for both directions.
    cos = jnp.sum(x * y, axis=1)
    scale = g / (2 * b_global)
    dx = scale * s * (dx - 2 * y)
    dy = scale * s * (dy - 2 * x)
    dls = scale * (dls - 2 * s * jnp.sum(cos))
    return dx, dy, dls[None]


# ------------------------------------------------------------ masked path (false-negative rules)
# pair info tuples are (group, ema_image, ema_text), entries None when the rules do not read them;
# a travelling queue shard is (q_text, q_group, mask), the resident one (q_image, q_group, mask).


def _block_masks(diag, rules, rp, cp):
    """(pos, keep_i2t, keep_t2i) [t, b] for image rows (pair info rp) vs text columns (cp).

    Positives are symmetric; near-duplicates are judged on the texts for image anchors and on
    the images for text anchors, so the two directions keep different sets.
    """
    pos, keep_r = batch_masks(diag, rules, rp[0], cp[0], rp[2], cp[2])
    if rules.duplicate_threshold is None:
        return pos, keep_r, keep_r
    neg = ~pos if rules.batch_negatives else jnp.zeros_like(pos)
    keep_c = pos | (neg & (rp[1] @ cp[1].T <= rules.duplicate_threshold))
    return pos, keep_r, keep_c


def _acc_init(b):
    """Online state of b anchors: (lse max, lse sum, max logit, max positive logit, positive
    count, positive logit sum); the two maxima are in-batch only (top-1 accuracy)."""
    ninf = jnp.full((b,), -jnp.inf)
    return ninf, jnp.zeros((b,)), ninf, ninf, jnp.zeros((b,)), jnp.zeros((b,))


def _acc_update(acc, sim, pos, keep, axis, extra=None):
    """Fold a [t, b] block (anchors along 1 - axis) into `acc`; `extra` = queue logits already
    masked to -inf, concatenated along the candidate axis."""
    m, l, mb, mp, npos, psum = acc
    kept = jnp.where(keep, sim, -jnp.inf)
    if extra is not None:
        kept = jnp.concatenate([kept, extra], axis=axis)
    m, l = lse_combine(m, l, *block_lse(kept, axis))
    return (
        m,
        l,
        jnp.maximum(mb, sim.max(axis)),
        jnp.maximum(mp, jnp.where(pos, sim, -jnp.inf).max(axis)),
        npos + pos.sum(axis),
        psum + jnp.where(pos, sim, 0.0).sum(axis),
    )


def _queue_rows(anchors, emb, grp, mask, rules, a_group, a_dup, s):
    """Queue logits of `anchors` [n, D] vs queue entries `emb` [k, D], non-kept ones -inf."""
    keep = queue_keep(mask, anchors.shape[0], rules, a_group, grp, a_dup, emb)
    return jnp.where(keep, s * anchors @ emb.T, -jnp.inf)


def _candidates(x_t, y, pr_t, pc, rules):
    """(text candidates of the image rows, image candidates of the text columns): the online
    embeddings, or with in-batch negatives off the momentum encoders' (MoCo's keys)."""
    if rules.batch_negatives:
        return y, x_t
    return pc[2], pr_t[1]


def _block_sims(x_t, y, pr_t, pc, s, rules):
    """(row logits, column logits) [t, b] of image rows x_t vs text columns y: one matrix when
    both directions use the online embeddings."""
    y_c, x_c = _candidates(x_t, y, pr_t, pc, rules)
    sim_r = s * x_t @ y_c.T
    return sim_r, (sim_r if rules.batch_negatives else s * x_c @ y.T)


def _rules_fwd_block(x, pr, row, blk, col, q_res, home, s, t, rules):
    """One text block against this shard's images with the rules; returns (row, col) states."""
    y, pc, q_trav = blk
    b = y.shape[0]

    def row_tile(col, inp):
        x_t, idx_t, pr_t, acc = inp
        sim_r, sim_c = _block_sims(x_t, y, pr_t, pc, s, rules)  # [t, b]
        diag = home & (idx_t[:, None] == jnp.arange(b)[None, :])
        pos, keep_r, keep_c = _block_masks(diag, rules, pr_t, pc)
        extra = None
        if q_trav is not None:
            extra = _queue_rows(x_t, q_trav[0], q_trav[1], q_trav[2], rules, pr_t[0], pr_t[2], s)
        acc = _acc_update(acc, sim_r, pos, keep_r, 1, extra)
        return _acc_update(col, sim_c, pos, keep_c, 0), acc

    tiles = jax.tree.map(lambda a: to_tiles(a, t), (x, jnp.arange(x.shape[0]), pr, row))
    col, row_t = lax.scan(row_tile, col, tiles)
    row = jax.tree.map(from_tiles, row_t)
    if q_res is not None:  # my queue images are extra candidates for the visiting text anchors
        qi, qg, qm = q_res

        def q_tile(col, inp):
            qi_t, qg_t, qm_t = inp
            lg = _queue_rows(y, qi_t, qg_t, qm_t, rules, pc[0], pc[1], s)  # [b, tq]
            m, l = lse_combine(col[0], col[1], *block_lse(lg, 1))
            return (m, l) + col[2:], None

        tq = tile_size(qi.shape[0], t)
        col, _ = lax.scan(q_tile, col, jax.tree.map(lambda a: to_tiles(a, tq), q_res))
    return row, col


def _softmax_kept(sim, lse, keep):
    return jnp.exp(jnp.where(keep, sim - lse, -jnp.inf))


def _rules_bwd_block(x, pr, lse_r, npos_r, dx, blk, lse_c, npos_c, dy, q_res, home, s, t, rules):
    """Gradient contributions of one block with the rules: (dx, dls, dy), unscaled. A row's
    d loss / d logits is softmax over its kept entries minus positive / |positives|."""
    y, pc, q_trav = blk
    b = y.shape[0]

    def row_tile(carry, inp):
        dy, dls = carry
        x_t, idx_t, pr_t, lse_t, npos_t, dx_t = inp
        sim_r, sim_c = _block_sims(x_t, y, pr_t, pc, s, rules)  # [t, b], recomputed
        diag = home & (idx_t[:, None] == jnp.arange(b)[None, :])
        pos, keep_r, keep_c = _block_masks(diag, rules, pr_t, pc)
        g_r = _softmax_kept(sim_r, lse_t[:, None], keep_r) - pos / npos_t[:, None]
        g_c = _softmax_kept(sim_c, lse_c[None], keep_c) - pos / npos_c[None, :]
        if rules.batch_negatives:  # one logit matrix: both directions in one product
            g = g_r + g_c
            dx_t = dx_t + g @ y
            dy = dy + g.T @ x_t
            dls = dls + jnp.sum(g * sim_r)
        else:  # the candidates are momentum keys: each side gets its anchors' gradient only
            y_c, x_c = _candidates(x_t, y, pr_t, pc, rules)
            dx_t = dx_t + g_r @ y_c
            dy = dy + g_c.T @ x_c
            dls = dls + jnp.sum(g_r * sim_r) + jnp.sum(g_c * sim_c)
        if q_trav is not None:
            lg = _queue_rows(x_t, q_trav[0], q_trav[1], q_trav[2], rules, pr_t[0], pr_t[2], s)
            p_q = jnp.exp(lg - lse_t[:, None])  # -inf (not kept) -> 0
            dx_t = dx_t + p_q @ q_trav[0]
            dls = dls + jnp.sum(jnp.where(p_q > 0, p_q * lg, 0.0))
        return (dy, dls), dx_t

    tiles = jax.tree.map(
        lambda a: to_tiles(a, t), (x, jnp.arange(x.shape[0]), pr, lse_r, npos_r, dx)
    )
    (dy, dls), dx_t = lax.scan(row_tile, (dy, jnp.zeros((), jnp.float32)), tiles)
    dx = from_tiles(dx_t)
    if q_res is not None:

        def q_tile(carry, inp):
            dy, dls = carry
            qi_t, qg_t, qm_t = inp
            lg = _queue_rows(y, qi_t, qg_t, qm_t, rules, pc[0], pc[1], s)  # [b, tq]
            p_q = jnp.exp(lg - lse_c[:, None])
            return (dy + p_q @ qi_t, dls + jnp.sum(jnp.where(p_q > 0, p_q * lg, 0.0))), None

        tq = tile_size(q_res[0].shape[0], t)
        (dy, dls), _ = lax.scan(q_tile, (dy, dls), jax.tree.map(lambda a: to_tiles(a, tq), q_res))
    return dx, dls, dy


def _split_rules_queue(q):
    """(travelling, resident) queue shards of (q_image, q_text, q_group, mask), or Nones."""
    if q is None:
        return None, None
    q_img, q_txt, q_grp, mask = q
    return (q_txt, q_grp, mask), (q_img, q_grp, mask)


def _rules_fwd_body(x, y, logit_scale, aux, *, axes, n, tile, rules):
    """Masked forward ring on one shard -> (part, (lse_r, lse_c, npos_r, npos_c), c_i2t,
    c_t2i); `aux` = (pair info, queue or None)."""
    pr, q = aux
    b = x.shape[0]
    s = jnp.exp(logit_scale)
    t = tile_size(b, tile)
    q_trav, q_res = _split_rules_queue(q)

    def step(carry, rot):
        row, k = carry
        blk, col = rot
        # After k shifts this shard holds the block of shard me - k (mod n): only step 0's
        # block is its own, the one that holds its diagonal pairs.
        row, col = _rules_fwd_block(x, pr, row, blk, col, q_res, k == 0, s, t, rules)
        return (row, k + 1), col

    (row, _), col = _rotate(n, step, (_acc_init(b), 0), ((y, pr, q_trav), _acc_init(b)), axes)
    lse_r = row[0] + jnp.log(row[1])
    lse_c = col[0] + jnp.log(col[1])
    part = jnp.sum(lse_r - row[5] / row[4]) + jnp.sum(lse_c - col[5] / col[4])
    # mp and mb are maxima of the same logits: the top-1 is a positive iff they are equal.
    c_i2t = jnp.sum(row[3] >= row[2])
    c_t2i = jnp.sum(col[3] >= col[2])
    return part[None], (lse_r, lse_c, row[4], col[4]), c_i2t[None], c_t2i[None]


def _rules_bwd_body(x, y, logit_scale, aux, saved, g, *, axes, n, tile, rules, b_global):
    """Masked backward ring on one shard -> (dx, dy, dls)."""
    (pr, q), (lse_r, lse_c, npos_r, npos_c) = aux, saved
    s = jnp.exp(logit_scale)
    t = tile_size(x.shape[0], tile)
    q_trav, q_res = _split_rules_queue(q)

    def step(carry, rot):
        (dx, dls), k = carry
        (blk, lse_c_blk, npos_c_blk), dy = rot
        dx, dls_blk, dy = _rules_bwd_block(
            x, pr, lse_r, npos_r, dx, blk, lse_c_blk, npos_c_blk, dy, q_res, k == 0, s, t, rules
        )
        return ((dx, dls + dls_blk), k + 1), dy

    init = ((jnp.zeros_like(x), jnp.zeros((), jnp.float32)), 0)
    ((dx, dls), _), dy = _rotate(
        n, step, init, (((y, pr, q_trav), lse_c, npos_c), jnp.zeros_like(y)), axes
    )
    scale = g / (2 * b_global)
    return scale * s * dx, scale * s * dy, (scale * dls)[None]


def _queue_arrays(queue: QueueState | None, n: int):
    """The queue's (image, text) embeddings in float32 without gradients, after checking they
    split over the n shards; None without a queue (or an empty one)."""
    if queue is None or queue.image.shape[0] == 0:
        return None
    check_divisible(queue.image.shape[0], n, "queue size")
    return (
        lax.stop_gradient(queue.image).astype(jnp.float32),
        lax.stop_gradient(queue.text).astype(jnp.float32),
    )


def _rules_aux(rules: PairRules, pairs: PairInfo | None, queue: QueueState | None, n: int):
    """The masked path's non-differentiated inputs: (pair info, queue or None), holding only
    what the rules read (only that is sent around the ring)."""
    pairs = pairs or PairInfo()
    ema = rules.needs_ema
    pr = (
        pairs.group if rules.group_positives else None,
        pairs.ema_image if ema else None,
        pairs.ema_text if ema else None,
    )
    pr = tuple(None if a is None else lax.stop_gradient(a) for a in pr)
    q = _queue_arrays(queue, n)
    if q is not None:
        q = (*q, queue.group if rules.group_positives else None, queue_mask(queue))
    return pr, q


def _ring_with_vjp(fwd_body, bwd_body, img, txt, logit_scale, aux, mesh, axes):
    """(loss, top-1 accuracies) of a forward/backward ring pair under one custom VJP.

    Per shard, fwd_body(x, y, ls, aux) -> (part [1], saved (tuple), c_i2t [1], c_t2i [1]) and
    bwd_body(x, y, ls, aux, saved, g) -> (dx, dy, dls [1]). `aux` (queue, pair info: a pytree,
    sharded like the batch) gets no gradient; only `saved` is kept between the passes.
    """
    b_global = img.shape[0]
    leaves, tree = jax.tree.flatten(aux)
    spec = P(axes)
    aux_specs = jax.tree.unflatten(tree, [spec] * len(leaves))
    fwd_map = jax.shard_map(
        fwd_body,
        mesh=mesh,
        in_specs=(spec, spec, P(), aux_specs),
        out_specs=spec,
        check_vma=False,
    )
    bwd_map = jax.shard_map(
        bwd_body,
        mesh=mesh,
        in_specs=(spec, spec, P(), aux_specs, spec, P()),
        out_specs=(spec, spec, spec),
        check_vma=False,
    )

    def forward(x, y, ls, *leaves):
        part, saved, c_i2t, c_t2i = fwd_map(x, y, ls, jax.tree.unflatten(tree, leaves))
        out = (part.sum() / (2 * b_global), c_i2t.sum() / b_global, c_t2i.sum() / b_global)
        return out, (x, y, ls, leaves, saved)

    def backward(res, cts):
        x, y, ls, leaves, saved = res
        dx, dy, dls = bwd_map(x, y, ls, jax.tree.unflatten(tree, leaves), saved, cts[0])
        return (dx, dy, dls.sum()) + (None,) * len(leaves)

    ring = jax.custom_vjp(lambda x, y, ls, *leaves: forward(x, y, ls, *leaves)[0])
    ring.defvjp(forward, backward)
    loss, acc_i2t, acc_t2i = ring(
        img.astype(jnp.float32),
        txt.astype(jnp.float32),
        jnp.asarray(logit_scale, jnp.float32),
        *leaves,
    )
    return loss, {"i2t_acc": acc_i2t, "t2i_acc": acc_t2i}


def infonce_ring(
    img: jax.Array,
    txt: jax.Array,
    logit_scale: jax.Array,
    mesh: Mesh,
    batch_axes: str | Sequence[str] = BATCH_AXES,
    queue: QueueState | None = None,
    tile: int | None = None,
    rules: PairRules = PairRules(),
    pairs: PairInfo | None = None,
) -> tuple[jax.Array, dict]:
    """Ring InfoNCE; equals `infonce_reference` in value and gradient, with the same `rules` and
    `pairs`. `tile` bounds the image rows per logit block inside a shard (the largest divisor
    of b not above it is used)."""
    check_pair(img, txt)
    check_pair_info(rules, pairs, img.shape[0], queue)
    axes = as_axes(batch_axes)
    n = batch_axis_size(mesh, axes)
    b_global = img.shape[0]
    check_divisible(b_global, n, "global batch size")
    ring = dict(axes=axes, n=n, tile=tile)
    if rules.plain:
        q = _queue_arrays(queue, n)
        aux = () if q is None else (*q, queue_mask(queue))
        fwd = partial(_ring_fwd_body, **ring)
        bwd = partial(_ring_bwd_body, **ring, b_global=b_global)
    else:
        aux = _rules_aux(rules, pairs, queue, n)
        fwd = partial(_rules_fwd_body, **ring, rules=rules)
        bwd = partial(_rules_bwd_body, **ring, rules=rules, b_global=b_global)
    return _ring_with_vjp(fwd, bwd, img, txt, logit_scale, aux, mesh, axes)
