"""config.init: start from released weights (every source kind, include/exclude, positional
embedding resizing, mismatches stopped before compiling, resume wins over init) and LiT with a
loaded, locked image tower (bit-identical, no optimizer state, not differentiated)."""

import dataclasses
import json
import os

import flax
import jax
import numpy as np
import pytest
from flax import traverse_util

from clipjax.export.modeldir import save_model_dir
from clipjax.models import CLIPConfig, abstract_variables
from clipjax.parallel.mesh import make_mesh
from clipjax.train import init_from
from clipjax.train.builder import build_trainer
from clipjax.train.checkpoint import Checkpointer
from clipjax.train.config import ConfigError, base_config, validate
from clipjax.train.loop import restore_or_init, write_run_files

# 64-wide, one 64-wide head per tower: OpenAI's conventions, so a state dict's shapes infer it.
SRC = CLIPConfig(
    embed_dim=32,
    image_size=16,
    patch_size=8,
    vision_width=64,
    vision_layers=2,
    vision_heads=1,
    context_length=8,
    vocab_size=64,
    text_width=64,
    text_layers=2,
    text_heads=1,
)
B = 16


def random_params(cfg, seed=1):
    """Non-trivial params of the model's shapes, from eval_shape (nothing compiled)."""
    rng = np.random.default_rng(seed)
    shapes = flax.core.meta.unbox(abstract_variables(cfg))["params"]
    params = jax.tree.map(
        lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes
    )
    params["logit_scale"] = np.array(3.0, np.float32)
    return params


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def train_config(path="", **changes):
    c = base_config()
    fields = dataclasses.asdict(SRC)
    c.model.overrides.update({k: v for k, v in fields.items() if k not in ("dtype", "remat")})
    del c.model.overrides["scan_layers"]
    c.model.scan_layers = True  # the source is stored looped: init converts the layout
    c.batch_size = B
    c.num_steps = 5
    c.optimizer.warmup_steps = 0
    c.optimizer.lr = 3e-3
    c.mesh.update({"data": 2, "fsdp": 4, "tensor": 1})
    c.compiler_options = {"xla_backend_optimization_level": 0}
    c.init.path = str(path)
    c.update_from_flattened_dict(changes)
    return c


def trainer_of(config):
    return build_trainer(config, make_mesh(dict(config.mesh), jax.devices()[:8]))


def looped(params):
    """A state's (scanned) params as {looped name: numpy}."""
    host = jax.device_get(params)
    out = {}
    for name, (path, layer) in init_from.looped_names(host).items():
        value = np.asarray(init_from._get(host, path))
        out[name] = value if layer is None else value[layer]
    return out


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = rng.integers(1, 60, size=(B, SRC.context_length)).astype(np.int32)
        text[:, -1] = 63
        out.append({"image": rng.normal(size=(B, 16, 16, 3)).astype(np.float32), "text": text})
    return out


def put(trainer, batch):
    return {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in batch.items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The source params written as a clipjax model dir, an HF dir and an OpenAI state dict."""
    from safetensors.numpy import save_file

    from clipjax.export.hfdir import write_hf_dir
    from clipjax.export.openai import to_openai_state_dict

    root = tmp_path_factory.mktemp("init_src")
    params = random_params(SRC)
    save_model_dir(str(root / "model"), SRC, params)
    write_hf_dir(str(root / "hf"), SRC, params)
    save_file(to_openai_state_dict(SRC, params), str(root / "openai.safetensors"))
    return root, flat(params)


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize("kind", ["model", "hf", "openai.safetensors"])
def test_init_from_each_source_with_include_exclude(source, kind, tmp_path):
    """Included params equal the source's (looped source -> scanned model), excluded and
    not-included ones keep the fresh init; the report says so, in the workdir."""
    root, src = source
    config = train_config(root / kind, **{"init.include": "^visual/", "init.exclude": "ln_post"})
    validate(config, 8, check_files=False)
    trainer = trainer_of(config)
    fresh = looped(trainer.init_state().params)
    state = init_from.fresh_state(trainer, str(tmp_path))
    got = looped(state.params)
    assert got.keys() == src.keys()
    for name, value in got.items():
        if name.startswith("visual/") and "ln_post" not in name:
            np.testing.assert_array_equal(value, src[name], err_msg=name)
        else:
            np.testing.assert_array_equal(value, fresh[name], err_msg=name)
    assert int(state.step) == 0
    jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0), jax.device_get(state.opt_state))
    report = json.loads((tmp_path / init_from.REPORT_JSON).read_text())
    status = {r["name"]: r["status"] for r in report["rows"]}
    assert status["visual/transformer/block_1/attn/out/kernel"] == "loaded"
    assert status["visual/ln_post/scale"] == "fresh"
    assert status["text/token_embedding"] == "fresh"
    assert report["source"]["path"] == str(root / kind)
    table = (tmp_path / init_from.REPORT_TXT).read_text()
    assert "visual/transformer/block_*/mlp/proj/kernel x2" in table
    assert table.endswith("loaded 38, resized 0, fresh 40, unused 0\n")


def test_workdir_source_at_a_step_and_resume_never_reapplies_init(source, tmp_path):
    """A fresh run loads init; once it has a checkpoint, restarting restores the checkpoint (the
    trained params), not init. The workdir then serves as a source at that step."""
    root, src = source
    workdir = tmp_path / "run"
    config = train_config(root / "model", **{"init.logit_scale": "reset"})
    trainer = trainer_of(config)
    ckpt = Checkpointer(str(workdir), every_steps=1, keep=2, async_save=False)
    state, data = restore_or_init(trainer, ckpt, str(workdir))
    assert data is None and (workdir / init_from.REPORT_TXT).exists()
    loaded = looped(state.params)
    for name, value in loaded.items():
        if name != "logit_scale":
            np.testing.assert_array_equal(value, src[name], err_msg=name)
    np.testing.assert_allclose(loaded["logit_scale"], SRC.logit_scale_init, rtol=1e-6)
    state, _ = trainer.train_step(state, put(trainer, batches(1)[0]))
    trained = looped(state.params)
    ckpt.save(1, state, {"data": None})
    ckpt.wait()
    write_run_files(config, trainer, str(workdir))
    (workdir / init_from.REPORT_TXT).unlink()

    resumed, _ = restore_or_init(trainer, ckpt, str(workdir))
    ckpt.close()
    assert int(resumed.step) == 1 and not (workdir / init_from.REPORT_TXT).exists()
    got = looped(resumed.params)
    for name in trained:
        np.testing.assert_array_equal(got[name], trained[name], err_msg=name)
    assert not np.array_equal(got["text/text_projection"], src["text/text_projection"])

    from_run = trainer_of(train_config(workdir, **{"init.step": 1}))
    got = looped(init_from.fresh_state(from_run).params)
    for name in trained:
        np.testing.assert_array_equal(got[name], trained[name], err_msg=name)


# --------------------------------------------------------------------------- resizing


def test_image_posemb_resample_keeps_class_token_and_matches_bicubic_resize():
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1 + 3 * 3, 8)).astype(np.float32)
    out = init_from.resample_image_posemb(pos, 1 + 5 * 5)
    assert out.shape == (26, 8)
    np.testing.assert_array_equal(out[0], pos[0])
    ref = jax.image.resize(pos[1:].reshape(3, 3, 8), (5, 5, 8), method="bicubic")
    np.testing.assert_allclose(out[1:], np.asarray(ref).reshape(25, 8), rtol=1e-6, atol=1e-7)
    const = np.concatenate([pos[:1], np.full((9, 8), 0.25, np.float32)])
    for tokens in (1 + 2 * 2, 1 + 6 * 6):
        np.testing.assert_allclose(
            init_from.resample_image_posemb(const, tokens)[1:], 0.25, rtol=1e-5
        )


def _plan(src_cfg, dst_cfg, **init):
    c = train_config("src", **{f"init.{k}": v for k, v in init.items()})
    src = {"params": random_params(src_cfg)}
    dst = flax.core.meta.unbox(abstract_variables(dst_cfg))
    return src, init_from.make_plan(c.init, src, {"params": dst["params"]})


def test_plan_resizes_image_grid_and_text_context():
    """Source 16px / 8 tokens -> model 32px (2x2 -> 4x4 grid) and 6 or 12 tokens of context."""
    for ctx in (6, 12):
        dst_cfg = dataclasses.replace(SRC, image_size=32, context_length=ctx)
        src, plan = _plan(SRC, dst_cfg)
        rows = {r.name: r for r in plan.rows}
        assert rows["visual/positional_embedding"].status == "resized"
        assert rows["visual/positional_embedding"].target == (17, 64)
        assert rows["text/positional_embedding"].status == "resized"
        assert plan.count("loaded") == len(plan.rows) - 2
        text_pos = src["params"]["text"]["positional_embedding"]
        fresh = np.full((ctx, 64), 7.0, np.float32)
        out = plan.fills[("params", "text/positional_embedding")](fresh)
        assert out.shape == (ctx, 64)
        np.testing.assert_array_equal(out[: min(ctx, 8)], text_pos[: min(ctx, 8)])
        np.testing.assert_array_equal(out[8:], 7.0)  # extension: new rows keep the fresh init
        img = plan.fills[("params", "visual/positional_embedding")](None)
        np.testing.assert_array_equal(img[0], src["params"]["visual"]["positional_embedding"][0])


def test_other_shape_mismatch_stops_before_compiling(source, monkeypatch):
    """A wider text tower cannot be resized: ConfigError naming the param and both shapes, raised
    before the trainer's init (or anything else) is compiled."""
    root, _ = source
    config = train_config(root / "model")
    config.model.overrides.embed_dim = 48
    trainer = trainer_of(config)

    def boom():
        raise AssertionError("compiled before the shapes were checked")

    monkeypatch.setattr(trainer, "init_state", boom)
    with pytest.raises(
        ConfigError, match=r"text/text_projection: source \(64, 32\), model \(64, 48\)"
    ):
        init_from.fresh_state(trainer)
    with pytest.raises(ConfigError, match="load no parameter"):
        init_from.make_plan(
            train_config("x", **{"init.include": "^nothing"}).init,
            {"params": random_params(SRC)},
            {"params": flax.core.meta.unbox(abstract_variables(SRC))["params"]},
        )


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"init.include": "visual/(", "init.path": ""}, r"config\.init\.include"),
        ({"init.logit_scale": "zero"}, r"config\.init\.logit_scale"),
        ({"init.path": "/nonexistent/model"}, r"config\.init\.path='/nonexistent/model'"),
        ({"init.step": 3}, r"config\.init\.step=3.*training workdirs"),
        ({"init.step": 3, "init.path": ""}, r"config\.init\.step=3.*only with init\.path"),
    ],
)
def test_init_config_errors(source, changes, match, tmp_path):
    root, _ = source
    shard = tmp_path / "a.tfrecord"
    shard.write_bytes(b"")
    c = train_config(root / "model", **{"data.train": str(shard)})
    for k, v in changes.items():
        c.init[k.split(".")[1]] = v
    with pytest.raises(ConfigError, match=match):
        validate(c, num_devices=8)


# --------------------------------------------------------------------------- LiT


def experiment(name, arg):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("kind", ["model", "hf", "openai.safetensors"])
def test_lit_and_finetune_experiments_take_the_source_architecture(source, kind):
    from clipjax.train.config import model_config

    root, _ = source
    for name in ("lit.py", "finetune.py"):
        c = experiment(name, f"path={root / kind},steps=100")
        validate(c, 8, check_files=False)
        got = dataclasses.replace(model_config(c), scan_layers=False, remat="none")
        assert got == dataclasses.replace(SRC, remat="none"), name
        assert c.init.path == str(root / kind)
        assert c.optimizer.lock_image == (name == "lit.py")
        assert c.init.include == ("^visual/" if name == "lit.py" else "")
        with pytest.raises(ValueError, match="give path=MODEL"):
            experiment(name, "steps=100")


def _dots(jaxpr, out=None):
    """Output shapes of every dot_general in a jaxpr, nested jaxprs included."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(eqn.outvars[0].aval.shape))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if hasattr(sub, "jaxpr"):
                    _dots(getattr(sub.jaxpr, "jaxpr", sub.jaxpr), out)
                elif hasattr(sub, "eqns"):
                    _dots(sub, out)
    return out


def grad_jaxpr(trainer, state, batch):
    def fn(s, b):
        ls, info = trainer.loss.prepare(s.loss_state, s.params, b, None)
        trainable, frozen = trainer.optimizer.split(s.params)
        return trainer.grad_fn(trainable, frozen, s.model_state, b, ls, info)[-1]

    return jax.make_jaxpr(fn)(state, batch).jaxpr


def test_lit_locked_loaded_tower_is_bit_identical_stateless_and_not_differentiated(source):
    root, src = source
    lit = trainer_of(
        train_config(
            root / "model",
            **{
                "optimizer.lock_image": True,
                "init.include": "^visual/",
                "init.logit_scale": "reset",
            },
        )
    )
    state = init_from.fresh_state(lit)
    data = batches(3, seed=2)
    text0 = looped(state.params)["text/text_projection"]
    for b in data:
        state, metrics = lit.train_step(state, put(lit, b))
        assert np.isfinite(float(metrics["loss"]))
    after = looped(state.params)
    visual = [n for n in after if n.startswith("visual/")]
    for name in visual:
        np.testing.assert_array_equal(after[name], src[name], err_msg=name)
    assert not np.array_equal(after["text/text_projection"], text0)

    # No optimizer state for the image tower: no path under visual, and exactly two Adam
    # moments per trainable (text + temperature) leaf.
    leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    assert not any("visual" in jax.tree_util.keystr(p) for p, _ in leaves)
    trainable, _ = lit.optimizer.split(state.params)
    n_trainable = len(jax.tree.leaves(trainable))
    for moment in (".mu", ".nu"):
        assert sum(moment in jax.tree_util.keystr(p) for p, _ in leaves) == n_trainable

    # The locked tower's forward is not differentiated: no gradient of the patch embedding
    # ([p*p*3, width] from a contraction over the batch) in the grad function, unlike unlocked.
    k, w = SRC.patch_size**2 * 3, SRC.vision_width
    kernel_grad = {(k, w), (w, k)}
    batch = put(lit, data[0])
    locked_dots = _dots(grad_jaxpr(lit, state, batch))
    assert not kernel_grad & set(locked_dots)
    full = trainer_of(train_config(root / "model"))
    full_dots = _dots(grad_jaxpr(full, full.init_state(), batch))
    assert kernel_grad & set(full_dots) and len(locked_dots) < len(full_dots)
