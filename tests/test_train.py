"""Trainer: sharded step equivalence across meshes, gradient accumulation, optimizer masks, LiT,
per-tower learning rates, non-finite skipping, config validation."""

import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from clipjax.parallel.mesh import make_mesh
from clipjax.train.builder import build_trainer
from clipjax.train.config import ConfigError, base_config, validate
from clipjax.train.optimizer import make_schedule

TINY = dict(
    image_size=16,
    patch_size=8,
    vision_width=32,
    vision_heads=2,
    vision_layers=1,
    text_width=32,
    text_heads=2,
    text_layers=1,
    embed_dim=32,
    vocab_size=64,
    context_length=8,
)
B = 16


def tiny_config(**changes):
    c = base_config()
    c.model.overrides.update(TINY)
    # Unscanned, so tests can name one block's params; the scanned default runs in the resume tests.
    c.model.scan_layers = False
    c.batch_size = B
    c.num_steps = 10
    c.optimizer.warmup_steps = 0
    c.optimizer.lr = 3e-3
    c.optimizer.clip_norm = 1e3  # compiled in, never active: keeps updates comparable exactly
    c.compiler_options = {"xla_backend_optimization_level": 0}  # compile time dominates here
    c.update_from_flattened_dict(changes)
    return c


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = rng.integers(1, 60, size=(B, TINY["context_length"])).astype(np.int32)
        text[:, -1] = 63  # end-of-text: the highest id in each row
        out.append({"image": rng.normal(size=(B, 16, 16, 3)).astype(np.float32), "text": text})
    return out


def mesh_of(data=1, fsdp=1, tensor=1):
    return make_mesh(
        {"data": data, "fsdp": fsdp, "tensor": tensor}, jax.devices()[: data * fsdp * tensor]
    )


def put(trainer, batch):
    return {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in batch.items()}


def run(trainer, data):
    state = trainer.init_state()
    losses = []
    for b in data:
        state, m = trainer.train_step(state, put(trainer, b))
        losses.append(float(m["loss"]))
    return state, losses


def loss_and_grads(trainer, state, batch, loss_state=None):
    """(loss, grads) of the step's differentiated function on `batch`, with `loss_state`
    (default: the state's) going through the loss's own `prepare`."""
    from clipjax.train.step import make_embed_fn

    embed = make_embed_fn(trainer.model, trainer.mesh, trainer.config.microbatches)

    def fn(s, ls, b):
        ls, info = trainer.loss.prepare(ls, s.params, b, lambda p, bb: embed(p, {}, bb))
        trainable, frozen = trainer.optimizer.split(s.params)
        out = trainer.grad_fn(trainable, frozen, {}, b, ls, info)
        return out[0], out[-1]

    loss_state = state.loss_state if loss_state is None else loss_state
    return jax.device_get(jax.jit(fn)(state, loss_state, put(trainer, batch)))


@pytest.fixture(scope="module")
def single():
    """The 1-device trainer of tiny_config(), compiled once for the tests that share it."""
    return build_trainer(tiny_config(), mesh_of())


def leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


# ------------------------------------------------------------------------------------- meshes


def test_same_trajectory_on_every_mesh(single):
    """1 device vs data parallel, FSDP and FSDP+tensor parallel: same losses to 1e-5."""
    data = batches(3)
    ref_state, ref = run(single, data)
    ref_params = jax.device_get(ref_state.params)
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        trainer = build_trainer(tiny_config(), mesh_of(*shape))
        state, losses = run(trainer, data)
        np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-5, err_msg=str(shape))
        got = traverse_util.flatten_dict(jax.device_get(state.params))
        for k, want in traverse_util.flatten_dict(ref_params).items():
            if k[-2:] == ("key", "bias"):
                # Exact gradient 0 (softmax is shift-invariant): Adam turns float noise into
                # lr-sized steps in arbitrary directions, so these are not comparable.
                continue
            # Adam divides by |g|: where a gradient component is near 0, float noise moves the
            # param by up to ~lr * 1e-2 (lr = 3e-3); elsewhere params agree far more closely.
            np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-4, err_msg=str(k))
        fc = "text/transformer/block_0/mlp/fc/kernel"  # [embed, mlp]
        spec = leaf(state.params, fc).sharding.spec
        mu = state.opt_state[1].mu  # chain(clip, adam, decay, lr): Adam's first moment
        if shape[1] > 1:  # FSDP: params and optimizer state split on 'fsdp'
            assert spec[0] == "fsdp", spec
            assert leaf(mu, fc).sharding.spec[0] == "fsdp"
            shard = leaf(state.params, fc).addressable_shards[0].data.shape
            assert shard[0] == 32 // shape[1]
        if shape[2] > 1:  # tensor parallel: MLP hidden units and heads split on 'tensor'
            assert spec[1] == "tensor", spec
            q = leaf(state.params, "visual/transformer/block_0/attn/query/kernel")
            assert q.sharding.spec[1] == "tensor"


# ------------------------------------------------------------------------- accumulation


def test_accumulated_gradients_equal_full_batch():
    """Gradient caching over 4 microbatches gives the full-batch contrastive loss and gradient
    (every microbatch still sees all negatives), on a sharded mesh."""
    mesh = mesh_of(data=2, fsdp=2)
    full = build_trainer(tiny_config(), mesh)
    accum = build_trainer(tiny_config(microbatches=4), mesh)
    state = full.init_state()
    trainable, frozen = full.optimizer.split(state.params)
    batch = put(full, batches(1, seed=3)[0])

    def grads(trainer):
        fn = jax.jit(lambda t, b: trainer.grad_fn(t, frozen, {}, b, {}, None))
        loss, _, _, _, g = fn(trainable, batch)
        return float(loss), jax.device_get(g)

    loss1, g1 = grads(full)
    loss4, g4 = grads(accum)
    assert abs(loss1 - loss4) < 1e-5 * abs(loss1)
    flat1 = traverse_util.flatten_dict(g1)
    flat4 = traverse_util.flatten_dict(g4)
    assert flat1.keys() == flat4.keys()
    # Relative to the largest gradient: some leaves (attention key biases) have an exact
    # gradient of 0 and only float noise around it.
    gmax = max(np.abs(v).max() for v in flat1.values())
    for k in flat1:
        np.testing.assert_allclose(
            flat4[k], flat1[k], rtol=1e-4, atol=1e-5 * gmax, err_msg="/".join(k)
        )
    # The temperature gets its gradient once, not once per microbatch.
    assert abs(float(g1["logit_scale"])) > 0
    np.testing.assert_allclose(g4["logit_scale"], g1["logit_scale"], rtol=1e-5)


# ---------------------------------------------------------------------------- optimizer


def test_weight_decay_mask():
    from clipjax.models import CLIP, dummy_inputs
    from clipjax.train.config import model_config
    from clipjax.train.optimizer import make_optimizer

    c = tiny_config()
    model = CLIP(model_config(c))
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *dummy_inputs(model.config))
    opt = make_optimizer(c.optimizer, boxed["params"], c.num_steps)
    params = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), nn_unbox(boxed["params"]))
    # Zero gradients: Adam's direction is 0, so only decoupled weight decay moves a parameter.
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(opt.tx.update)(zeros, opt.tx.init(params), params)
    flat = traverse_util.flatten_dict(jax.device_get(updates))
    moved = {"/".join(k) for k, u in flat.items() if np.abs(u).max() > 0}
    for name in (
        "visual/transformer/block_0/mlp/fc/kernel",
        "text/text_projection",
        "visual/proj",
        "visual/conv1/kernel",
        "text/transformer/block_0/attn/query/kernel",
    ):
        assert name in moved, name
        np.testing.assert_allclose(flat[tuple(name.split("/"))], -3e-3 * 0.2, rtol=1e-6)
    for name in moved:
        last = name.split("/")[-1]
        assert last not in ("bias", "scale", "embedding", "logit_scale"), name
        assert "positional_embedding" not in name and "token_embedding" not in name, name
        assert "class_embedding" not in name, name


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def test_schedule_warmup_then_cosine():
    c = tiny_config(**{"optimizer.warmup_steps": 10, "optimizer.min_lr_ratio": 0.1})
    s = make_schedule(c.optimizer, 110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.5 * 3e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 3e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 3e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 3e-4, rtol=1e-5)


def test_lit_locks_image_tower_and_tower_lr_multipliers(single):
    """LiT: the image tower gets no update and no optimizer state; a text lr multiplier of 0.5
    halves exactly the text tower's first update (same gradients and Adam state)."""
    data = batches(2, seed=1)
    lit = build_trainer(
        tiny_config(**{"optimizer.lock_image": True, "optimizer.lr_mult.text": 0.5}), mesh_of()
    )
    p0 = jax.device_get(single.init_state().params)
    s_lit, _ = lit.train_step(lit.init_state(), put(lit, data[0]))
    s_base, _ = single.train_step(single.init_state(), put(single, data[0]))
    opt_paths = {
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(s_lit.opt_state)[0]
    }
    assert opt_paths and not any("visual" in p for p in opt_paths)
    assert any("text" in p for p in opt_paths)
    s_lit, _ = lit.train_step(s_lit, put(lit, data[1]))
    after = jax.device_get(s_lit.params)
    jax.tree.map(np.testing.assert_array_equal, after["visual"], p0["visual"])
    assert not np.array_equal(after["text"]["text_projection"], p0["text"]["text_projection"])

    # One step from the same init: text deltas are exactly half (the image tower's absence
    # does not change the text gradients, which do not depend on image params' updates).
    d_base = jax.tree.map(np.subtract, jax.device_get(s_base.params), p0)
    lit1, _ = lit.train_step(lit.init_state(), put(lit, data[0]))
    d_lit = jax.tree.map(np.subtract, jax.device_get(lit1.params), p0)
    for name in ("text_projection", "token_embedding"):
        assert np.abs(d_base["text"][name]).max() > 0
        np.testing.assert_allclose(
            d_lit["text"][name], 0.5 * d_base["text"][name], rtol=1e-4, atol=1e-9
        )


def test_nonfinite_step_is_skipped_and_counted(single):
    trainer = single
    state = trainer.init_state()
    good, bad = batches(2, seed=2)
    bad["image"][0, 0, 0, 0] = np.nan
    state, m = trainer.train_step(state, put(trainer, good))
    before = jax.device_get((state.params, state.opt_state))
    state, m = trainer.train_step(state, put(trainer, bad))
    assert not math.isfinite(float(m["loss"]))
    assert int(m["nonfinite_streak"]) == 1 and int(m["nonfinite_total"]) == 1
    assert int(state.step) == 2
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get((state.params, state.opt_state)), before
    )
    state, m = trainer.train_step(state, put(trainer, good))
    assert math.isfinite(float(m["loss"]))
    assert int(m["nonfinite_streak"]) == 0 and int(m["nonfinite_total"]) == 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"batch_size": 12}, "config.batch_size=12"),
        ({"microbatches": 3}, "config.batch_size=16"),
        ({"model.preset": "ViT-Q/7"}, "config.model.preset"),
        ({"mesh.tensor": 3}, "config.mesh"),
        ({"mesh.slices": 3}, "slices=3 does not divide the 8 devices"),
        ({"optimizer.warmup_steps": 50}, "config.optimizer.warmup_steps"),
        ({"optimizer.schedule": "step"}, "config.optimizer.schedule"),
        ({"optimizer.lr": 0.0}, "config.optimizer.lr"),
        ({"loss.name": "triplet"}, "loss.name"),
        ({"loss.queue_size": 8}, "config.loss.queue_size"),
        ({"num_steps": 0}, "config.num_steps"),
        ({"data.train": "/nonexistent/shards-*.tfrecord"}, "config.data.train"),
        ({"data.train": ""}, "config.data.train"),
        ({"model.remat": "sometimes"}, "config.model"),
        (
            {"model.overrides.dtype": "bfloat16"},
            "config.model.dtype='float32' and config.model.overrides.dtype='bfloat16' disagree",
        ),
    ],
)
def test_config_errors_name_the_key(changes, key, tmp_path):
    shard = tmp_path / "a.tfrecord"
    shard.write_bytes(b"")
    c = tiny_config(**{"data.train": str(tmp_path / "*.tfrecord"), **changes})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        validate(c, num_devices=8)


def test_config_overrides_and_lr_mult_keys():
    c = tiny_config()
    c.optimizer.lr_mult["audio"] = 2.0
    with pytest.raises(ConfigError, match=r"optimizer\.lr_mult\.audio"):
        validate(c, num_devices=1, check_files=False)
    c = tiny_config()
    c.model.overrides["depth"] = 3
    with pytest.raises(ConfigError, match=r"model\.overrides\.depth"):
        validate(c, num_devices=1, check_files=False)
    c = tiny_config()
    assert validate(c, num_devices=8, check_files=False) == {"data": 8, "fsdp": 1, "tensor": 1}
    c.mesh.update({"data": 2, "fsdp": -1})
    assert validate(c, num_devices=8, check_files=False) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_momentum_queue_and_ema_in_state(tmp_path):
    """With loss.queue_size the state carries a FIFO of EMA embeddings and the EMA params, and
    the state checkpoints (no zero-size arrays: orbax refuses them)."""
    trainer = build_trainer(
        tiny_config(**{"loss.queue_size": 32, "loss.momentum": 0.5}), mesh_of(data=2)
    )
    state = trainer.init_state()
    p0 = jax.device_get(state.params)
    data = batches(3, seed=4)
    for i, b in enumerate(data[:2]):
        state, m = trainer.train_step(state, put(trainer, b))
        assert math.isfinite(float(m["loss"]))
        q = state.loss_state["queue"]
        assert int(q.count) == min((i + 1) * B, 32) and int(q.ptr) == ((i + 1) * B) % 32
    q = jax.device_get(state.loss_state["queue"])
    np.testing.assert_allclose(np.linalg.norm(q.image, axis=-1), 1.0, rtol=1e-5)
    # EMA after 2 steps with momentum 0.5: 0.25 p0 + 0.25 p1 + 0.5 p0 (EMA of the params
    # before each update), i.e. strictly between the initial and the current params.
    ema = jax.device_get(state.loss_state["ema_params"])["visual"]["proj"]
    now = jax.device_get(state.params)["visual"]["proj"]
    assert not np.array_equal(ema, p0["visual"]["proj"]) and not np.array_equal(ema, now)
    # A queue full of earlier embeddings adds negatives: the loss differs from the plain one.
    from clipjax.losses import queue_init

    def loss_with(queue):
        return loss_and_grads(trainer, state, data[2], {**state.loss_state, "queue": queue})[0]

    plain = loss_with(queue_init(32, TINY["embed_dim"]))
    with_queue = loss_with(state.loss_state["queue"])
    assert float(with_queue) > float(plain) + 1e-3
    from clipjax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    ckpt.save(2, state, {"step": 2})
    like = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
    abstract = jax.tree.map(
        lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        trainer.state_shardings,
        like,
    )
    restored, _ = ckpt.restore(2, abstract)
    ckpt.close()
    np.testing.assert_array_equal(restored.loss_state["queue"].text, q.text)
    state, m = trainer.train_step(state, put(trainer, data[2]))
    np.testing.assert_allclose(float(m["loss"]), float(with_queue), rtol=1e-5)


def test_checkpoint_dir_of_a_relative_workdir_is_absolute(tmp_path, monkeypatch):
    """orbax refuses relative paths; `--workdir runs/x` must still work."""
    from clipjax.train.checkpoint import checkpoint_dir

    monkeypatch.chdir(tmp_path)
    assert str(checkpoint_dir("runs/x")) == str(tmp_path / "runs" / "x" / "checkpoints")
    assert str(checkpoint_dir("gs://bucket/run")) == "gs://bucket/run/checkpoints"


def test_false_negative_rules_through_the_step():
    """Label positives, near-duplicate masking and queue-only negatives in the real step: the
    queue records the labels, and gradient caching over 2 microbatches gives the full-batch
    loss and gradient."""
    loss_cfg = {
        "loss.positives": "label",
        "loss.queue_size": 32,
        "loss.duplicate_threshold": 0.9,
        "loss.in_batch_negatives": False,
    }
    mesh = mesh_of(data=2)
    full = build_trainer(tiny_config(**loss_cfg), mesh, has_labels=True)
    accum = build_trainer(tiny_config(microbatches=2, **loss_cfg), mesh, has_labels=True)
    assert set(full.batch_shardings) == {"image", "text", "label"}
    data = [dict(b, label=np.arange(B, dtype=np.int32) % 3) for b in batches(2, seed=5)]
    state = full.init_state()
    state, m = full.train_step(state, put(full, data[0]))
    q = jax.device_get(state.loss_state["queue"])
    np.testing.assert_array_equal(q.group[:B, 0], data[0]["label"])
    assert 0 < float(m["batch/same_label"]) < 1 and math.isfinite(float(m["loss"]))
    loss1, g1 = loss_and_grads(full, state, data[1])
    loss2, g2 = loss_and_grads(accum, state, data[1])
    assert float(loss1) > 0 and abs(float(loss1) - float(loss2)) < 1e-5 * float(loss1)
    flat1, flat2 = traverse_util.flatten_dict(g1), traverse_util.flatten_dict(g2)
    scale = max(np.abs(v).max() for v in flat1.values())
    for k in flat1:
        np.testing.assert_allclose(flat2[k], flat1[k], atol=1e-5 * scale, err_msg=str(k))


def test_parse_config_arg_converts_and_names_bad_keys():
    from clipjax.train.config import parse_config_arg

    got = parse_config_arg("quick,steps=5,data=a=b", "exp.py", quick=False, steps=10, data="x")
    assert got == {"quick": True, "steps": 5, "data": "a=b"}
    assert parse_config_arg(None, "exp.py", steps=10) == {"steps": 10}
    with pytest.raises(ValueError, match=r"exp.py: unknown arg 'nope'.*\['steps'\]"):
        parse_config_arg("nope=1", "exp.py", steps=10)
    with pytest.raises(ValueError, match="steps='x': expected a value of type int"):
        parse_config_arg("steps=x", "exp.py", steps=10)
    with pytest.raises(ValueError, match="expected steps=VALUE"):
        parse_config_arg("steps", "exp.py", steps=10)


def test_init_compiled_at_level_1_equals_the_default_level():
    """On CPU the state init is compiled at LLVM level 1 (faster to compile): the same values,
    bit for bit, as the default level."""
    c = tiny_config()
    c.compiler_options = {}
    trainer = build_trainer(c, mesh_of())
    key = jax.random.PRNGKey(3)
    fast = trainer.init(key)
    default = trainer.init.lower(key).compile({"xla_backend_optimization_level": 3})(key)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
