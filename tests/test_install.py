"""The environment `make` builds holds exactly the locked versions; `clipjax.doctor` reports it."""

import importlib.metadata
import json
import os
import re

from clipjax import doctor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNLOCKED = {"clipjax", "pip", "setuptools", "wheel"}  # the project itself and pip's own tools


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock() -> dict[str, str]:
    lock = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt:{n}: expected name==version, got {line!r}"
            lock[normalise(name)] = version
    return lock


def test_installed_versions_equal_the_lock():
    lock = read_lock()
    assert {"jax", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu"} <= set(lock)
    installed = {
        normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }
    unlocked = sorted(set(installed) - set(lock) - UNLOCKED)
    assert not unlocked, f"installed but not in constraints.txt (run `make lock`): {unlocked}"
    differ = {
        n: (installed[n], lock[n]) for n in installed if n in lock and installed[n] != lock[n]
    }
    assert not differ, f"installed vs locked versions differ: {differ}"


def test_doctor_reports_versions_and_backend(capsys):
    assert doctor.main(["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["packages"]["jax"] == importlib.metadata.version("jax")
    assert r["jax"]["backend"] == "cpu" and r["jax"]["device_count"] == 8  # conftest's fake devices
    assert isinstance(r["hugepage_malloc"], bool)
    assert doctor.main(["--expect", "tpu"]) == 1
    assert "expected the tpu backend" in capsys.readouterr().err
