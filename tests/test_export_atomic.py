"""Exports lose nothing: --overwrite replaces only model directories, by swapping a complete new
one in; a kill at any moment leaves the old or the new model; stale temporaries are cleaned on the
next run; what is created gets the umask's modes."""

import os
import stat
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from clipjax import files
from clipjax.export import serialization as ser
from clipjax.export.__main__ import main as export_main
from clipjax.export.modeldir import read_model_dir, save_model_dir
from clipjax.models import CLIPConfig
from clipjax.train.config import ConfigError, base_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = CLIPConfig(
    embed_dim=8,
    image_size=16,
    patch_size=8,
    vision_width=16,
    vision_layers=1,
    vision_heads=1,
    context_length=4,
    vocab_size=32,
    text_width=16,
    text_layers=1,
    text_heads=1,
)


def params_of(seed):
    from clipjax.models import abstract_variables

    rng = np.random.default_rng(seed)
    shapes = flax.core.meta.unbox(abstract_variables(TINY))["params"]
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def same(a, b):
    fa, fb = ser.flatten_params(a), ser.flatten_params(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two model directories with different params: (path A, params A, path B, params B)."""
    root = tmp_path_factory.mktemp("models")
    a, b = params_of(0), params_of(1)
    save_model_dir(str(root / "a"), TINY, a)
    save_model_dir(str(root / "b"), TINY, b, fmt="msgpack")
    return str(root / "a"), a, str(root / "b"), b


def siblings(path):
    """Entries next to `path` other than itself."""
    parent, name = os.path.split(str(path))
    return sorted(n for n in os.listdir(parent) if n != name)


def test_overwrite_refuses_a_directory_that_is_not_a_model(models, tmp_path):
    _, _, b, _ = models
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not replacing"):
        export_main(["--model", b, "--out", str(out), "--overwrite"])
    with pytest.raises(FileExistsError, match="not replacing"):
        save_model_dir(str(out), TINY, params_of(2))
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    # A model directory holding a file of the user's is not replaced either.
    model = tmp_path / "model"
    save_model_dir(str(model), TINY, params_of(2))
    (model / "README.md").write_text("mine")
    with pytest.raises(SystemExit, match="not replacing"):
        export_main(["--model", b, "--out", str(model), "--overwrite"])
    assert (model / "README.md").read_text() == "mine"
    # Nor a file, and no format writes a file over a directory.
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(SystemExit, match="not a directory"):
        export_main(["--model", b, "--out", str(tmp_path / "f.bin"), "--overwrite"])
    with pytest.raises(SystemExit, match="is a directory"):
        export_main(["--model", b, "--out", str(model), "--format", "openai", "--overwrite"])
    assert (tmp_path / "f.bin").read_bytes() == b"x"
    assert siblings(out) == ["f.bin", "model"]


def test_overwrite_replaces_a_model_directory_and_an_empty_one(models, tmp_path):
    a, params_a, b, params_b = models
    out = str(tmp_path / "out")
    save_model_dir(out, TINY, params_a, fmt="msgpack")
    assert export_main(["--model", b, "--out", out, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "params.safetensors"]  # no stale msgpack
    assert same(read_model_dir(out)[1], params_b)
    # Model kinds may replace one another (a Hugging Face export over a clipjax one and back).
    assert export_main(["--model", a, "--out", out, "--format", "hf", "--overwrite"]) == 0
    assert export_main(["--model", a, "--out", out, "--overwrite"]) == 0
    assert same(read_model_dir(out)[1], params_a)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model_dir(str(empty), TINY, params_b)
    assert same(read_model_dir(str(empty))[1], params_b)
    assert siblings(out) == ["empty"]  # no temporaries left


def test_a_failing_write_keeps_the_old_model(models, tmp_path, monkeypatch):
    _, params_a, _, _ = models
    out = str(tmp_path / "out")
    save_model_dir(out, TINY, params_a)

    def crash(tree, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ser, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model_dir(out, TINY, params_of(3))
    assert same(read_model_dir(out)[1], params_a)
    assert siblings(out) == []


def test_a_kill_between_the_renames_is_undone_by_the_next_run(models, tmp_path, monkeypatch):
    _, params_a, _, params_b = models
    out = str(tmp_path / "out")
    save_model_dir(out, TINY, params_a)
    real_rename = os.rename

    def rename(src, dst):  # set the old model aside, then "die" before the new one comes in
        if src == out:
            real_rename(src, dst)
        raise SystemExit("killed")

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(SystemExit):
        save_model_dir(out, TINY, params_b)
    monkeypatch.undo()
    assert not os.path.exists(out) and len(siblings(out)) == 1  # the old model, aside
    files.clean_stale(out)
    assert same(read_model_dir(out)[1], params_a) and siblings(out) == []
    save_model_dir(out, TINY, params_b)
    assert same(read_model_dir(out)[1], params_b)


def test_a_hard_kill_leaves_the_old_model_and_the_next_run_cleans_up(models, tmp_path):
    _, params_a, b, params_b = models
    out = str(tmp_path / "out")
    save_model_dir(out, TINY, params_a)
    script = (
        "import os\n"
        "from clipjax.export import serialization as ser\n"
        "from clipjax.export.__main__ import main\n"
        "real = ser.save_safetensors\n"
        "def die(tree, path, metadata=None):\n"
        "    real(tree, path, metadata)\n"
        "    os._exit(9)\n"  # no cleanup code runs, as after SIGKILL
        "ser.save_safetensors = die\n"
        f"main(['--model', {b!r}, '--out', {out!r}, '--overwrite'])\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert same(read_model_dir(out)[1], params_a)
    (stale,) = siblings(out)
    assert stale.startswith(".out.") and stale.endswith(".tmp")
    # Stale temporaries of this target go; look-alikes and other targets' are kept.
    (tmp_path / ".out.0123abcd.tmp").write_bytes(b"stale file")
    keep = [".out.notes", ".out.0123abcd.tmp.keep", ".outer.0123abcd.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"not ours")
    assert export_main(["--model", b, "--out", out, "--overwrite"]) == 0
    assert same(read_model_dir(out)[1], params_b)
    assert siblings(out) == sorted(keep)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_created_files_follow_the_umask(models, tmp_path, umask):
    _, params_a, _, _ = models
    old = os.umask(umask)
    try:
        save_model_dir(str(tmp_path / "m"), TINY, params_a)
        files.write_text(tmp_path / "page.html", "<html></html>")
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(tmp_path / "m") == 0o777 & ~umask
    for name in ("config.json", "params.safetensors"):
        assert mode(tmp_path / "m" / name) == 0o666 & ~umask
    assert mode(tmp_path / "page.html") == 0o666 & ~umask


def test_training_refuses_an_export_dir_of_other_files_before_starting(tmp_path):
    (tmp_path / "shard.tfrecord").write_bytes(b"")
    target = tmp_path / "exported"
    target.mkdir()
    (target / "results.csv").write_text("1,2")
    c = base_config()
    c.data.train = str(tmp_path / "*.tfrecord")
    c.batch_size = 8
    c.export.dir = str(target)
    with pytest.raises(ConfigError, match="export.dir"):
        validate(c, num_devices=1)
    save_model_dir(str(tmp_path / "model"), TINY, params_of(0))
    c.export.dir = str(tmp_path / "model")
    validate(c, num_devices=1)  # a model directory may be replaced
