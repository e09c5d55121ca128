"""Pick a loss from config: `make_loss(loss_config, mesh)` -> a `Loss` that owns its state.
`validate_loss_config` rejects unknown keys/values and unsupported combinations early.

Keys (defaults in LOSS_DEFAULTS): name 'softmax'|'sigmoid'|'tokenwise'; impl
'reference'|'gathered'|'ring'; queue_size (K: a momentum queue of EMA embeddings as extra
negatives, softmax only); momentum (EMA decay of the encoders behind the queue and the duplicate
test); tile (ring only); tokenwise_mode. False-negative rules (softmax only, see
clipjax.losses.pairs): positives 'pair'|'caption'|'label'|'auto' (pairs of one caption / label are
positives; 'auto' = label when the shards carry labels, else caption); in_batch_negatives (False:
negatives come from the queue only and positives are the partners' momentum-encoder embeddings,
MoCo-style); duplicate_threshold (None, or the EMA cosine
above which a negative is left out as a near-duplicate of the positive).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clipjax.losses.common import BATCH_AXES, batch_axis_size, check_divisible
from clipjax.losses.infonce import infonce_gathered, infonce_reference
from clipjax.losses.pairs import (
    PairInfo,
    PairRules,
    batch_homogeneity,
    caption_groups,
    label_groups,
)
from clipjax.losses.queue import QueueState, ema_update, queue_init, queue_push
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
    "tokenwise_mode": "filip",
    "positives": "pair",
    "in_batch_negatives": True,
    "duplicate_threshold": None,
}
POSITIVES = ("pair", "caption", "label", "auto")
_SUPPORTED_IMPLS = {"softmax": IMPLS, "sigmoid": IMPLS, "tokenwise": ("reference", "gathered")}


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
        raise ValueError(
            f"loss config: unknown key(s) {unknown}; expected keys from {sorted(LOSS_DEFAULTS)}"
        )
    cfg = {**LOSS_DEFAULTS, **given}
    _check_name_and_impl(cfg)
    _check_queue(cfg)
    _check_tile(cfg)
    _check_pair_rules(cfg)
    if cfg["tokenwise_mode"] not in MODES:
        raise ValueError(
            f"loss.tokenwise_mode={cfg['tokenwise_mode']!r} is not supported; "
            f"expected one of {MODES}"
        )
    return cfg


def _check_name_and_impl(cfg: dict) -> None:
    """loss.name and loss.impl: each known, and the pair implemented."""
    name, impl = cfg["name"], cfg["impl"]
    if name not in NAMES:
        raise ValueError(f"loss.name={name!r} is not supported; expected one of {NAMES}")
    if impl not in IMPLS:
        raise ValueError(f"loss.impl={impl!r} is not supported; expected one of {IMPLS}")
    if impl not in _SUPPORTED_IMPLS[name]:
        raise ValueError(
            f"loss.impl={impl!r} is not available for loss.name={name!r}; "
            f"use one of {_SUPPORTED_IMPLS[name]}"
        )


def _check_queue(cfg: dict) -> None:
    """loss.queue_size (softmax only) and loss.momentum (the EMA decay)."""
    k, name = cfg["queue_size"], cfg["name"]
    if not _is_int(k) or k < 0:
        raise ValueError(f"loss.queue_size must be an int >= 0 (0 = no momentum queue), got {k!r}")
    if k > 0 and name != "softmax":
        raise ValueError(
            f"loss.queue_size={k} needs loss.name='softmax' (the momentum queue adds "
            f"softmax negatives); got loss.name={name!r}. Set loss.queue_size=0."
        )
    m = cfg["momentum"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
        raise ValueError(
            f"loss.momentum (EMA decay of the queue encoders) must be a float in [0, 1), got {m!r}"
        )


def _check_tile(cfg: dict) -> None:
    """loss.tile: None, or a positive int under loss.impl='ring'."""
    tile, impl = cfg["tile"], cfg["impl"]
    if tile is None:
        return
    if not _is_int(tile) or tile <= 0:
        raise ValueError(f"loss.tile must be a positive int or None, got {tile!r}")
    if impl != "ring":
        raise ValueError(
            f"loss.tile={tile} only applies to loss.impl='ring' (got "
            f"loss.impl={impl!r}); set loss.tile=None"
        )


def _check_pair_rules(cfg: dict) -> None:
    """loss.positives / in_batch_negatives / duplicate_threshold: valid values, softmax only,
    and a queue when in-batch negatives are off."""
    rules_on = (
        cfg["positives"] != "pair"
        or not cfg["in_batch_negatives"]
        or cfg["duplicate_threshold"] is not None
    )
    if cfg["positives"] not in POSITIVES:
        raise ValueError(
            f"loss.positives={cfg['positives']!r} is not supported; expected one of {POSITIVES}"
        )
    if not isinstance(cfg["in_batch_negatives"], bool):
        raise ValueError(
            f"loss.in_batch_negatives must be True or False, got {cfg['in_batch_negatives']!r}"
        )
    if not cfg["in_batch_negatives"] and not cfg["queue_size"]:
        raise ValueError(
            "loss.in_batch_negatives=False takes every negative from the momentum "
            "queue: set loss.queue_size > 0 (a queue spanning several categories)"
        )
    t = cfg["duplicate_threshold"]
    if t is not None and (
        isinstance(t, bool) or not isinstance(t, (int, float)) or not -1.0 < t <= 1.0
    ):
        raise ValueError(f"loss.duplicate_threshold must be None or a cosine in (-1, 1], got {t!r}")
    if rules_on and cfg["name"] != "softmax":
        raise ValueError(
            f"loss.positives / in_batch_negatives / duplicate_threshold apply to "
            f"loss.name='softmax'; got loss.name={cfg['name']!r}"
        )


_REQUIRED = {
    "softmax": ("image_embeds", "text_embeds", "logit_scale"),
    "sigmoid": ("image_embeds", "text_embeds", "logit_scale", "logit_bias"),
    "tokenwise": ("image_tokens", "text_tokens", "text_mask", "logit_scale"),
}

# embed(params, batch) -> (image_embeds, text_embeds): the model's forward without gradients.
EmbedFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Loss:
    """A configured contrastive loss and the state it owns (momentum queue, EMA encoders).

    Per train step: `prepare` (EMA update, the batch's EMA embeddings and groups) -> `loss_fn`
    (differentiated) -> `update_state` (queue push). The state is {} for losses without one.
    """

    config: dict
    mesh: Mesh | None
    positives: str  # 'pair' | 'caption' | 'label' ('auto' resolved)

    @property
    def rules(self) -> PairRules:
        return PairRules(
            group_positives=self.positives != "pair",
            duplicate_threshold=self.config["duplicate_threshold"],
            batch_negatives=self.config["in_batch_negatives"],
        )

    @property
    def uses_ema(self) -> bool:
        """EMA encoders are kept for the queue's embeddings and for near-duplicate masking."""
        return self.config["queue_size"] > 0 or self.config["duplicate_threshold"] is not None

    @property
    def group_width(self) -> int:
        return {"pair": 0, "caption": 2, "label": 1}[self.positives]

    # -- state --------------------------------------------------------------------------------
    def init_state(self, params: Any, embed_dim: int) -> dict:
        state = {"ema_params": params} if self.uses_ema else {}
        if self.config["queue_size"]:
            state["queue"] = queue_init(
                self.config["queue_size"], embed_dim, group_width=self.group_width
            )
        return state

    def state_shardings(self, param_shardings: Any, abstract_state: dict) -> dict:
        """NamedShardings of `init_state`'s tree: EMA params as the params, queue rows split on
        the batch axes (when they divide), counters replicated."""
        out = {"ema_params": param_shardings} if "ema_params" in abstract_state else {}
        if "queue" in abstract_state:
            q = abstract_state["queue"]
            n = batch_axis_size(self.mesh, BATCH_AXES)
            rows = NamedSharding(self.mesh, P(BATCH_AXES) if q.image.shape[0] % n == 0 else P())
            replicated = NamedSharding(self.mesh, P())
            out["queue"] = QueueState(
                image=rows,
                text=rows,
                group=None if q.group is None else rows,
                ptr=replicated,
                count=replicated,
            )
        return out

    def groups(self, batch: Mapping[str, jax.Array]) -> jax.Array | None:
        if self.positives == "caption":
            return caption_groups(batch["text"])
        if self.positives == "label":
            return label_groups(batch["label"])
        return None

    def prepare(
        self, state: dict, params: Any, batch: Mapping[str, jax.Array], embed: EmbedFn
    ) -> tuple[dict, PairInfo]:
        """(state with the EMA encoders moved towards `params`, the batch's PairInfo)."""
        if not self.uses_ema:
            return state, PairInfo(group=self.groups(batch))
        ema = ema_update(state["ema_params"], params, self.config["momentum"])
        img, txt = embed(jax.lax.stop_gradient(ema), batch)
        info = PairInfo(
            group=self.groups(batch),
            ema_image=jax.lax.stop_gradient(img),
            ema_text=jax.lax.stop_gradient(txt),
        )
        return {**state, "ema_params": ema}, info

    def update_state(self, state: dict, info: PairInfo) -> dict:
        """Push the batch's EMA embeddings (and groups) into the queue."""
        if "queue" not in state:
            return state
        return {
            **state,
            "queue": queue_push(state["queue"], info.ema_image, info.ema_text, info.group),
        }

    # -- the loss -----------------------------------------------------------------------------
    def loss_fn(
        self,
        outputs: Mapping[str, Any],
        state: dict | None = None,
        info: PairInfo | None = None,
        batch: Mapping[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict]:
        """(loss, metrics) over the CLIP model's output dict; with `batch`, the metrics include
        how homogeneous the batch is (clipjax.losses.pairs.batch_homogeneity)."""
        cfg, name, impl, mesh = self.config, self.config["name"], self.config["impl"], self.mesh
        missing = [key for key in _REQUIRED[name] if outputs.get(key) is None]
        if missing:
            raise ValueError(
                f"loss {name!r}: model outputs lack {missing} (got keys {sorted(outputs)})"
            )
        queue = (state or {}).get("queue")
        if cfg["queue_size"] and queue is None:
            raise ValueError(
                f"loss.queue_size={cfg['queue_size']} but the loss state has no "
                "queue (pass state=Loss.init_state(...))"
            )
        if queue is not None and queue.image.shape[0] != cfg["queue_size"]:
            raise ValueError(
                f"queue has {queue.image.shape[0]} slots but loss.queue_size={cfg['queue_size']}"
            )
        ls = outputs["logit_scale"]
        if name == "softmax":
            img, txt = outputs["image_embeds"], outputs["text_embeds"]
            kw = dict(queue=queue, rules=self.rules, pairs=info)
            if impl == "reference":
                loss, aux = infonce_reference(img, txt, ls, **kw)
            elif impl == "gathered":
                loss, aux = infonce_gathered(img, txt, ls, mesh, BATCH_AXES, **kw)
            else:
                loss, aux = infonce_ring(img, txt, ls, mesh, BATCH_AXES, tile=cfg["tile"], **kw)
        elif name == "sigmoid":
            img, txt, bias = outputs["image_embeds"], outputs["text_embeds"], outputs["logit_bias"]
            if impl == "reference":
                loss, aux = sigmoid_reference(img, txt, ls, bias)
            elif impl == "gathered":
                loss, aux = sigmoid_gathered(img, txt, ls, bias, mesh, BATCH_AXES)
            else:
                loss, aux = sigmoid_ring(img, txt, ls, bias, mesh, BATCH_AXES, tile=cfg["tile"])
            aux = {**aux, "logit_bias": jnp.asarray(bias, jnp.float32)}
        else:
            args = (outputs["image_tokens"], outputs["text_tokens"], outputs["text_mask"], ls)
            if impl == "reference":
                loss, aux = tokenwise_reference(*args, mode=cfg["tokenwise_mode"])
            else:
                loss, aux = tokenwise_gathered(*args, mesh, BATCH_AXES, mode=cfg["tokenwise_mode"])
        metrics = {"loss": loss, "temperature": jnp.exp(jnp.asarray(ls, jnp.float32)), **aux}
        if batch is not None and outputs.get("text_embeds") is not None:
            metrics.update(
                batch_homogeneity(batch["text"], outputs["text_embeds"], batch.get("label"))
            )
        return loss, jax.lax.stop_gradient(metrics)


def make_loss(loss_config, mesh: Mesh | None, has_labels: bool = False) -> Loss:
    """The configured loss; `mesh` may be None for 'reference'. `has_labels`: the training
    batches carry a 'label' (resolves loss.positives='auto'; needed for 'label')."""
    cfg = validate_loss_config(loss_config)
    positives = cfg["positives"]
    if positives == "auto":
        positives = "label" if has_labels else "caption"
    if positives == "label" and not has_labels:
        raise ValueError(
            "loss.positives='label' needs training shards with labels (make_shards "
            "--class-folders or --label-field writes them); use 'caption' or 'auto'"
        )
    if cfg["impl"] != "reference":
        if mesh is None:
            raise ValueError(f"loss.impl={cfg['impl']!r} needs a device mesh; got mesh=None")
        n = batch_axis_size(mesh, BATCH_AXES)
        if cfg["queue_size"]:
            check_divisible(cfg["queue_size"], n, "loss.queue_size")
    return Loss(config=cfg, mesh=mesh, positives=positives)
