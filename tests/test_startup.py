"""Start-up timing (clipjax.train.timeline), the persistent compilation cache and quiet CLIs."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from clipjax.cli import filter_preinit_log
from clipjax.train import compile_cache
from clipjax.train.timeline import Timeline, end_line, process_start_time, startup_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_process_start_time_is_before_now_and_the_imports():
    import clipjax.train.timeline as tl

    started = process_start_time()
    assert started <= tl._IMPORTED <= time.time()
    assert time.time() - started < 24 * 3600  # a test process, not the boot time


def test_timeline_phases_sum_to_the_elapsed_time():
    t = Timeline(origin=time.time() - 2.0)
    t.mark("imports")
    time.sleep(0.05)
    t.mark("data")
    t.mark("imports")  # a name marked again adds up
    t.add("background", 5.0)  # booked without moving the mark
    assert list(t.phases) == ["imports", "data", "background"]
    assert t.phases["imports"] >= 2.0 and t.phases["data"] >= 0.05
    booked = t.phases["imports"] + t.phases["data"]
    assert booked == pytest.approx(t.elapsed() - t.since_mark(), abs=1e-3)
    assert t.metrics("startup") == {
        "startup/imports_s": t.phases["imports"],
        "startup/data_s": t.phases["data"],
        "startup/background_s": 5.0,
    }


def test_lines():
    t = Timeline()
    t.phases = {"imports": 3.14, "first batch": 0.4}
    line = startup_line(t, 15.0, {"first batch": "note"})
    assert line == "start-up: imports 3.1 s, first batch 0.4 s (note) -> first step done at 15.0 s"
    assert end_line(t) == "end: imports 3.1 s, first batch 0.4 s"


def test_compile_cache_dir_resolution(monkeypatch, tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)  # no directory set for JAX
    monkeypatch.setattr(jax.config, "update", None)  # resolve_dir only reads
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve_dir("") is None
    assert compile_cache.resolve_dir("auto") == str(tmp_path / "xdg" / "clipjax" / "jax")
    assert compile_cache.resolve_dir(str(tmp_path / "c")) == str(tmp_path / "c")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve_dir("auto") == str(tmp_path / "home" / ".cache/clipjax/jax")
    monkeypatch.undo()
    jax.config.update("jax_compilation_cache_dir", before)
    assert compile_cache.resolve_dir("auto") == (before or compile_cache.default_dir())


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from clipjax.data.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(str(out), n_train=64, n_test=16, image_size=16)
    return str(out)


def _train(data, workdir, cache, *extra, **env_vars):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_LOG_COMPILES="1", **env_vars)
    env.pop("XLA_FLAGS", None)  # one device: the demo's batch of 16
    demo = os.path.join(REPO, "experiments", "demo.py")
    cmd = [
        sys.executable,
        "-m",
        "clipjax.train",
        f"--config={demo}:quick,data={data}",
        f"--workdir={workdir}",
        "--config.num_steps=2",
        "--config.optimizer.warmup_steps=1",
        f"--config.compile_cache_dir={cache}",
        *extra,
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _startup(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    (startup,) = [r for r in records if "startup/total_s" in r]
    (end,) = [r for r in records if any(k.startswith("end/") for k in r)]
    return startup, end


def test_second_run_loads_the_compiled_step_from_the_cache(demo_data, tmp_path):
    cache = tmp_path / "cache"
    # oneDNN on, as it is by default on CPUs with AVX-512 VNNI/BF16: its start-up note must not show
    first = _train(demo_data, tmp_path / "w1", cache, TF_ENABLE_ONEDNN_OPTS="1")
    # The step compiled in the background is the one the first call runs: compiled once.
    assert len(re.findall(r"Compiling jit\(train_step\)", first.stderr)) == 1, first.stderr
    entries = os.listdir(cache)
    assert any("train_step" in e for e in entries) and any("init" in e for e in entries)
    line = [s for s in first.stdout.splitlines() if s.startswith("start-up:")]
    assert len(line) == 1 and "-> first step done at" in line[0], first.stdout
    for phase in ("imports", "mesh", "data", "init", "first batch", "compile", "first step"):
        assert f"{phase} " in line[0]
    startup, end = _startup(tmp_path / "w1")
    assert startup["step"] == 1 and startup["startup/compile_cache_hits"] == 0
    phases = [v for k, v in startup.items() if k.endswith("_s") and "total" not in k]
    assert all(v >= 0 for v in phases) and startup["startup/total_s"] > 0
    assert {"end/final_save_s", "end/eval_s", "end/close_s"} <= set(end)

    second = _train(demo_data, tmp_path / "w2", cache)
    assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr
    startup2, _ = _startup(tmp_path / "w2")
    assert startup2["startup/compile_cache_hits"] >= 2  # init and train step
    assert "from the compilation cache" in second.stdout
    # quiet by default: no TensorFlow C++ or backend start-up lines
    for noise in ("cpu_feature_guard", "Unable to initialize backend", "oneDNN", "absl::"):
        assert noise not in first.stderr + first.stdout
    # the trainer's own notes in the CLIs' format, not absl's ("I1202 19:53:53.162159 ... ]")
    assert not re.search(r"^[IWEF]\d{4} ", first.stderr, re.M), first.stderr
    assert re.search(r"^INFO clipjax\.train\.loop: ", first.stderr, re.M), first.stderr
    progress = [s for s in first.stdout.splitlines() if s.startswith("step ")]
    assert progress and all("ETA ?" not in s for s in progress), first.stdout


def test_filter_preinit_log_applies_the_minimum_level():
    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796258648.117732    6167 port.cc:153] oneDNN custom operations are on.\n"
        "W0000 00:00:1796258648.2    6167 cpu.cc:1] a warning\n"
        "E0000 00:00:1796258648.3    6167 cpu.cc:2] an error\n"
        "Traceback (most recent call last):\n"
    )
    assert filter_preinit_log(text, 2) == text.split("\n", 3)[3]
    out = filter_preinit_log(text, 1)
    assert out.startswith("W0000") and "oneDNN" not in out
    assert filter_preinit_log(text, 0) == text.split("\n", 1)[1]


@pytest.mark.parametrize("quiet", [True, False])
def test_tensorflow_import_is_quiet_with_onednn_on(quiet):
    """The oneDNN note is written before absl's logging starts, so TF_CPP_MIN_LOG_LEVEL misses it;
    forced on here so that the test does not depend on the CPU that runs it."""
    code = (
        "import sys\n"
        "from clipjax.cli import quiet_libraries\n"
        f"if {quiet}: quiet_libraries()\n"
        "print('before', file=sys.stderr, flush=True)\n"
        "import tensorflow as tf\n"
        "print('after', tf.constant(2).numpy(), file=sys.stderr)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "before" in r.stderr and "after 2" in r.stderr
    assert ("oneDNN" in r.stderr) is not quiet, r.stderr


def test_enable_sets_and_clears_the_directory(tmp_path):
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    before = jax.config.jax_compilation_cache_dir
    try:
        path = compile_cache.enable(str(tmp_path / "c"))
        assert path == str(tmp_path / "c") and os.path.isdir(path)
        assert jax.config.jax_compilation_cache_dir == path
        assert jax.config.jax_persistent_cache_min_compile_time_secs <= 0.2
        assert compile_cache.enable("") is None
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        cc.reset_cache()
