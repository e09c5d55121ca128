"""End-to-end runs of `python -m clipjax.train` in subprocesses (CPU, the demo config's 'quick'
variant): SIGKILL mid-step and mid-save and a SIGTERM preemption, each followed by a resume, give
params bit-identical to an uninterrupted run; 2 processes x 2
devices give the result of 1 process x 4 devices; divergence stops the run with a clear error."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment sharing one compilation cache (the runs compile one program)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    e = dict(os.environ)
    e.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, e.get("PYTHONPATH")]))
    return e


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from clipjax.demo import make_demo_data

    path = str(tmp_path_factory.mktemp("demo_data"))
    make_demo_data(path, "quick")
    return path


def train_cmd(workdir, demo_data, *extra, steps=STEPS, fault=None):
    """The training CLI on the demo's quick variant; with `fault`, through the test runner that
    installs that fault-injection hook (tests/train_with_faults.py)."""
    start = (
        ["-m", "clipjax.train"]
        if fault is None
        else [os.path.join(REPO, "tests", "train_with_faults.py"), fault]
    )
    return [
        sys.executable,
        *start,
        "--config",
        os.path.join(REPO, "experiments", f"demo.py:quick,data={demo_data}"),
        "--workdir",
        str(workdir),
        f"--config.num_steps={steps}",
        "--config.eval.at_end=False",
        "--config.tensorboard=False",
        *extra,
    ]


def run(cmd, env, **kw):
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


def checkpoint_params(workdir, step):
    import jax

    from clipjax.train.checkpoint import read_state_arrays

    tree = read_state_arrays(str(workdir), step)
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def logged_steps(workdir):
    """The training-step records of metrics.jsonl (not the start-up, end or eval records)."""
    path = os.path.join(str(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "loss" in r]


def test_sigkill_mid_step_and_mid_save_then_resume_is_bit_identical(tmp_path, env, demo_data):
    ref = tmp_path / "uninterrupted"
    r = run(train_cmd(ref, demo_data), env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"completed at step {STEPS}" in r.stdout
    want = checkpoint_params(ref, STEPS)

    work = tmp_path / "interrupted"
    # 1. SIGKILL at an arbitrary moment while training (after the first checkpoint, step 2).
    p = subprocess.Popen(
        train_cmd(work, demo_data),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not any(m["step"] >= 3 for m in logged_steps(work)):
        time.sleep(0.05)
        assert p.poll() is None, "training ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = max(m["step"] for m in logged_steps(work))
    assert killed_at < STEPS

    # 2. Resume, and die by SIGKILL in the middle of writing the checkpoint of step 6.
    r = run(train_cmd(work, demo_data, fault="kill_in_save:6"), env)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    names = os.listdir(work / "checkpoints")
    assert any(n.startswith("6.") and "tmp" in n for n in names), names  # half-written
    assert "6" not in names

    # 3. Resume again: the half-written checkpoint is not picked. A preemption notice (SIGTERM)
    #    after step 7 saves that step and stops cleanly.
    r = run(train_cmd(work, demo_data, fault="sigterm_at:7"), env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from the checkpoint of step 4" in r.stderr
    assert "preempted at step 7" in r.stdout
    assert "7" in os.listdir(work / "checkpoints")

    # 4. Resume once more and finish.
    r = run(train_cmd(work, demo_data), env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from the checkpoint of step 7" in r.stderr
    got = checkpoint_params(work, STEPS)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The logged losses of the resumed steps equal the uninterrupted run's.
    ref_loss = {m["step"]: m["loss"] for m in logged_steps(ref)}
    for m in logged_steps(work):
        assert m["loss"] == ref_loss[m["step"]], m["step"]


def test_two_processes_match_one_process(tmp_path, env, demo_data):
    """2 processes x 2 CPU devices (gloo) vs 1 process x 4 devices: same losses and params.

    One shard and no shuffling/cropping make both runs see the same examples in each global
    batch (per host: records i::2), in a different row order, so results agree to float
    rounding, not bitwise."""
    same_data = [
        "--config.data.shuffle_buffer=1",
        "--config.data.crop_scale=(1.0, 1.0)",
        "--config.checkpoint.every_steps=0",
    ]
    # Few steps: every gloo collective costs milliseconds (benchmarks/multiprocess.py).
    steps = 3
    one = tmp_path / "one"
    r = run(
        train_cmd(one, demo_data, *same_data, steps=steps),
        dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    r = run(
        [
            sys.executable,
            "-m",
            "clipjax.launch.local",
            "-n",
            "2",
            "--devices-per-process",
            "2",
            "--log-dir",
            str(two / "logs"),
            "--",
        ]
        + train_cmd(two, demo_data, *same_data, steps=steps),
        env,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    assert "process 1/2, 2 local of 4 devices" in open(two / "logs" / "process_1.log").read()
    l1 = [m["loss"] for m in logged_steps(one)]
    l2 = [m["loss"] for m in logged_steps(two)]
    assert len(l1) == len(l2) == steps
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    p1, p2 = checkpoint_params(one, steps), checkpoint_params(two, steps)
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_divergence_stops_with_last_good_checkpoint(tmp_path, env, demo_data):
    work = tmp_path / "diverge"
    # A huge learning rate blows the params up on the second update; every later step is
    # non-finite and skipped, and after 2 in a row the run stops.
    r = run(
        train_cmd(
            work,
            demo_data,
            "--config.optimizer.lr=1e30",
            "--config.optimizer.warmup_steps=0",
            "--config.max_nonfinite=2",
            "--config.checkpoint.every_steps=1",
        ),
        env,
    )
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    assert "non-finite losses/gradients in a row (max_nonfinite=2)" in r.stderr
    steps = sorted(int(n) for n in os.listdir(work / "checkpoints") if n.isdigit())
    assert steps and steps[-1] < STEPS
