"""Transformer building blocks shared by the image and text towers.

Pre-LN residual blocks, multi-head attention with causal / padding masks, a GELU or QuickGELU MLP,
and a stack that optionally scans over layers (one compiled block, params stacked on a leading
'layers' axis) and rematerialises activations.

Dtype policy: parameters are always float32; matmuls run in the module's compute `dtype` (float32 or
bfloat16); layer norms and the attention softmax run in float32.

Every parameter carries logical axis names (`clipjax.axes`) so that sharding rules can map them
onto mesh axes without the model knowing about the mesh; activations are constrained the same way
at block boundaries (`clipjax.models.sharding`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipjax.axes import (
    ACT_BATCH,
    ACT_HEADS,
    ACT_MLP,
    EMBED,
    HEADS,
    KV,
    LAYERS,
    MLP_HIDDEN,
    NORM,
)
from clipjax.models.sharding import constrain

ACTIVATIONS = ("quick_gelu", "gelu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn")
# Large negative instead of -inf so that a fully masked row gives a uniform softmax, not NaN.
_MASK_VALUE = -1e30


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def dense_init(std: float):
    return nn.initializers.normal(stddev=std)


def logical(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """Shorthand for nn.with_logical_partitioning."""
    return nn.with_logical_partitioning(init, names)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis computed in float32, result cast to `dtype`.

    Params: scale, bias.
    """

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones, (NORM,)), (width,))
        bias = self.param("bias", logical(nn.initializers.zeros, (NORM,)), (width,))
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


def make_attention_mask(
    q_len: int, k_len: int, causal: bool = False, key_mask: jax.Array | None = None
) -> jax.Array | None:
    """Boolean mask broadcastable to [B, heads, q_len, k_len]; True = may attend.

    `key_mask` is [B, k_len] with True on real (non-padding) keys.
    """
    mask = None
    if causal:
        mask = jnp.tril(jnp.ones((q_len, k_len), dtype=bool), k=k_len - q_len)[None, None]
    if key_mask is not None:
        km = key_mask.astype(bool)[:, None, None, :]
        mask = km if mask is None else jnp.logical_and(mask, km)
    return mask


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """cuDNN flash attention on [B, T, H, Dh]. Its training kernels take even lengths only (a
    ViT's 197 tokens, CLIP's 77), so odd ones get one padding position, masked by length."""
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    lengths = {}
    if q_len % 2 or k_len % 2:
        pad = lambda x: jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))  # noqa: E731
        q, k, v = pad(q), pad(k), pad(v)
        lengths = dict(
            query_seq_lengths=jnp.full((batch,), q_len, jnp.int32),
            key_value_seq_lengths=jnp.full((batch,), k_len, jnp.int32),
        )
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn", **lengths)
    return out[:, :q_len]


class MultiHeadAttention(nn.Module):
    """Multi-head attention; q/k/v kernels [embed, heads, kv], output kernel [heads, kv, embed].

    `attention='xla'`: einsums with the softmax in float32 regardless of `dtype`; 'cudnn': cuDNN's
    fused (flash) attention through `jax.nn.dot_product_attention` (GPU only; bf16/fp16 compute).
    `causal` masks future keys (with either implementation); `mask` adds any other boolean mask
    ('xla' only).
    """

    num_heads: int
    out_features: int | None = None
    dtype: Any = jnp.float32
    init_std: float | None = None
    out_init_std: float | None = None
    out_axis: str = EMBED
    causal: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(
        self, x_q: jax.Array, x_kv: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        x_kv = x_q if x_kv is None else x_kv
        width = x_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        out_features = self.out_features or width
        std = self.init_std if self.init_std is not None else width**-0.5
        out_std = self.out_init_std if self.out_init_std is not None else width**-0.5

        def proj(name: str, inp: jax.Array) -> jax.Array:
            return nn.DenseGeneral(
                features=(self.num_heads, head_dim),
                axis=-1,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=logical(dense_init(std), (EMBED, HEADS, KV)),
                bias_init=logical(nn.initializers.zeros, (HEADS, KV)),
                name=name,
            )(inp)

        heads = (ACT_BATCH, None, ACT_HEADS, None)
        q = constrain(proj("query", x_q), heads)  # [B, Q, H, Dh]
        k = constrain(proj("key", x_kv), heads)  # [B, K, H, Dh]
        v = constrain(proj("value", x_kv), heads)
        if self.attention == "cudnn":
            if mask is not None:
                raise ValueError("attention='cudnn' takes causal=True, not a mask")
            out = _cudnn_attention(q, k, v, self.causal)
        else:
            if self.causal:
                causal = make_attention_mask(q.shape[1], k.shape[1], causal=True)
                mask = causal if mask is None else jnp.logical_and(mask, causal)
            q = q * jnp.asarray(head_dim**-0.5, q.dtype)
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
            if mask is not None:
                logits = jnp.where(mask, logits, _MASK_VALUE)
            weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = constrain(out, heads)
        return nn.DenseGeneral(
            features=out_features,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical(dense_init(out_std), (HEADS, KV, self.out_axis)),
            bias_init=logical(nn.initializers.zeros, (self.out_axis,)),
            name="out",
        )(out)


class MLP(nn.Module):
    """Two-layer MLP: fc [embed, mlp] -> activation -> proj [mlp, embed]."""

    hidden: int
    act: str = "quick_gelu"
    dtype: Any = jnp.float32
    init_std: float | None = None
    out_init_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        std = self.init_std if self.init_std is not None else (2 * width) ** -0.5
        out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
        h = nn.Dense(
            self.hidden,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical(dense_init(std), (EMBED, MLP_HIDDEN)),
            bias_init=logical(nn.initializers.zeros, (MLP_HIDDEN,)),
            name="fc",
        )(x)
        h = constrain(get_activation(self.act)(h), (ACT_BATCH, None, ACT_MLP))
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical(dense_init(out_std), (MLP_HIDDEN, EMBED)),
            bias_init=logical(nn.initializers.zeros, (EMBED,)),
            name="proj",
        )(h)


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)).

    Returns (x, None) to be scan-compatible.
    """

    num_heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Any = jnp.float32
    attn_std: float | None = None
    proj_std: float | None = None
    fc_std: float | None = None
    causal: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, None]:
        residual = (ACT_BATCH, None, None)  # [B, T, width], split like the batch
        x = constrain(x, residual)
        h = LayerNorm(self.eps, self.dtype, name="ln_1")(x)
        h = MultiHeadAttention(
            self.num_heads,
            dtype=self.dtype,
            init_std=self.attn_std,
            out_init_std=self.proj_std,
            causal=self.causal,
            attention=self.attention,
            name="attn",
        )(h, mask=mask)
        x = constrain(x + h, residual)
        h = LayerNorm(self.eps, self.dtype, name="ln_2")(x)
        h = MLP(
            self.mlp_dim,
            act=self.act,
            dtype=self.dtype,
            init_std=self.fc_std,
            out_init_std=self.proj_std,
            name="mlp",
        )(h)
        return constrain(x + h, residual), None


def _remat_policy(name: str):
    if name == "full":
        return None  # save nothing: recompute the whole block in the backward pass
    if name == "dots":
        return jax.checkpoint_policies.checkpoint_dots
    if name == "dots_no_batch":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {name!r}; expected one of {REMAT_POLICIES}")


class Transformer(nn.Module):
    """A stack of `layers` pre-LN residual blocks.

    With `scan_layers` the blocks are one `nn.scan`ned module named 'blocks' whose params have a
    leading [layers] axis (logical name 'layers'); otherwise they are 'block_0' ... 'block_{L-1}'.
    Use `stack_layer_params` / `unstack_layer_params` to convert between the two layouts.
    """

    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    causal: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        # OpenAI CLIP initialisation scales.
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        block_kwargs = dict(
            num_heads=self.heads,
            mlp_dim=int(round(self.width * self.mlp_ratio)),
            act=self.act,
            eps=self.eps,
            dtype=self.dtype,
            attn_std=attn_std,
            proj_std=proj_std,
            fc_std=fc_std,
            causal=self.causal,
            attention=self.attention,
        )
        block_cls = ResidualBlock
        if self.remat != "none":
            block_cls = nn.remat(
                block_cls, policy=_remat_policy(self.remat), prevent_cse=not self.scan_layers
            )
        if self.scan_layers:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.layers,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )
            x, _ = stack(**block_kwargs, name="blocks")(x, mask)
        else:
            for i in range(self.layers):
                x, _ = block_cls(**block_kwargs, name=f"block_{i}")(x, mask)
        return x


# ---------------------------------------------------------------------------------------------
# Converting between the scanned ('blocks', stacked) and looped ('block_i') parameter layouts.

_BLOCK_RE = re.compile(r"^block_(\d+)$")


def _unbox(tree: Any) -> Any:
    return nn.meta.unbox(tree)


def stack_layer_params(params: Any) -> Any:
    """Looped layout -> scanned layout: every {'block_0'..'block_{L-1}'} becomes
    {'blocks': stacked}."""
    params = _unbox(params)
    if not isinstance(params, dict):
        return params
    blocks = {k: v for k, v in params.items() if _BLOCK_RE.match(k)}
    out = {k: stack_layer_params(v) for k, v in params.items() if k not in blocks}
    if blocks:
        n = len(blocks)
        missing = [i for i in range(n) if f"block_{i}" not in blocks]
        if missing:
            raise ValueError(f"non-contiguous transformer blocks: missing block_{missing[0]}")
        layers = [blocks[f"block_{i}"] for i in range(n)]
        out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layer_params(params: Any) -> Any:
    """Scanned layout -> looped layout: every {'blocks': stacked} becomes {'block_0'..}."""
    params = _unbox(params)
    if not isinstance(params, dict):
        return params
    out = {k: unstack_layer_params(v) for k, v in params.items() if k != "blocks"}
    if "blocks" in params:
        leaves = jax.tree.leaves(params["blocks"])
        n = leaves[0].shape[0]
        for i in range(n):
            out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
    return out


def count_params(tree: Any) -> int:
    """Number of scalars in a (possibly abstract / boxed) pytree."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(_unbox(tree))))
