"""Text transformer tower (OpenAI CLIP layout).

Token + learned position embeddings -> causal transformer -> ln_final -> text_projection (no bias).
The pooled output is taken at the end-of-text token, which has the highest id in each row
(49407 in the CLIP vocabulary), so pooling is `argmax(ids)` as in OpenAI CLIP.

Only a causal mask is applied: padding comes after the end-of-text token, so by causality it cannot
change any real position (token outputs at padded positions are meaningless; see `text_mask`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.axes import EMBED, POS, PROJ, VOCAB
from clipjax.models.embed_lookup import embedding_lookup
from clipjax.models.layers import LayerNorm, Transformer, logical


def text_mask_from_ids(text: jax.Array) -> jax.Array:
    """[B, L] bool, True up to and including the end-of-text (argmax) token of each row."""
    eot = jnp.argmax(text, axis=-1)
    return jnp.arange(text.shape[-1])[None, :] <= eot[:, None]


class TextTransformer(nn.Module):
    """Returns (pooled [B, D], token sequence [B, L, D]), projected, not normalised, in `dtype`."""

    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "xla"

    @nn.compact
    def __call__(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, seq = text.shape
        if seq > self.context_length:
            raise ValueError(
                f"text has length {seq}, more than the context length {self.context_length}"
            )
        tok = self.param(
            "token_embedding",
            logical(nn.initializers.normal(0.02), (VOCAB, EMBED)),
            (self.vocab_size, self.width),
        )
        pos = self.param(
            "positional_embedding",
            logical(nn.initializers.normal(0.01), (POS, EMBED)),
            (self.context_length, self.width),
        )
        x = embedding_lookup(tok, text).astype(self.dtype) + pos[:seq].astype(self.dtype)
        x = Transformer(
            width=self.width,
            layers=self.layers,
            heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            act=self.act,
            eps=self.eps,
            dtype=self.dtype,
            scan_layers=self.scan_layers,
            remat=self.remat,
            causal=True,
            attention=self.attention,
            name="transformer",
        )(x)
        ln_final = LayerNorm(self.eps, self.dtype, name="ln_final")
        proj = self.param(
            "text_projection",
            logical(nn.initializers.normal(self.width**-0.5), (EMBED, PROJ)),
            (self.width, self.output_dim),
        ).astype(self.dtype)
        # Pool, then project (both act per token): the token sequence's own projection is dead
        # code unless a loss reads it.
        pooled = x[jnp.arange(b), jnp.argmax(text, axis=-1)]
        return ln_final(pooled) @ proj, ln_final(x) @ proj
