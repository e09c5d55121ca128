"""Vision Transformer image tower in OpenAI CLIP's layout.

Patch conv (no bias) -> [class token; patches] + learned positions -> ln_pre -> transformer ->
ln_post -> projection (no bias). The pooled output is the class token; the patch sequence is
ln_post applied to every patch token, through the same projection.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.axes import CONV_IN, EMBED, POS, PROJ
from clipjax.models.layers import LayerNorm, Transformer, logical
from clipjax.models.patch_dropout import PATCH_DROPOUT_RNG, drop_patches


class PatchEmbedding(nn.Module):
    """Non-overlapping patch projection, [B, H, W, C] -> [B, N, width]; no bias.

    The same parameter as a stride-`patch_size` convolution (kernel [p, p, C, width], so checkpoints
    and exports are unchanged), computed as one matmul over flattened patches: XLA's CPU backend
    ran the strided convolution at ~43 GFLOP/s, well below its matmul rate (benchmarks/RESULTS.md).
    """

    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.patch_size
        kernel = self.param(
            "kernel",
            logical(nn.initializers.lecun_normal(), (None, None, CONV_IN, EMBED)),
            (p, p, c, self.width),
        )
        patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        return patches @ kernel.reshape(p * p * c, self.width).astype(self.dtype)


class VisionTransformer(nn.Module):
    """Returns (pooled [B, D], patch tokens [B, N, D]), both projected, not normalised,
    in `dtype`.

    With `train` and `patch_dropout` > 0 only a random subset of k patch tokens per image goes
    through the transformer (clipjax.models.patch_dropout; needs the 'patch_dropout' RNG stream)
    and the patch tokens returned are those k.
    """

    image_size: int
    patch_size: int
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
    patch_dropout: float = 0.0

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        b, h, w, _ = images.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"images are {h}x{w}, the model expects {self.image_size}x{self.image_size}"
            )
        scale = self.width**-0.5
        x = PatchEmbedding(self.patch_size, self.width, self.dtype, name="conv1")(images)
        n = x.shape[1]
        cls = self.param(
            "class_embedding", logical(nn.initializers.normal(scale), (EMBED,)), (self.width,)
        )
        pos = self.param(
            "positional_embedding",
            logical(nn.initializers.normal(scale), (POS, EMBED)),
            (n + 1, self.width),
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        if train and self.patch_dropout > 0:
            if not self.has_rng(PATCH_DROPOUT_RNG):
                raise ValueError(
                    f"patch_dropout={self.patch_dropout} in training needs a "
                    f"'{PATCH_DROPOUT_RNG}' key: pass rngs={{'{PATCH_DROPOUT_RNG}': key}} to apply"
                )
            x = drop_patches(x, self.patch_dropout, self.make_rng(PATCH_DROPOUT_RNG))
        x = LayerNorm(self.eps, self.dtype, name="ln_pre")(x)
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
            attention=self.attention,
            name="transformer",
        )(x)
        ln_post = LayerNorm(self.eps, self.dtype, name="ln_post")
        proj = self.param(
            "proj",
            logical(nn.initializers.normal(scale), (EMBED, PROJ)),
            (self.width, self.output_dim),
        ).astype(self.dtype)
        # Pool, then project (LayerNorm and projection act per token): the patch tokens' own
        # projection is dead code unless a loss reads them (the token-wise loss).
        return ln_post(x[:, 0]) @ proj, ln_post(x[:, 1:]) @ proj
