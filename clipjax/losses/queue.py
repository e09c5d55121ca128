"""Momentum queue: a FIFO of the last K image/text embeddings from an EMA copy of the encoders.

Sharding the trainer should use (global arrays under jit): `image`/`text` [K, D] split on the batch
axes, P(('data', 'fsdp'), None), with K divisible by the number of batch shards; `ptr`/`count`
replicated scalars. The losses read the queue as extra, gradient-free negatives.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class QueueState(NamedTuple):
    image: jax.Array  # [K, D] f32, EMA image embeddings
    text: jax.Array  # [K, D] f32, EMA text embeddings
    ptr: jax.Array  # int32 scalar: next slot to write
    count: jax.Array  # int32 scalar: filled slots (<= K); slots [0, count) are valid


def queue_init(size: int, dim: int, dtype=jnp.float32) -> QueueState:
    """An empty queue of `size` slots of `dim`-d embeddings."""
    if size < 0 or dim <= 0:
        raise ValueError(f"queue_init: expected size >= 0 and dim > 0, got size={size}, dim={dim}")
    return QueueState(image=jnp.zeros((size, dim), dtype), text=jnp.zeros((size, dim), dtype),
                      ptr=jnp.zeros((), jnp.int32), count=jnp.zeros((), jnp.int32))


def queue_push(queue: QueueState, image: jax.Array, text: jax.Array) -> QueueState:
    """Write a batch [B, D] at `ptr` (wrapping), overwriting the oldest entries; B <= K."""
    k = queue.image.shape[0]
    b = image.shape[0]
    if image.shape != text.shape or image.shape[1:] != queue.image.shape[1:]:
        raise ValueError(f"queue_push: expected image/text [B, {queue.image.shape[1]}], "
                         f"got {image.shape} and {text.shape}")
    if k == 0:
        return queue
    if b > k:
        raise ValueError(f"queue_push: batch {b} is larger than the queue ({k} slots)")
    image = jax.lax.stop_gradient(image).astype(queue.image.dtype)
    text = jax.lax.stop_gradient(text).astype(queue.text.dtype)
    slots = (queue.ptr + jnp.arange(b)) % k
    return QueueState(image=queue.image.at[slots].set(image), text=queue.text.at[slots].set(text),
                      ptr=((queue.ptr + b) % k).astype(jnp.int32),
                      count=jnp.minimum(queue.count + b, k).astype(jnp.int32))


def ema_update(ema_params, params, momentum: float | jax.Array):
    """ema <- momentum * ema + (1 - momentum) * params, leaf by leaf (no gradient flows)."""
    params = jax.lax.stop_gradient(params)
    return jax.tree.map(lambda e, p: (momentum * e + (1.0 - momentum) * p).astype(e.dtype),
                        ema_params, params)
