"""Pick a loss from config: `make_loss(loss_config, mesh)` -> fn(outputs, queue=None) -> (loss,
metrics). `validate_loss_config` rejects unknown keys/values and unsupported combinations early.

Keys (defaults in LOSS_DEFAULTS): name 'softmax'|'sigmoid'|'tokenwise'; impl
'reference'|'gathered'|'ring'; queue_size (K, softmax only; the trainer keeps a QueueState and an
EMA copy of the encoders updated with `momentum`); tile (ring only); batch_axes; tokenwise_mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from clipjax.losses.common import BATCH_AXES, as_axes, batch_axis_size, check_divisible
from clipjax.losses.infonce import infonce_gathered, infonce_reference
from clipjax.losses.queue import QueueState
from clipjax.losses.ring import infonce_ring
from clipjax.losses.sigmoid import sigmoid_gathered, sigmoid_reference, sigmoid_ring
from clipjax.losses.tokenwise import MODES, tokenwise_gathered, tokenwise_reference

NAMES = ("softmax", "sigmoid", "tokenwise")
IMPLS = ("reference", "gathered", "ring")
LOSS_DEFAULTS: dict[str, Any] = {
    "name": "softmax",
    "impl": "gathered",
    "queue_size": 0,
    "momentum": 0.995,
    "tile": None,
    "batch_axes": BATCH_AXES,
    "tokenwise_mode": "filip",
}
_SUPPORTED_IMPLS = {"softmax": IMPLS, "sigmoid": IMPLS, "tokenwise": ("reference", "gathered")}

LossFn = Callable[[Mapping[str, Any], QueueState | None], tuple[jax.Array, dict]]


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"loss config must be a mapping or ConfigDict, got {type(cfg).__name__}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_loss_config(loss_config) -> dict:
    """Defaults filled in and every key checked; raises ValueError naming the offending key."""
    given = _as_dict(loss_config)
    unknown = sorted(set(given) - set(LOSS_DEFAULTS))
    if unknown:
        raise ValueError(f"loss config: unknown key(s) {unknown}; expected keys from "
                         f"{sorted(LOSS_DEFAULTS)}")
    cfg = {**LOSS_DEFAULTS, **given}
    name, impl = cfg["name"], cfg["impl"]
    if name not in NAMES:
        raise ValueError(f"loss.name={name!r} is not supported; expected one of {NAMES}")
    if impl not in IMPLS:
        raise ValueError(f"loss.impl={impl!r} is not supported; expected one of {IMPLS}")
    if impl not in _SUPPORTED_IMPLS[name]:
        raise ValueError(f"loss.impl={impl!r} is not available for loss.name={name!r}; "
                         f"use one of {_SUPPORTED_IMPLS[name]}")
    k = cfg["queue_size"]
    if not _is_int(k) or k < 0:
        raise ValueError(f"loss.queue_size must be an int >= 0 (0 = no momentum queue), got {k!r}")
    if k > 0 and name != "softmax":
        raise ValueError(f"loss.queue_size={k} needs loss.name='softmax' (the momentum queue adds "
                         f"softmax negatives); got loss.name={name!r}. Set loss.queue_size=0.")
    m = cfg["momentum"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
        raise ValueError(f"loss.momentum (EMA decay of the queue encoders) must be a float in "
                         f"[0, 1), got {m!r}")
    tile = cfg["tile"]
    if tile is not None:
        if not _is_int(tile) or tile <= 0:
            raise ValueError(f"loss.tile must be a positive int or None, got {tile!r}")
        if impl != "ring":
            raise ValueError(f"loss.tile={tile} only applies to loss.impl='ring' (got "
                             f"loss.impl={impl!r}); set loss.tile=None")
    axes = cfg["batch_axes"]
    if isinstance(axes, str):
        axes = (axes,)
    if (not isinstance(axes, Sequence) or not axes
            or not all(isinstance(a, str) and a for a in axes)):
        raise ValueError(f"loss.batch_axes must be a non-empty sequence of mesh axis names, "
                         f"got {cfg['batch_axes']!r}")
    cfg["batch_axes"] = tuple(axes)
    if cfg["tokenwise_mode"] not in MODES:
        raise ValueError(f"loss.tokenwise_mode={cfg['tokenwise_mode']!r} is not supported; "
                         f"expected one of {MODES}")
    return cfg


_REQUIRED = {"softmax": ("image_embeds", "text_embeds", "logit_scale"),
             "sigmoid": ("image_embeds", "text_embeds", "logit_scale", "logit_bias"),
             "tokenwise": ("image_tokens", "text_tokens", "text_mask", "logit_scale")}


def make_loss(loss_config, mesh: Mesh | None) -> LossFn:
    """A loss function over the CLIP model's output dict; `mesh` may be None for 'reference'."""
    cfg = validate_loss_config(loss_config)
    name, impl, k = cfg["name"], cfg["impl"], cfg["queue_size"]
    axes = as_axes(cfg["batch_axes"])
    if impl != "reference":
        if mesh is None:
            raise ValueError(f"loss.impl={impl!r} needs a device mesh; got mesh=None")
        try:
            n = batch_axis_size(mesh, axes)
        except ValueError as e:
            raise ValueError(f"loss.batch_axes: {e}") from None
        if k:
            check_divisible(k, n, "loss.queue_size")

    def loss_fn(outputs: Mapping[str, Any], queue: QueueState | None = None):
        missing = [key for key in _REQUIRED[name] if outputs.get(key) is None]
        if missing:
            raise ValueError(f"loss {name!r}: model outputs lack {missing} "
                             f"(got keys {sorted(outputs)})")
        if k and queue is None:
            raise ValueError(f"loss.queue_size={k} but no QueueState was passed to the loss")
        if queue is not None and queue.image.shape[0] != k:
            raise ValueError(f"queue has {queue.image.shape[0]} slots but loss.queue_size={k}")
        ls = outputs["logit_scale"]
        if name == "softmax":
            img, txt = outputs["image_embeds"], outputs["text_embeds"]
            if impl == "reference":
                loss, aux = infonce_reference(img, txt, ls, queue=queue)
            elif impl == "gathered":
                loss, aux = infonce_gathered(img, txt, ls, mesh, axes, queue=queue)
            else:
                loss, aux = infonce_ring(img, txt, ls, mesh, axes, queue=queue, tile=cfg["tile"])
        elif name == "sigmoid":
            img, txt, bias = outputs["image_embeds"], outputs["text_embeds"], outputs["logit_bias"]
            if impl == "reference":
                loss, aux = sigmoid_reference(img, txt, ls, bias)
            elif impl == "gathered":
                loss, aux = sigmoid_gathered(img, txt, ls, bias, mesh, axes)
            else:
                loss, aux = sigmoid_ring(img, txt, ls, bias, mesh, axes, tile=cfg["tile"])
            aux = {**aux, "logit_bias": jnp.asarray(bias, jnp.float32)}
        else:
            args = (outputs["image_tokens"], outputs["text_tokens"], outputs["text_mask"], ls)
            if impl == "reference":
                loss, aux = tokenwise_reference(*args, mode=cfg["tokenwise_mode"])
            else:
                loss, aux = tokenwise_gathered(*args, mesh, axes, mode=cfg["tokenwise_mode"])
        metrics = {"loss": loss, "temperature": jnp.exp(jnp.asarray(ls, jnp.float32)),
                   **jax.lax.stop_gradient(aux)}
        return loss, metrics

    return loss_fn
