"""The train CLI's errors about --config: one clear line, no traceback, before jax starts."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "clipjax.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("spec", ["missing.py", "missing.py:quick"])
def test_missing_config_file_is_one_clear_error(tmp_path, spec):
    r = _train("--config", spec, "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"error: --config {spec}: missing.py does not exist" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "w").exists()


def test_bad_config_arg_is_one_clear_error(tmp_path):
    demo = os.path.join(REPO, "experiments", "demo.py")
    r = _train("--config", f"{demo}:bogus=1", "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "error: --config: the demo config: unknown arg 'bogus'" in r.stderr
    assert "Traceback" not in r.stderr
