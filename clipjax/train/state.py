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
    model_state: the model's non-param collections (BatchNorm statistics), {} for most models;
    opt_state: optax state over the trainable params only; rng: raw uint32[2] key, split each step;
    loss_state: the loss's own state (clipjax.losses.Loss: momentum queue + EMA params), {} when
    the loss has none; nonfinite_streak / nonfinite_total: skipped updates in a row / overall."""

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    loss_state: Any
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array

    @classmethod
    def create(
        cls,
        params: Any,
        opt_state: Any,
        rng: jax.Array,
        model_state: Any = None,
        loss_state: Any = None,
    ) -> "TrainState":
        zero = jnp.zeros((), jnp.int32)
        return cls(
            step=zero,
            params=params,
            model_state=model_state or {},
            opt_state=opt_state,
            rng=rng,
            loss_state=loss_state or {},
            nonfinite_streak=zero,
            nonfinite_total=zero,
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields (the checkpointed form)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{f: d[f] for f in cls.__dataclass_fields__})


def make_state_init(
    model: Any,
    boxed: Any,
    optimizer: Any,
    loss: Any,
    mesh: Any,
    rules: Any,
    compiler_options: dict | None = None,
) -> tuple[Any, Any, Any]:
    """(jitted init(rng) -> TrainState placed on the mesh, the state's NamedShardings, the state
    as ShapeDtypeStructs with those shardings).

    `boxed`: `jax.eval_shape(model.init, ...)` (the variables with their logical axes). Params
    follow the logical-axis rules; optimizer moments follow their parameter; the loss state is
    laid out by the loss (`Loss.state_shardings`); scalars are replicated.
    """
    import flax.linen as nn

    from clipjax.models import dummy_inputs

    cfg = model.config
    images, text = dummy_inputs(cfg)

    def state_from(variables: dict, state_rng: jax.Array) -> TrainState:
        variables = dict(variables)
        params = variables.pop("params")
        trainable, _ = optimizer.split(params)
        return TrainState.create(
            params,
            optimizer.tx.init(trainable),
            state_rng,
            model_state=variables,
            loss_state=loss.init_state(params, cfg.embed_dim),
        )

    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        return state_from(nn.meta.unbox(model.init(init_rng, images, text)), state_rng)

    # The layout without tracing the model again (tracing it is most of a start-up's init).
    abstract = jax.eval_shape(state_from, nn.meta.unbox(boxed), jax.random.PRNGKey(0))
    shardings = _state_shardings(boxed, abstract, optimizer, loss, mesh, rules)
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings
    )
    jitted = jax.jit(
        init, out_shardings=shardings, compiler_options=_init_options(compiler_options)
    )
    return jitted, shardings, abstract


def _init_options(compiler_options: dict | None) -> dict | None:
    """The init's compiler options: the step's, and on CPU LLVM's optimisation level 1 unless
    set. The init runs once; level 1 compiles it in ~40% less time than the default level 3, with
    bit-identical values and the same run time (tiny and B/32, benchmarks/RESULTS.md)."""
    options = dict(compiler_options or {})
    if jax.default_backend() == "cpu":
        options.setdefault("xla_backend_optimization_level", 1)
    return options or None


def _state_shardings(
    boxed: Any, abstract: TrainState, optimizer: Any, loss: Any, mesh: Any, rules: Any
) -> TrainState:
    """The NamedShardings of a TrainState, given the model's boxed (logically annotated)
    variables and the abstract state."""
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from clipjax.parallel.rules import tree_shardings

    replicated = NamedSharding(mesh, P())
    var_shardings = tree_shardings(boxed, mesh, rules)
    param_sh = var_shardings["params"]
    train_sh, _ = optimizer.split(param_sh)
    opt_sh = optax.tree_map_params(
        optimizer.tx,
        lambda _, s: s,
        abstract.opt_state,
        train_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(
        step=replicated,
        params=param_sh,
        model_state={k: v for k, v in var_shardings.items() if k != "params"},
        opt_state=opt_sh,
        rng=replicated,
        loss_state=loss.state_shardings(param_sh, abstract.loss_state),
        nonfinite_streak=replicated,
        nonfinite_total=replicated,
    )
