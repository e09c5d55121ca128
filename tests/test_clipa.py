"""Two-stage training (experiments/clipa.py): stage 2 at full resolution and context starts from
stage 1's low-resolution weights, so its first loss is well below a fresh model's."""

import importlib.util
import json
import os

import pytest

from clipjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Narrow towers, so each stage takes seconds; the same in both stages.
SMALL = dict(
    vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1, text_heads=2
)


def clipa_config(arg):
    spec = importlib.util.spec_from_file_location(
        "clipa", os.path.join(ROOT, "experiments/clipa.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.model.overrides.update(SMALL)
    c.eval.at_end = False
    c.tensorboard = False
    c.log_every = 1
    c.checkpoint.every_steps = 0
    c.data.shuffle_buffer = 64
    c.compiler_options = {"xla_backend_optimization_level": 0}  # compiling dominates here
    return c


def first_loss(workdir):
    """The loss of the first training-step record (start-up records carry no loss)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return next(r["loss"] for r in map(json.loads, f) if "loss" in r)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from clipjax.demo import make_demo_data

    path = str(tmp_path_factory.mktemp("demo_data"))
    make_demo_data(path, "quick")
    return os.path.join(path, "train", "*.tfrecord")


def test_stage_two_starts_from_stage_one(demo_data, tmp_path):
    common = f"data={demo_data},preset=tiny,batch=32"
    stage1 = clipa_config(f"stage=1,{common},image_size=16,context=16,steps=60,lr=0.003")
    assert (stage1.model.overrides.image_size, stage1.model.overrides.context_length) == (16, 16)
    loop.train(stage1, str(tmp_path / "s1"))

    stage2 = clipa_config(f"stage=2,{common},init={tmp_path / 's1'},steps=1")
    assert "image_size" not in stage2.model.overrides  # the preset's own 32 px and 32 tokens
    loop.train(stage2, str(tmp_path / "s2"))
    report = json.loads((tmp_path / "s2" / "init_report.json").read_text())
    resized = {row["name"] for row in report["rows"] if row["status"] == "resized"}
    assert any("positional_embedding" in name for name in resized), resized

    fresh = clipa_config(f"stage=2,{common},init={tmp_path / 's1'},steps=1")
    fresh.init.path = ""
    loop.train(fresh, str(tmp_path / "fresh"))
    loaded, scratch = first_loss(tmp_path / "s2"), first_loss(tmp_path / "fresh")
    assert loaded < scratch - 0.3, (loaded, scratch)


def test_stage_two_needs_init():
    with pytest.raises(ValueError, match="stage=2 needs init"):
        clipa_config("stage=2")
    with pytest.raises(ValueError, match="expected 1 or 2"):
        clipa_config("stage=3")
