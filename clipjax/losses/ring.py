"""Ring (blockwise) softmax InfoNCE: no shard ever holds more than a [tile, b] block of logits.

Images stay put; text blocks rotate one shard per step with `ppermute`. Each shard keeps an online
(max, sum-exp) state for its image rows (image->text), while the state of the text columns
(text->image) travels with the text block and arrives home after the last step, so one rotation
yields both directions. A custom VJP stores only embeddings and the two [B] log-sum-exps, and the
backward pass recomputes each block in a second ring pass (dtext accumulators travel with the
block). Communication per shard: forward (n-1)·b·D + n·3b floats, backward (2n-1)·b·D + n·b.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from clipjax.losses.common import (BATCH_AXES, as_axes, batch_axis_size, block_lse,
                                   check_divisible, check_pair, from_tiles, lse_combine,
                                   queue_mask, ring_perm, tile_size, to_tiles)
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

    (dy, dls), dx_t = lax.scan(row_tile, (dy, jnp.zeros((), jnp.float32)),
                               (to_tiles(x, t), to_tiles(lse_r, t), to_tiles(dx, t)))
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

        (dy, dls_q), _ = lax.scan(q_tile, (dy, jnp.zeros((), jnp.float32)),
                                  (to_tiles(qi, tq), to_tiles(qi_mask, tq)))
        dls = dls + dls_q
    return dx, dls, dy


def _split_queue(queue):
    if not queue:
        return (None, None), None
    q_img, q_txt, mask = queue
    return (q_txt, mask), (q_img, mask)


def _ring_fwd_body(x, y, logit_scale, *queue, axes, n, tile):
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
    return part[None], lse_r, lse_c, c_i2t[None], c_t2i[None]


def _ring_bwd_body(x, y, logit_scale, lse_r, lse_c, g, *queue, axes, n, tile, b_global):
    s = jnp.exp(logit_scale)
    t = tile_size(x.shape[0], tile)
    (q_txt, q_txt_mask), q_img = _split_queue(queue)

    def step(carry, rot):
        dx, dls = carry
        (blk, lse_c_blk), dy = rot
        dx, dls_blk, dy = _bwd_block(x, lse_r, dx, blk, lse_c_blk, dy, q_img, s, t)
        return (dx, dls + dls_blk), dy

    init = (jnp.zeros_like(x), jnp.zeros((), jnp.float32))
    (dx, dls), dy = _rotate(n, step, init, (((y, q_txt, q_txt_mask), lse_c), jnp.zeros_like(y)),
                            axes)
    # The positives: d(-diag)/d(.) for both directions.
    cos = jnp.sum(x * y, axis=1)
    scale = g / (2 * b_global)
    dx = scale * s * (dx - 2 * y)
    dy = scale * s * (dy - 2 * x)
    dls = scale * (dls - 2 * s * jnp.sum(cos))
    return dx, dy, dls[None]


def infonce_ring(img: jax.Array, txt: jax.Array, logit_scale: jax.Array, mesh: Mesh,
                 batch_axes: str | Sequence[str] = BATCH_AXES, queue: QueueState | None = None,
                 tile: int | None = None) -> tuple[jax.Array, dict]:
    """Ring InfoNCE; equals `infonce_reference` in value and gradient. `tile` bounds the image
    rows per logit block inside a shard (the largest divisor of b not above it is used)."""
    check_pair(img, txt)
    axes = as_axes(batch_axes)
    n = batch_axis_size(mesh, axes)
    b_global = img.shape[0]
    check_divisible(b_global, n, "global batch size")
    qargs = ()
    if queue is not None and queue.image.shape[0] > 0:
        check_divisible(queue.image.shape[0], n, "queue size")
        qargs = (lax.stop_gradient(queue.image).astype(jnp.float32),
                 lax.stop_gradient(queue.text).astype(jnp.float32), queue_mask(queue))
    spec = P(axes)
    qspecs = (spec,) * len(qargs)
    fwd_map = jax.shard_map(partial(_ring_fwd_body, axes=axes, n=n, tile=tile), mesh=mesh,
                            in_specs=(spec, spec, P()) + qspecs, out_specs=(spec,) * 5,
                            check_vma=False)
    bwd_map = jax.shard_map(
        partial(_ring_bwd_body, axes=axes, n=n, tile=tile, b_global=b_global), mesh=mesh,
        in_specs=(spec, spec, P(), spec, spec, P()) + qspecs, out_specs=(spec, spec, spec),
        check_vma=False)

    def forward(x, y, ls, *q):
        part, lse_r, lse_c, c_i2t, c_t2i = fwd_map(x, y, ls, *q)
        out = (part.sum() / (2 * b_global), c_i2t.sum() / b_global, c_t2i.sum() / b_global)
        return out, (x, y, ls, q, lse_r, lse_c)

    def backward(res, cts):
        x, y, ls, q, lse_r, lse_c = res
        dx, dy, dls = bwd_map(x, y, ls, lse_r, lse_c, cts[0], *q)
        return (dx, dy, dls.sum()) + (None,) * len(q)

    ring = jax.custom_vjp(lambda x, y, ls, *q: forward(x, y, ls, *q)[0])
    ring.defvjp(forward, backward)
    loss, acc_i2t, acc_t2i = ring(img.astype(jnp.float32), txt.astype(jnp.float32),
                                  jnp.asarray(logit_scale, jnp.float32), *qargs)
    return loss, {"i2t_acc": acc_i2t, "t2i_acc": acc_t2i}
