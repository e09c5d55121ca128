"""Momentum queue: a FIFO of the last K image/text embeddings from an EMA copy of the encoders.

Sharding (global arrays under jit): `image`/`text`/`group` [K, ...] split on the batch axes, with K
divisible by the number of batch shards; `ptr`/`count` replicated scalars. The losses read the
queue as extra, gradient-free negatives; `group` (caption hash or label, [K, G], G = 0 when the
loss has no group rules) lets them leave out entries of the anchor's own group.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class QueueState(NamedTuple):
    image: jax.Array  # [K, D] f32, EMA image embeddings
    text: jax.Array  # [K, D] f32, EMA text embeddings
    group: jax.Array | None  # [K, G] int32, the entries' groups (clipjax.losses.pairs), or None
    ptr: jax.Array  # int32 scalar: next slot to write
    count: jax.Array  # int32 scalar: filled slots (<= K); slots [0, count) are valid


def queue_init(size: int, dim: int, dtype=jnp.float32, group_width: int = 0) -> QueueState:
    """An empty queue of `size` slots of `dim`-d embeddings (and `group_width` group ids; none
    when 0, as checkpoints cannot hold zero-size arrays)."""
    if size < 0 or dim <= 0 or group_width < 0:
        raise ValueError(
            f"queue_init: expected size >= 0, dim > 0, group_width >= 0, got "
            f"size={size}, dim={dim}, group_width={group_width}"
        )
    return QueueState(
        image=jnp.zeros((size, dim), dtype),
        text=jnp.zeros((size, dim), dtype),
        group=jnp.zeros((size, group_width), jnp.int32) if group_width else None,
        ptr=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def queue_push(
    queue: QueueState, image: jax.Array, text: jax.Array, group: jax.Array | None = None
) -> QueueState:
    """Write a batch [B, D] (and its groups [B, G]) at `ptr` (wrapping), overwriting the oldest
    entries; B <= K."""
    k = queue.image.shape[0]
    b = image.shape[0]
    if image.shape != text.shape or image.shape[1:] != queue.image.shape[1:]:
        raise ValueError(
            f"queue_push: expected image/text [B, {queue.image.shape[1]}], "
            f"got {image.shape} and {text.shape}"
        )
    if k == 0:
        return queue
    if b > k:
        raise ValueError(f"queue_push: batch {b} is larger than the queue ({k} slots)")
    image = jax.lax.stop_gradient(image).astype(queue.image.dtype)
    text = jax.lax.stop_gradient(text).astype(queue.text.dtype)
    slots = (queue.ptr + jnp.arange(b)) % k
    groups = None
    if queue.group is not None:
        width = queue.group.shape[1]
        if group is None or group.shape != (b, width):
            raise ValueError(
                f"queue_push: expected groups [{b}, {width}], got "
                f"{None if group is None else group.shape}"
            )
        groups = queue.group.at[slots].set(group.astype(jnp.int32))
    return QueueState(
        image=queue.image.at[slots].set(image),
        text=queue.text.at[slots].set(text),
        group=groups,
        ptr=((queue.ptr + b) % k).astype(jnp.int32),
        count=jnp.minimum(queue.count + b, k).astype(jnp.int32),
    )


def ema_update(ema_params, params, momentum: float | jax.Array):
    """ema <- momentum * ema + (1 - momentum) * params, leaf by leaf (no gradient flows)."""
    params = jax.lax.stop_gradient(params)
    return jax.tree.map(
        lambda e, p: (momentum * e + (1.0 - momentum) * p).astype(e.dtype), ema_params, params
    )
