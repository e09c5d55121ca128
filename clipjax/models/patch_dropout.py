"""Patch dropout (FLIP): train the image tower on a random subset of each image's patch tokens.

Each training image keeps the class token and `kept_patches(N, rate)` of its N patch tokens, a
subset drawn independently per image. The kept count is the same for every image, so shapes stay
static and the transformer runs on a shorter sequence: roughly a `rate` share of the tower's
compute is saved. Positional embeddings are added before the drop, so every kept token still
knows where it came from. Evaluation never drops.

The randomness comes from the flax RNG stream `PATCH_DROPOUT_RNG`, which the train step derives
from the train state's key: a resumed run draws the same subsets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PATCH_DROPOUT_RNG = "patch_dropout"


def kept_patches(num_patches: int, rate: float) -> int:
    """Patch tokens kept per image: max(1, int(num_patches * (1 - rate))), as open_clip."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"patch dropout rate {rate!r} is invalid: expected a value in [0, 1)")
    return max(1, int(num_patches * (1.0 - rate)))


def kept_indices(rng: jax.Array, batch: int, num_patches: int, rate: float) -> jax.Array:
    """[batch, k] int32 indices (into the N patch tokens) of the patches each image keeps.

    The top-k of per-image uniform noise: a uniformly random k-subset per image, in random order.
    """
    k = kept_patches(num_patches, rate)
    noise = jax.random.uniform(rng, (batch, num_patches))
    return jax.lax.top_k(noise, k)[1].astype(jnp.int32)


def drop_patches(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """[B, 1 + N, W] (class token first, positions already added) -> [B, 1 + k, W]."""
    cls, patches = x[:, :1], x[:, 1:]
    idx = kept_indices(rng, x.shape[0], patches.shape[1], rate)
    kept = jnp.take_along_axis(patches, idx[:, :, None], axis=1)
    return jnp.concatenate([cls, kept], axis=1)
