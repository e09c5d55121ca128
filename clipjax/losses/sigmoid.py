"""SigLIP sigmoid loss with a learnable bias: reference, gathered, and chunked ring.

loss = -(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + bias)), z = +1 on the diagonal, -1 elsewhere.
Written as sum_ij softplus(L_ij) - sum_i L_ii, so no label matrix is ever materialised.
The ring rotates text blocks (no normaliser to carry) and uses a custom VJP that recomputes each
block in a second ring pass, so memory per shard is O(tile * b), independent of B.
Functions return `(loss, {})` to match the softmax losses' (loss, aux) convention.
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
    from_tiles,
    tile_size,
    to_tiles,
)
from clipjax.losses.ring import _rotate


def _bias(logit_bias) -> jax.Array:
    if logit_bias is None:
        return jnp.zeros((), jnp.float32)
    return jnp.asarray(logit_bias, jnp.float32)


def sigmoid_reference(
    img: jax.Array, txt: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array | None
) -> tuple[jax.Array, dict]:
    """Oracle: the full B x B matrix with explicit +-1 labels."""
    check_pair(img, txt)
    b = img.shape[0]
    logits = jnp.exp(logit_scale) * img.astype(jnp.float32) @ txt.astype(jnp.float32).T
    logits = logits + _bias(logit_bias)
    labels = 2.0 * jnp.eye(b) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / b, {}


def _gathered_body(x, y, logit_scale, logit_bias, *, axes):
    s = jnp.exp(logit_scale)
    all_y = lax.all_gather(y, axes, tiled=True)  # [B, D]; its transpose is a reduce-scatter
    logits = s * x @ all_y.T + logit_bias  # [b, B]: my images vs all texts
    diag = s * jnp.sum(x * y, axis=1) + logit_bias
    return (jnp.sum(jax.nn.softplus(logits)) - jnp.sum(diag))[None]


def _prepare(img, txt, mesh, batch_axes):
    check_pair(img, txt)
    axes = as_axes(batch_axes)
    n = batch_axis_size(mesh, axes)
    check_divisible(img.shape[0], n, "global batch size")
    return axes, n, img.astype(jnp.float32), txt.astype(jnp.float32)


def sigmoid_gathered(
    img: jax.Array,
    txt: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array | None,
    mesh: Mesh,
    batch_axes: str | Sequence[str] = BATCH_AXES,
) -> tuple[jax.Array, dict]:
    """All-gather the texts; each shard computes its b x B block. Per-shard memory O(b * B)."""
    axes, _, x, y = _prepare(img, txt, mesh, batch_axes)
    spec = P(axes)
    fn = jax.shard_map(
        partial(_gathered_body, axes=axes),
        mesh=mesh,
        in_specs=(spec, spec, P(), P()),
        out_specs=spec,
    )
    part = fn(x, y, jnp.asarray(logit_scale, jnp.float32), _bias(logit_bias))
    return part.sum() / img.shape[0], {}


def _ring_fwd_body(x, y, logit_scale, logit_bias, *, axes, n, tile):
    s = jnp.exp(logit_scale)
    t = tile_size(x.shape[0], tile)

    def step(total, rot):
        y_blk, _ = rot

        def row_tile(acc, x_t):
            return acc + jnp.sum(jax.nn.softplus(s * x_t @ y_blk.T + logit_bias)), None

        total, _ = lax.scan(row_tile, total, to_tiles(x, t))
        return total, ()

    total, _ = _rotate(n, step, jnp.zeros((), jnp.float32), (y, ()), axes)
    diag = s * jnp.sum(x * y, axis=1) + logit_bias
    return (total - jnp.sum(diag))[None]


def _ring_bwd_body(x, y, logit_scale, logit_bias, g, *, axes, n, tile, b_global):
    s = jnp.exp(logit_scale)
    t = tile_size(x.shape[0], tile)

    def step(carry, rot):
        dx, dls, dbias = carry
        y_blk, dy = rot

        def row_tile(c, inp):
            dy, dls, dbias = c
            x_t, dx_t = inp
            cos = x_t @ y_blk.T
            p = jax.nn.sigmoid(s * cos + logit_bias)  # d softplus(L) / dL
            return (
                dy + s * p.T @ x_t,
                dls + s * jnp.sum(p * cos),
                dbias + jnp.sum(p),
            ), dx_t + s * p @ y_blk

        (dy, dls, dbias), dx_t = lax.scan(
            row_tile, (dy, dls, dbias), (to_tiles(x, t), to_tiles(dx, t))
        )
        return (from_tiles(dx_t), dls, dbias), dy

    zero = jnp.zeros((), jnp.float32)
    (dx, dls, dbias), dy = _rotate(
        n, step, (jnp.zeros_like(x), zero, zero), (y, jnp.zeros_like(y)), axes
    )
    scale = g / b_global
    # The positives contribute -L_ii.
    dx = scale * (dx - s * y)
    dy = scale * (dy - s * x)
    dls = scale * (dls - s * jnp.sum(x * y))
    dbias = scale * (dbias - x.shape[0])
    return dx, dy, dls[None], dbias[None]


def sigmoid_ring(
    img: jax.Array,
    txt: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array | None,
    mesh: Mesh,
    batch_axes: str | Sequence[str] = BATCH_AXES,
    tile: int | None = None,
) -> tuple[jax.Array, dict]:
    """Chunked ring SigLIP with a custom VJP; equals `sigmoid_reference` in value and gradient."""
    axes, n, x, y = _prepare(img, txt, mesh, batch_axes)
    b_global = img.shape[0]
    spec = P(axes)
    fwd_map = jax.shard_map(
        partial(_ring_fwd_body, axes=axes, n=n, tile=tile),
        mesh=mesh,
        in_specs=(spec, spec, P(), P()),
        out_specs=spec,
        check_vma=False,
    )
    bwd_map = jax.shard_map(
        partial(_ring_bwd_body, axes=axes, n=n, tile=tile, b_global=b_global),
        mesh=mesh,
        in_specs=(spec, spec, P(), P(), P()),
        out_specs=(spec,) * 4,
        check_vma=False,
    )

    def forward(x, y, ls, bias):
        return fwd_map(x, y, ls, bias).sum() / b_global, (x, y, ls, bias)

    def backward(res, g):
        dx, dy, dls, dbias = bwd_map(*res, g)
        return dx, dy, dls.sum(), dbias.sum()

    ring = jax.custom_vjp(lambda x, y, ls, bias: forward(x, y, ls, bias)[0])
    ring.defvjp(forward, backward)
    return ring(x, y, jnp.asarray(logit_scale, jnp.float32), _bias(logit_bias)), {}
