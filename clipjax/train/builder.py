"""Compose model, optimizer, loss and mesh into the jitted init and train step of a config."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding

from clipjax.losses import Loss, make_loss
from clipjax.models import CLIP, CLIPConfig, abstract_variables, dummy_inputs
from clipjax.parallel.mesh import batch_sharding
from clipjax.parallel.rules import Rules, make_rules
from clipjax.train import config as config_lib
from clipjax.train.optimizer import Optimizer, make_optimizer
from clipjax.train.state import TrainState, make_state_init
from clipjax.train.step import (
    BoundStep,
    jit_train_step,
    make_embed_fn,
    make_grad_fn,
    make_train_step,
    used_outputs,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trainer:
    """Everything compiled for one config on one mesh."""

    config: ml_collections.ConfigDict
    model_config: CLIPConfig
    model: CLIP
    mesh: Mesh
    rules: Rules
    optimizer: Optimizer
    loss: Loss
    init: Callable[[jax.Array], TrainState]  # jitted, returns a state placed on the mesh
    train_step: BoundStep  # jitted (state, batch) -> (state, metrics); donates state
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs with their shardings
    batch_shardings: dict[str, NamedSharding]
    # Unjitted fn(trainable, frozen, model_state, batch, loss_state, info) -> (loss, metrics,
    # log_scale, model_state, grads): what the step differentiates (see make_grad_fn).
    grad_fn: Callable

    def init_state(self) -> TrainState:
        return self.init(jax.random.PRNGKey(self.config.seed))


def build_trainer(
    config: ml_collections.ConfigDict, mesh: Mesh, has_labels: bool = False
) -> Trainer:
    """Model, optimizer, loss, state layout and jitted step for `config` on `mesh`.
    `has_labels`: the training batches carry a 'label' array (labelled shards)."""
    mcfg = config_lib.model_config(config)
    model = CLIP(mcfg)
    rules = make_rules(dict(config.sharding_rules))
    boxed = abstract_variables(mcfg)
    optimizer = make_optimizer(config.optimizer, boxed["params"], config.num_steps)
    loss = make_loss(config.loss, mesh, has_labels=has_labels)

    compiler_options = dict(config.compiler_options) or None
    init, state_sh, abstract_state = make_state_init(
        model, boxed, optimizer, loss, mesh, rules, compiler_options=compiler_options
    )
    keys = ("image", "text", "label") if has_labels else ("image", "text")
    batch_sh = {k: batch_sharding(mesh) for k in keys}
    microbatches = int(config.microbatches)
    embed = make_embed_fn(model, mesh, microbatches)
    cached = None
    if microbatches > 1:
        cached = _cached_outputs(model, loss, abstract_state, embed, config.batch_size, batch_sh)
        log.info(
            "gradient accumulation over %d microbatches caches %s", microbatches, sorted(cached)
        )
    grad_fn = make_grad_fn(model, optimizer, loss, mesh, microbatches, cached)
    step = make_train_step(model, optimizer, loss, grad_fn, embed)
    return Trainer(
        config=config,
        model_config=mcfg,
        model=model,
        mesh=mesh,
        rules=rules,
        optimizer=optimizer,
        loss=loss,
        init=init,
        train_step=jit_train_step(
            step, mesh, state_sh, batch_sh, rules, optimizer.hparams, compiler_options
        ),
        state_shardings=state_sh,
        abstract_state=abstract_state,
        batch_shardings=batch_sh,
        grad_fn=grad_fn,
    )


def _cached_outputs(
    model: CLIP, loss: Loss, state: TrainState, embed: Callable, batch_size: int, batch_sh: dict
) -> frozenset[str]:
    """The model outputs the loss reads, found by tracing it on abstract values (`state`:
    the abstract TrainState)."""
    mcfg = model.config
    images, text = jax.eval_shape(lambda: dummy_inputs(mcfg, batch_size))  # nothing allocated
    batch = {"image": images, "text": text}
    if "label" in batch_sh:
        batch["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    outputs = jax.eval_shape(
        lambda p, ms, b: model.apply({"params": p, **ms}, b["image"], b["text"]),
        state.params,
        state.model_state,
        batch,
    )
    loss_state, info = jax.eval_shape(
        lambda st, p, ms, b: loss.prepare(st, p, b, lambda q, bb: embed(q, ms, bb)),
        state.loss_state,
        state.params,
        state.model_state,
        batch,
    )
    return used_outputs(loss.loss_fn, outputs, loss_state, info, batch)
