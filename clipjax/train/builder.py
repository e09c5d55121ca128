"""Compose model, optimizer, loss and mesh into the jitted init and train step of a config."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding

from clipjax.models import CLIP, CLIPConfig, dummy_inputs
from clipjax.parallel.mesh import batch_sharding
from clipjax.parallel.rules import Rules, make_rules
from clipjax.train import config as config_lib
from clipjax.train.optimizer import Optimizer, make_optimizer
from clipjax.train.state import TrainState, make_state_init
from clipjax.train.step import (StepConfig, jit_train_step, make_grad_fn, make_train_step,
                                used_outputs)

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
    loss_fn: Callable
    init: Callable[[jax.Array], TrainState]  # jitted, returns a state placed on the mesh
    train_step: Callable  # jitted (state, batch) -> (state, metrics); donates state
    state_shardings: TrainState
    batch_shardings: dict[str, NamedSharding]
    # Unjitted fn(trainable, frozen, model_state, batch, queue) -> (loss, metrics, log_scale,
    # model_state, grads): what the step differentiates, exposed for tests and tools.
    grad_fn: Callable

    def init_state(self) -> TrainState:
        return self.init(jax.random.PRNGKey(self.config.seed))


def build_trainer(config: ml_collections.ConfigDict, mesh: Mesh) -> Trainer:
    """Model, optimizer, loss, state layout and jitted step for `config` on `mesh`."""
    from clipjax.losses import make_loss

    mcfg = config_lib.model_config(config)
    model = CLIP(mcfg)
    rules = make_rules(dict(config.sharding_rules))
    images, text = dummy_inputs(mcfg)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, text)
    optimizer = make_optimizer(config.optimizer, boxed["params"], config.num_steps)
    loss_fn = make_loss(config.loss, mesh)
    queue_size = int(config.loss.queue_size)

    compiler_options = dict(config.compiler_options) or None
    init, state_sh = make_state_init(model, optimizer, mesh, rules, queue_size=queue_size,
                                     compiler_options=compiler_options)
    bsh = batch_sharding(mesh)
    batch_sh = {"image": bsh, "text": bsh}

    cached = None
    if config.microbatches > 1:
        b = config.batch_size
        abstract_out = jax.eval_shape(
            lambda p: model.apply({"params": p}, *dummy_inputs(mcfg, b)),
            nn.meta.unbox(boxed["params"]))
        queue = None
        if queue_size:
            from clipjax.losses import queue_init

            queue = jax.eval_shape(lambda: queue_init(queue_size, mcfg.embed_dim))
        cached = used_outputs(loss_fn, abstract_out, with_queue=bool(queue_size),
                              abstract_queue=queue)
        log.info("gradient accumulation over %d microbatches caches %s", config.microbatches,
                 sorted(cached))
    step_cfg = StepConfig(microbatches=int(config.microbatches), queue_size=queue_size,
                          ema_momentum=float(config.loss.momentum))
    step = make_train_step(model, optimizer, loss_fn, mesh, step_cfg, cached_keys=cached)
    return Trainer(config=config, model_config=mcfg, model=model, mesh=mesh, rules=rules,
                   optimizer=optimizer, loss_fn=loss_fn, init=init,
                   train_step=jit_train_step(step, state_sh, batch_sh, rules, compiler_options),
                   state_shardings=state_sh, batch_shardings=batch_sh,
                   grad_fn=make_grad_fn(model, optimizer, loss_fn, mesh, step_cfg, cached))
