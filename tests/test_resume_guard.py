"""Resuming a workdir with another model stops with a ConfigError naming the changed fields,
before compiling and without touching the run files; safe changes (lr, num_steps, cadence)
resume; checkpoints without the model record resume as before."""

import json
import logging
import os
import shutil

import pytest

from clipjax.train import loop
from clipjax.train.checkpoint import Checkpointer, model_changes, model_meta
from clipjax.train.config import ConfigError, model_config

STEPS = 2


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from clipjax.demo import make_demo_data

    path = str(tmp_path_factory.mktemp("demo_data"))
    make_demo_data(path, "quick")
    return path


def quick_config(data, **changes):
    """The demo's quick config for `STEPS` steps, with `changes` ('a.b': value) applied."""
    from clipjax.demo import get_config

    c = get_config(f"quick,data={data}")
    c.num_steps = STEPS
    c.eval.at_end = False
    c.tensorboard = False
    c.update_from_flattened_dict(changes)
    return c


@pytest.fixture(scope="module")
def workdir(demo_data, tmp_path_factory):
    """A workdir trained for STEPS steps (checkpoint at the last step)."""
    path = str(tmp_path_factory.mktemp("run") / "w")
    result = loop.train(quick_config(demo_data), path)
    assert result.step == STEPS and result.last_checkpoint == STEPS
    return path


def run_files(workdir):
    return {
        n: open(os.path.join(workdir, n), "rb").read() for n in ("config.json", "model_config.json")
    }


@pytest.mark.parametrize(
    "changes, fields",
    [
        ({"model.overrides.act": "gelu"}, ["act"]),  # same shapes: resumed silently before
        (
            {"model.overrides.vision_width": 64, "model.overrides.embed_dim": 16},
            ["embed_dim", "vision_width"],
        ),
    ],
)
def test_resume_with_another_model_is_refused(workdir, demo_data, monkeypatch, changes, fields):
    before = run_files(workdir)

    def no_compiling(*args, **kw):
        raise AssertionError("the trainer was built before the model check")

    monkeypatch.setattr(loop, "build_trainer", no_compiling)
    with pytest.raises(ConfigError) as e:
        loop.train(quick_config(demo_data, **changes), workdir)
    message = str(e.value)
    for field in fields:
        assert f"{field}: " in message
    old = json.loads(before["model_config.json"])["config"]
    for key, value in changes.items():
        field = key.split(".")[-1]
        assert f"{field}: {old[field]!r} (checkpoint) -> {value!r} (now)" in message
    assert "step 2" in message
    assert run_files(workdir) == before  # the run files still describe the checkpoint


def test_safe_changes_resume(workdir, demo_data, tmp_path):
    resumed = str(tmp_path / "w")
    shutil.copytree(workdir, resumed)
    changes = {
        "num_steps": 4,
        "optimizer.lr": 1e-3,
        "log_every": 2,
        "checkpoint.every_steps": 4,
        "model.remat": "full",  # compute-only: same params
    }
    result = loop.train(quick_config(demo_data, **changes), resumed)
    assert result.status == "completed" and result.step == 4 and result.last_checkpoint == 4
    with open(os.path.join(resumed, "config.json")) as f:
        written = json.load(f)
    assert written["optimizer"]["lr"] == 1e-3 and written["num_steps"] == 4
    meta = Checkpointer(resumed, 4, 2, async_save=False).read_meta(4)
    assert meta["model_config"]["remat"] == "full"
    assert (
        meta["model_fingerprint"]
        == model_meta(model_config(quick_config(demo_data)))["model_fingerprint"]
    )


def test_checkpoint_meta_records_the_model(workdir, demo_data):
    meta = Checkpointer(workdir, 2, 2, async_save=False).read_meta(STEPS)
    cfg = model_config(quick_config(demo_data))
    assert meta["model_config"] == cfg.to_dict()
    assert meta["step"] == STEPS and "data" in meta


class _OldCheckpoints:
    """A Checkpointer stand-in whose newest checkpoint predates the model record."""

    directory = "old/checkpoints"

    def latest_step(self):
        return 6

    def read_meta(self, step):
        return {"step": step, "data": {}}


def test_old_checkpoint_without_model_record_resumes_with_a_warning(demo_data, caplog):
    with caplog.at_level(logging.WARNING, logger=loop.log.name):
        loop.check_same_model(
            quick_config(demo_data, **{"model.overrides.act": "gelu"}), _OldCheckpoints()
        )
    assert "records no model config" in caplog.text


def test_model_changes_ignore_compute_fields(demo_data):
    cfg = model_config(quick_config(demo_data))
    meta = model_meta(cfg)
    assert (
        model_changes(meta, model_config(quick_config(demo_data, **{"model.dtype": "bfloat16"})))
        == []
    )
    other = model_config(quick_config(demo_data, **{"model.overrides.text_layers": 2}))
    assert model_changes(meta, other) == [("text_layers", 1, 2)]


def test_resume_with_another_state_layout_is_refused(workdir, demo_data):
    """A change of the train config that changes the state's arrays (here a loss queue) stops
    with the arrays and the changed fields named, before any state is read."""
    before = run_files(workdir)
    with pytest.raises(ConfigError) as e:
        loop.train(quick_config(demo_data, **{"loss.queue_size": 32}), workdir)
    message = str(e.value)
    assert "step 2" in message and "loss_state/" in message
    assert "absent (checkpoint) -> float32[32, " in message
    assert "loss.queue_size: 0 -> 32" in message
    assert run_files(workdir) == before


def test_fresh_run_stopped_before_building_leaves_no_directories(demo_data, tmp_path, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("no trainer")

    monkeypatch.setattr(loop, "build_trainer", broken)
    workdir = tmp_path / "new" / "w"
    with pytest.raises(RuntimeError, match="no trainer"):
        loop.train(quick_config(demo_data), str(workdir))
    assert not workdir.exists() and (tmp_path / "new").is_dir()
