"""The two-tower CLIP model and its configuration.

`CLIP.__call__(images, text)` returns the output dict every loss consumes (see `CLIP.__call__`);
`encode_image` / `encode_text` give L2-normalised joint-space embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.layers import ACTIVATIONS, ATTENTION_IMPLS, REMAT_POLICIES, logical
from clipjax.models.resnet import ModifiedResNet
from clipjax.models.text import TextTransformer, text_mask_from_ids
from clipjax.models.vit import VisionTransformer

VISION_TYPES = ("vit", "resnet")
# CLIPConfig fields that change neither the parameters nor the function they compute at
# evaluation (how it computes, and training-only regularisation): a resume may change them.
COMPUTE_FIELDS = ("dtype", "remat", "attention", "patch_dropout")
# The fields a model spec (a train config's `model` section) sets besides `overrides`: the above
# and layer scan, which changes the params' layout (stacked layers) but not their values.
SPEC_FIELDS = (*COMPUTE_FIELDS, "scan_layers")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"CLIPConfig.{key}={value!r} is invalid: expected {expected}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture and numerics of a CLIP model. Immutable; use `dataclasses.replace` to vary.

    ViT towers: `vision_layers` is an int and `patch_size` is used. ResNet towers
    (`vision_type='resnet'`): `vision_layers` is the 4 stage depths and `vision_width` the stem
    width.
    """

    embed_dim: int = 512
    # Image tower.
    vision_type: str = "vit"
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int | tuple[int, ...] = 12
    vision_heads: int | None = None  # default: width // 64 (ViT), width * 32 // 64 (ResNet)
    # Text tower.
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    # Shared transformer settings.
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Temperature / bias (log scale is learned; output clamped at logit_scale_max).
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    logit_bias_init: float | None = None  # e.g. -10.0 for the sigmoid (SigLIP) loss
    # Compute.
    dtype: str = "float32"  # compute dtype; params are always float32
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "xla"  # 'cudnn': cuDNN flash attention (GPU, bfloat16)
    # Training only: share of a ViT's patch tokens dropped per training image (FLIP);
    # see clipjax.models.patch_dropout.
    patch_dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.vision_layers, list):
            object.__setattr__(self, "vision_layers", tuple(self.vision_layers))
        if self.vision_type not in VISION_TYPES:
            raise _bad("vision_type", self.vision_type, f"one of {VISION_TYPES}")
        self._check_compute()
        for key in (
            "embed_dim",
            "image_size",
            "vision_width",
            "context_length",
            "vocab_size",
            "text_width",
            "text_layers",
            "text_heads",
        ):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise _bad(key, getattr(self, key), "a positive int")
        if self.vision_type == "vit":
            default_heads = self._check_vit_tower()
        else:
            default_heads = self._check_resnet_tower()
        if self.vision_heads is None:
            object.__setattr__(self, "vision_heads", max(default_heads, 1))
        pool_width = self.vision_width * (32 if self.vision_type == "resnet" else 1)
        if pool_width % self.vision_heads:
            raise _bad(
                "vision_heads", self.vision_heads, f"a divisor of the vision width {pool_width}"
            )
        if self.text_width % self.text_heads:
            raise _bad("text_heads", self.text_heads, f"a divisor of text_width={self.text_width}")

    def _check_compute(self) -> None:
        """Numerics and implementation choices: dtype, remat, attention, act, patch_dropout."""
        if self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, f"one of {tuple(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise _bad("remat", self.remat, f"one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise _bad("attention", self.attention, f"one of {ATTENTION_IMPLS}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise _bad("attention", self.attention, "'xla' with float32 compute (cuDNN: bf16)")
        if self.act not in ACTIVATIONS:
            raise _bad("act", self.act, f"one of {ACTIVATIONS}")
        if (
            isinstance(self.patch_dropout, bool)
            or not isinstance(self.patch_dropout, (int, float))
            or not 0.0 <= self.patch_dropout < 1.0
        ):
            raise _bad("patch_dropout", self.patch_dropout, "a number in [0, 1)")
        if self.patch_dropout and self.vision_type != "vit":
            raise _bad("patch_dropout", self.patch_dropout, "0 for a ResNet tower (ViT only)")

    def _check_vit_tower(self) -> int:
        """A ViT image tower's depth and patch size; returns its default head count."""
        if not isinstance(self.vision_layers, int) or self.vision_layers <= 0:
            raise _bad("vision_layers", self.vision_layers, "a positive int for a ViT tower")
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise _bad(
                "patch_size",
                self.patch_size,
                f"a positive divisor of image_size={self.image_size}",
            )
        return self.vision_width // 64

    def _check_resnet_tower(self) -> int:
        """A ResNet image tower's stage depths and image size; returns its default head count
        (of the attention pool)."""
        if (
            not isinstance(self.vision_layers, tuple)
            or len(self.vision_layers) != 4
            or not all(isinstance(n, int) and n > 0 for n in self.vision_layers)
        ):
            raise _bad(
                "vision_layers",
                self.vision_layers,
                "4 positive stage depths for a ResNet tower",
            )
        if self.image_size % 32:
            raise _bad("image_size", self.image_size, "a multiple of 32 for a ResNet tower")
        return self.vision_width * 32 // 64

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["vision_layers"], tuple):
            d["vision_layers"] = list(d["vision_layers"])
        return d

    def architecture(self) -> dict[str, Any]:
        """`to_dict()` without SPEC_FIELDS: what the weights and eval outputs depend on."""
        return {k: v for k, v in self.to_dict().items() if k not in SPEC_FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CLIPConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(d))


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x|| in float32 (safe at zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-24))


class CLIP(nn.Module):
    """Image tower + text tower + learned temperature (and optional bias)."""

    config: CLIPConfig

    def setup(self) -> None:
        cfg = self.config
        dtype = cfg.compute_dtype
        # Settings both transformer stacks share.
        stack = dict(
            mlp_ratio=cfg.mlp_ratio,
            act=cfg.act,
            eps=cfg.layer_norm_eps,
            dtype=dtype,
            scan_layers=cfg.scan_layers,
            remat=cfg.remat,
            attention=cfg.attention,
        )
        if cfg.vision_type == "vit":
            self.visual = VisionTransformer(
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                width=cfg.vision_width,
                layers=cfg.vision_layers,
                heads=cfg.vision_heads,
                output_dim=cfg.embed_dim,
                patch_dropout=cfg.patch_dropout,
                **stack,
            )
        else:
            self.visual = ModifiedResNet(
                image_size=cfg.image_size,
                layers=cfg.vision_layers,
                width=cfg.vision_width,
                heads=cfg.vision_heads,
                output_dim=cfg.embed_dim,
                dtype=dtype,
            )
        self.text = TextTransformer(
            vocab_size=cfg.vocab_size,
            context_length=cfg.context_length,
            width=cfg.text_width,
            layers=cfg.text_layers,
            heads=cfg.text_heads,
            output_dim=cfg.embed_dim,
            **stack,
        )
        self.logit_scale = self.param(
            "logit_scale", logical(nn.initializers.constant(cfg.logit_scale_init), ()), ()
        )
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", logical(nn.initializers.constant(cfg.logit_bias_init), ()), ()
            )

    def _image(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        return self.visual(images, train=train)

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images NHWC float32 (CLIP-normalised) -> [B, D] L2-normalised float32."""
        return l2_normalize(self._image(images, train)[0])

    def encode_text(self, text: jax.Array) -> jax.Array:
        """token ids int32 [B, L] -> [B, D] L2-normalised float32."""
        return l2_normalize(self.text(text)[0])

    def logit_params(self) -> tuple[jax.Array, jax.Array | None]:
        """(log temperature clamped at logit_scale_max, logit bias or None), both float32
        scalars."""
        scale = jnp.minimum(self.logit_scale, self.config.logit_scale_max).astype(jnp.float32)
        bias = None
        if self.config.logit_bias_init is not None:
            bias = self.logit_bias.astype(jnp.float32)
        return scale, bias

    def __call__(
        self, images: jax.Array, text: jax.Array, train: bool = False
    ) -> dict[str, jax.Array | None]:
        """Both towers. Returns the dict of the shared model contract:

        `train`: BatchNorm in training mode (ResNet) and patch dropout (ViT with
        `patch_dropout` > 0: pass rngs={'patch_dropout': key}); then image_tokens has the kept
        patch count instead of N.

        image_embeds [B, D], text_embeds [B, D], image_tokens [B, N, D], text_tokens [B, L, D] (all
        L2-normalised float32), text_mask [B, L] bool (True up to and including end-of-text),
        logit_scale (log temperature, clamped at logit_scale_max), logit_bias (scalar or None).
        """
        img_pooled, img_tokens = self._image(images, train)
        txt_pooled, txt_tokens = self.text(text)
        scale, bias = self.logit_params()
        return {
            "image_embeds": l2_normalize(img_pooled),
            "text_embeds": l2_normalize(txt_pooled),
            "image_tokens": l2_normalize(img_tokens),
            "text_tokens": l2_normalize(txt_tokens),
            "text_mask": text_mask_from_ids(text),
            "logit_scale": scale,
            "logit_bias": bias,
        }


def dummy_inputs(cfg: CLIPConfig, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero images [B, S, S, 3] float32 and text [B, context_length] int32,
    for init / eval_shape."""
    images = jnp.zeros((batch, cfg.image_size, cfg.image_size, 3), jnp.float32)
    text = jnp.zeros((batch, cfg.context_length), jnp.int32)
    return images, text


def abstract_variables(cfg: CLIPConfig) -> dict[str, Any]:
    """Shapes of all variables (params, and batch_stats for ResNets) without allocating them."""
    model = CLIP(cfg)
    images, text = dummy_inputs(cfg)
    return jax.eval_shape(model.init, jax.random.key(0), images, text)


def num_params(cfg: CLIPConfig) -> int:
    """Number of parameters (BatchNorm running statistics are not parameters), via eval_shape."""
    from clipjax.models.layers import count_params

    return count_params(abstract_variables(cfg)["params"])
