"""Config keys are never silently wrong: every key of an experiment file, a sweep and a
`--config.KEY` override must be one the trainer reads (clipjax.train.config.check_keys)."""

import glob
import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from clipjax.launch import sweep
from clipjax.train.config import (
    ConfigError,
    base_config,
    check_keys,
    key_known,
    unknown_keys,
    validate,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_renamed_key_in_an_experiment_is_an_error_naming_the_new_key():
    c = base_config()
    c.data.augment_scale = (0.7, 1.0)  # the name before it became data.crop_scale
    with pytest.raises(ConfigError) as e:
        validate(c, num_devices=1, check_files=False)
    message = str(e.value)
    assert "config.data.augment_scale" in message and "did you mean data.crop_scale?" in message
    assert "\n" not in message


def test_free_form_dicts_and_extra_take_any_key():
    c = base_config()
    c.extra.my_note = "ablation 3"
    c.extra.nested = {"a": 1}
    c.sharding_rules.mlp = "tensor"
    c.model.overrides.act = "gelu"
    c.compiler_options.xla_backend_optimization_level = 0
    c.optimizer.towers.proj = r"^proj/"  # a tower of one's own, with its multiplier
    c.optimizer.lr_mult.proj = 0.1
    assert unknown_keys(c) == []
    c.mesh.dat = 2  # mesh is not free-form
    c.optimizer.schedul = "linear"
    assert unknown_keys(c) == ["mesh.dat", "optimizer.schedul"]


def test_a_leaf_may_hold_a_dict():
    base = ml_collections.ConfigDict({"data": {"train": None}, "seed": 0})
    c = ml_collections.ConfigDict({"data": {"train": {"laion": 0.7, "cc12m": 0.3}}, "seed": 1})
    assert unknown_keys(c, base) == []
    assert key_known("data.train.laion", base) and not key_known("data.tran", base)


def test_override_keys():
    assert key_known("data.crop_scale") and key_known("extra.anything")
    assert key_known("model.overrides.vision_width") and key_known("optimizer.lr_mult.proj")
    assert not key_known("data.demo_dir") and not key_known("optimiser.lr")


# The :ARG each experiment needs (none by default), and variants that set other keys; MODEL is
# a model directory (fine-tuning and LiT read its config).
EXPERIMENT_ARGS = {
    "finetune.py": ["path=MODEL"],
    "lit.py": ["path=MODEL"],
    "clipa.py": ["stage=1", "stage=2,init=workdir"],
}


def _experiment_configs(model_dir):
    for path in sorted(glob.glob(os.path.join(REPO, "experiments", "*.py"))):
        spec = importlib.util.spec_from_file_location("_exp", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        name = os.path.basename(path)
        for arg in EXPERIMENT_ARGS.get(name, [None]):
            yield name, module.get_config(arg and arg.replace("MODEL", model_dir))
    from clipjax.demo import get_config

    yield "clipjax/demo.py", get_config("quick,data=/nonexistent")


def test_every_experiment_and_sweep_has_known_keys_only(tmp_path):
    from clipjax.export.modeldir import save_model_dir
    from tests.test_init_from import SRC, random_params

    save_model_dir(str(tmp_path / "model"), SRC, random_params(SRC))
    names = []
    for name, config in _experiment_configs(str(tmp_path / "model")):
        check_keys(config)
        names.append(name)
    assert {"demo.py", "lit.py", "clipjax/demo.py"} <= set(names)
    sweeps = sorted(glob.glob(os.path.join(REPO, "experiments", "sweeps", "*.py")))
    assert sweeps
    for path in sweeps:
        _, runs = sweep.load_sweep(path)  # checks the keys
        assert all(key_known(k) for r in runs for k in r)


def test_a_sweep_with_an_unknown_key_is_refused_before_any_run(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "CONFIG = 'experiments/demo.py'\n"
        "def get_sweep():\n    return [{'optimizer.lr': 1e-3, 'optimizer.weight_decy': 0.1}]\n"
    )
    with pytest.raises(SystemExit, match="optimizer.weight_decy .did you mean"):
        sweep.load_sweep(str(path))


def test_cli_override_of_an_unknown_key_is_a_one_line_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [
        sys.executable,
        "-m",
        "clipjax.train",
        "--config",
        os.path.join(REPO, "experiments", "demo.py"),
        "--workdir",
        str(tmp_path / "w"),
        "--config.data.demo_dir=/data",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), r.stderr
    assert "--config.data.demo_dir" in errors[0] and "crop_scale" in errors[0]
    assert not (tmp_path / "w").exists()
