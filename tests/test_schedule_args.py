"""The optimizer's schedule and weight decay are arguments of the compiled step: the values are
optax's (the schedule functions used before, float32 for float32), and runs that differ only in
lr, warm-up, weight decay or num_steps load the step from the persistent compilation cache."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipjax.train.config import base_config
from clipjax.train.optimizer import schedule_hparams, schedule_value


def reference_schedule(cfg, num_steps):
    """The schedule as it was built before (optax's schedules, numbers compiled in)."""
    peak, warmup = float(cfg.lr), int(cfg.warmup_steps)
    end = peak * float(cfg.min_lr_ratio)
    decay_steps = max(num_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


CASES = list(
    itertools.product(
        ("cosine", "linear", "constant"),
        (0, 7),  # warm-up steps
        (0.0, 0.1),  # min_lr_ratio
        (3e-4, 1e-3),  # lr
        (20, 1000),  # num_steps
    )
)


def test_lr_per_step_equals_the_old_schedule_functions():
    counts = jnp.arange(1005, dtype=jnp.int32)
    configs = []
    for kind, warmup, ratio, lr, steps in CASES:
        c = base_config().optimizer
        c.schedule, c.warmup_steps, c.min_lr_ratio, c.lr = kind, warmup, ratio, lr
        configs.append((c, steps))
    # every old schedule in one program (numbers compiled in, as in the old step)
    refs = [jax.vmap(reference_schedule(c, steps)) for c, steps in configs]
    old = jax.jit(lambda n: jnp.stack([r(n) for r in refs]))(counts)
    new = jax.jit(
        lambda n, hp, kind: jax.vmap(lambda h: schedule_value(kind, n, h))(hp), static_argnums=2
    )
    for kind in ("cosine", "linear", "constant"):
        rows = [i for i, case in enumerate(CASES) if case[0] == kind]
        hps = [schedule_hparams(*configs[i]) for i in rows]
        stacked = {k: np.stack([h[k] for h in hps]) for k in hps[0]}
        np.testing.assert_array_equal(new(counts, stacked, kind), old[np.array(rows)], kind)


def test_updates_equal_the_optax_chain_with_compiled_in_numbers():
    from clipjax.train.optimizer import make_optimizer

    c = base_config().optimizer
    c.warmup_steps, c.weight_decay = 2, 0.1
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    boxed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opt = make_optimizer(c, boxed, num_steps=10)
    old = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-6),
        optax.add_decayed_weights(0.1, mask={"w": True, "b": False}),
        optax.scale_by_learning_rate(reference_schedule(c, 10)),
    )
    s_new, s_old = opt.tx.init(params), old.init(params)
    assert jax.tree.structure(s_new) == jax.tree.structure(s_old)  # checkpoints resume
    update = jax.jit(lambda g, s, p, hp: opt.tx.update(g, s, p, hparams=hp))
    rng = np.random.default_rng(0)
    for _ in range(4):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u_new, s_new = update(g, s_new, params, opt.hparams)
        u_old, s_old = jax.jit(old.update)(g, s_old, params)
        jax.tree.map(np.testing.assert_array_equal, u_new, u_old)


@pytest.fixture
def cache_dir(tmp_path):
    from jax.experimental.compilation_cache import compilation_cache as cc

    from clipjax.train import compile_cache

    before = jax.config.jax_compilation_cache_dir
    yield compile_cache.enable(str(tmp_path / "cache"))
    jax.config.update("jax_compilation_cache_dir", before)
    cc.reset_cache()


def _abstract_batch(config, trainer):
    from tests.test_train import TINY

    size, length = TINY["image_size"], TINY["context_length"]
    shapes = {
        "image": ((config.batch_size, size, size, 3), jnp.float32),
        "text": ((config.batch_size, length), jnp.int32),
    }
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_shardings[k])
        for k, (shape, dtype) in shapes.items()
    }


def _compile_step(config):
    """Build the trainer of `config` and compile its step; returns the cache hits it made."""
    from clipjax.parallel.mesh import make_mesh
    from clipjax.train import compile_cache
    from clipjax.train.builder import build_trainer

    trainer = build_trainer(config, make_mesh(dict(config.mesh)))
    hits = compile_cache.hits()
    trainer.train_step.lower(trainer.abstract_state, _abstract_batch(config, trainer)).compile()
    return compile_cache.hits() - hits


def test_a_sweep_of_lr_warmup_wd_and_steps_reuses_the_compiled_step(cache_dir):
    from tests.test_train import tiny_config

    config = tiny_config

    assert _compile_step(config()) == 0  # compiled and written
    again = config(
        **{
            "optimizer.lr": 1e-3,
            "optimizer.warmup_steps": 3,
            "optimizer.weight_decay": 0.05,
            "optimizer.min_lr_ratio": 0.1,
            "num_steps": 50,
        }
    )
    assert _compile_step(again) == 1
    # the hit is not a cache that hits anything: the schedule's kind is part of the program
    assert _lowered_text(config()) == _lowered_text(again)
    assert _lowered_text(config()) != _lowered_text(config(**{"optimizer.schedule": "linear"}))


def _lowered_text(config):
    from clipjax.parallel.mesh import make_mesh
    from clipjax.train.builder import build_trainer

    trainer = build_trainer(config, make_mesh(dict(config.mesh)))
    return trainer.train_step.lower(
        trainer.abstract_state, _abstract_batch(config, trainer)
    ).as_text()
