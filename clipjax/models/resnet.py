"""OpenAI CLIP's ModifiedResNet image tower.

Differences from a torchvision ResNet: a 3-conv stem with an average pool instead of a max pool,
anti-aliased strided convolutions (an avg-pool before the stride-1 conv that follows it), and a
QKV attention pool (with positional embedding) instead of global average pooling.

BatchNorm: scale/bias are parameters; running statistics live in the 'batch_stats' collection.
`train=True` normalises with batch statistics and updates 'batch_stats' (apply with
`mutable=['batch_stats']`); `train=False` uses the stored statistics.

Spatial tokens: each spatial feature (plus its positional embedding) is sent through the attention
pool's value and output projections, i.e. what the pooled output would be if that location got all
the attention weight. They live in the same joint space as the pooled embedding.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.axes import CONV_IN, CONV_OUT, EMBED, HEADS, KV, NORM, POS, PROJ
from clipjax.models.layers import logical

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=logical(_conv_init, (None, None, CONV_IN, CONV_OUT)),
        name=name,
    )


def _batch_norm(x: jax.Array, train: bool, name: str, zero_init: bool = False) -> jax.Array:
    """BatchNorm in float32 (params scale/bias, stats in 'batch_stats'); call inside a compact
    method."""
    y = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,  # = PyTorch's momentum 0.1
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=logical(nn.initializers.zeros if zero_init else nn.initializers.ones, (NORM,)),
        bias_init=logical(nn.initializers.zeros, (NORM,)),
        name=name,
    )(x.astype(jnp.float32))
    return y.astype(x.dtype)


def _avg_pool(x: jax.Array, k: int) -> jax.Array:
    return nn.avg_pool(x, (k, k), strides=(k, k)) if k > 1 else x


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> avgpool(stride) -> 1x1 (x4 expansion); downsample = avgpool -> 1x1 -> BN."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_ch = self.planes * 4
        out = nn.relu(_batch_norm(_conv(self.planes, 1, self.dtype, "conv1")(x), train, "bn1"))
        out = nn.relu(_batch_norm(_conv(self.planes, 3, self.dtype, "conv2")(out), train, "bn2"))
        out = _avg_pool(out, self.stride)
        out = _batch_norm(_conv(out_ch, 1, self.dtype, "conv3")(out), train, "bn3", zero_init=True)
        identity = x
        if self.stride > 1 or x.shape[-1] != out_ch:
            identity = _avg_pool(x, self.stride)
            identity = _conv(out_ch, 1, self.dtype, "downsample_conv")(identity)
            identity = _batch_norm(identity, train, "downsample_bn")
        return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention of the mean feature over [mean; spatial features] + positional embedding."""

    num_heads: int
    output_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"attention-pool width {c} is not divisible by heads {self.num_heads}")
        head_dim = c // self.num_heads
        std = c**-0.5
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # [B, 1 + HW, C]
        pos = self.param(
            "positional_embedding",
            logical(nn.initializers.normal(std), (POS, EMBED)),
            (h * w + 1, c),
        )
        x = x + pos.astype(self.dtype)

        def proj(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                (self.num_heads, head_dim),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=logical(nn.initializers.normal(std), (EMBED, HEADS, KV)),
                bias_init=logical(nn.initializers.zeros, (HEADS, KV)),
                name=name,
            )

        c_proj = nn.DenseGeneral(
            self.output_dim,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical(nn.initializers.normal(std), (HEADS, KV, PROJ)),
            bias_init=logical(nn.initializers.zeros, (PROJ,)),
            name="c_proj",
        )
        q = proj("q_proj")(x[:, :1]) * jnp.asarray(head_dim**-0.5, self.dtype)  # [B, 1, H, Dh]
        k = proj("k_proj")(x)  # [B, 1 + HW, H, Dh]
        v = proj("v_proj")(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        pooled = c_proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v))[:, 0]  # [B, D]
        tokens = c_proj(v[:, 1:])  # [B, HW, D]
        return pooled, tokens


class ModifiedResNet(nn.Module):
    """Returns (pooled [B, D], spatial tokens [B, HW, D]) in `dtype`, not normalised."""

    image_size: int
    layers: Sequence[int]
    width: int
    heads: int
    output_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        _, h, w, _ = images.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"images are {h}x{w}, the model expects {self.image_size}x{self.image_size}"
            )
        x = images.astype(self.dtype)
        half = self.width // 2
        for i, (ch, stride) in enumerate([(half, 2), (half, 1), (self.width, 1)], start=1):
            x = _conv(ch, 3, self.dtype, f"conv{i}", stride=stride)(x)
            x = nn.relu(_batch_norm(x, train, f"bn{i}"))
        x = _avg_pool(x, 2)
        for stage, blocks in enumerate(self.layers):
            planes = self.width * 2**stage
            for j in range(blocks):
                stride = 1 if stage == 0 or j > 0 else 2
                x = Bottleneck(planes, stride, self.dtype, name=f"layer{stage + 1}_{j}")(x, train)
        return AttentionPool2d(self.heads, self.output_dim, self.dtype, name="attnpool")(x)
