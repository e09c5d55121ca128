"""The train state: one pytree holding everything a restart needs except the data position.

The data position is host-side (the input pipeline's reader state) and travels as JSON metadata
next to this state in each checkpoint (see clipjax.train.checkpoint).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step: updates attempted (int32); params: full model params (frozen parts included);
    opt_state: optax state over the trainable params only; rng: raw uint32[2] key, split each step;
    loss_state: the loss's own state (momentum queue + EMA params), {} when the loss has none;
    nonfinite_streak / nonfinite_total: skipped updates in a row / overall."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    loss_state: Any
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array

    @classmethod
    def create(cls, params: Any, opt_state: Any, rng: jax.Array, loss_state: Any = None
               ) -> "TrainState":
        zero = jnp.zeros((), jnp.int32)
        return cls(step=zero, params=params, opt_state=opt_state, rng=rng,
                   loss_state={} if loss_state is None else loss_state,
                   nonfinite_streak=zero, nonfinite_total=zero)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields (the checkpointed form)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{f: d[f] for f in cls.__dataclass_fields__})


def make_state_init(model: Any, optimizer: Any, mesh: Any, rules: Any, queue_size: int = 0,
                    compiler_options: dict | None = None) -> tuple[Any, Any]:
    """(jitted init(rng) -> TrainState placed on the mesh, the state's NamedShardings).

    Params follow the logical-axis rules; optimizer moments follow their parameter; the momentum
    queue is split over the batch axes; the EMA params mirror the params; scalars are replicated.
    """
    import flax.linen as nn
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from clipjax.models import dummy_inputs
    from clipjax.parallel.mesh import BATCH_AXES
    from clipjax.parallel.rules import fit_spec, tree_shardings

    cfg = model.config
    images, text = dummy_inputs(cfg)
    replicated = NamedSharding(mesh, P())

    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        variables = nn.meta.unbox(model.init(init_rng, images, text))
        params = variables.pop("params")
        trainable, _ = optimizer.split(params)
        loss_state: dict[str, Any] = {}
        if variables:  # non-param collections, e.g. BatchNorm statistics
            loss_state["model_state"] = dict(variables)
        if queue_size:
            from clipjax.losses import queue_init

            loss_state["queue"] = queue_init(queue_size, cfg.embed_dim)
            loss_state["ema_params"] = params
        return TrainState.create(params, optimizer.tx.init(trainable), state_rng, loss_state)

    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, text)
    var_shardings = tree_shardings(boxed, mesh, rules)
    param_sh = var_shardings["params"]
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    train_sh, _ = optimizer.split(param_sh)
    opt_sh = optax.tree_map_params(
        optimizer.tx, lambda _, s: s, abstract.opt_state, train_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    loss_sh: dict[str, Any] = {}
    if "model_state" in abstract.loss_state:
        loss_sh["model_state"] = {k: v for k, v in var_shardings.items() if k != "params"}
    if queue_size:
        q = abstract.loss_state["queue"]
        emb = NamedSharding(mesh, fit_spec(P(BATCH_AXES, None), q.image.shape, mesh))
        loss_sh["queue"] = type(q)(image=emb, text=emb, ptr=replicated, count=replicated)
        loss_sh["ema_params"] = param_sh
    shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                           loss_state=loss_sh, nonfinite_streak=replicated,
                           nonfinite_total=replicated)
    return jax.jit(init, out_shardings=shardings, compiler_options=compiler_options), shardings
