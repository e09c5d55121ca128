"""Elastic resume end to end: `python -m clipjax.launch.local` runs of the training CLI that
change their process count at checkpoints (1 -> 2 -> 1) and lose a process to SIGKILL, checked
against the run's own records of which examples each step read.

The data: 192 records with unique labels in 4 shards; a global batch of 16 makes an epoch 12
steps under either split (2 processes read 2 shards each, 1 process all 4). The legs of one
workdir:

  1. 1 process, steps 1-4, stop (a completed run: its checkpoint is step 4).
  2. 2 processes resume: the rest of the single host's epoch 0 is carried over both (steps
     5-12); the checkpoint of step 8 is written mid-carry; process 1 is SIGKILLed after step 10
     and the launcher stops process 0.
  3. 2 processes resume from step 8 (the carry restored mid-way), redo steps 9 and 10, go on
     into epoch 1 with their own split and stop at step 16.
  4. 1 process resumes: the rest of both old hosts' epoch 1 is carried (steps 17-24), then
     epoch 2; it finishes at step 27.

"Exactly once" is about the run's committed history: each leg's steps up to the checkpoint the
next leg resumed from, and the last leg's steps. The steps after that checkpoint (read by the
killed leg, then redone) are not part of it; they must be redone with the very same batches.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from clipjax.data.writer import SourceItem, write_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS, SHARD_SIZE, BATCH = 192, 48, 16
EPOCH_STEPS = RECORDS // BATCH
TOTAL = 27


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The demo config's data layout (DIR/train/*.tfrecord), records labelled 0..191."""
    from PIL import Image

    path = str(tmp_path_factory.mktemp("labelled"))
    rng = np.random.default_rng(0)

    def png(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    items = [
        SourceItem(
            key=f"r{i:04d}",
            origin=f"record {i}",
            caption=f"a photo of thing number {i}",
            read=lambda p=png(rng.integers(0, 255, (16, 16, 3), np.uint8)): p,
            label=i,
        )
        for i in range(RECORDS)
    ]
    write_shards(
        items,
        os.path.join(path, "train"),
        source={"kind": "test", "n": RECORDS},
        shard_size=SHARD_SIZE,
        prefix="train",
        progress=False,
    )
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")  # each process count compiles its step once
    e = dict(os.environ)
    e.update(
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, e.get("PYTHONPATH")]))
    return e


def launch(workdir, data_dir, env, leg: str, processes: int, steps: int, faults: str = ""):
    """One leg: the training CLI through the test runner (recording each step's labels) under
    `clipjax.launch.local`. Returns (exit status, launcher stderr, process 0's log)."""
    logs = os.path.join(str(workdir), f"logs-{leg}")
    cmd = [sys.executable, "-m", "clipjax.launch.local", "-n", str(processes)]
    cmd += ["--devices-per-process", "1", "--stop-grace", "3", "--log-dir", logs, "--"]
    cmd += [sys.executable, os.path.join(REPO, "tests", "train_with_faults.py")]
    cmd += [",".join(filter(None, [f"record_batches:{leg}", faults]))]
    cmd += ["--config", os.path.join(REPO, "experiments", f"demo.py:quick,data={data_dir}")]
    cmd += ["--workdir", str(workdir), f"--config.num_steps={steps}"]
    cmd += [f"--config.batch_size={BATCH}", "--config.checkpoint.every_steps=4"]
    cmd += ["--config.eval.at_end=False", "--config.tensorboard=False", "--config.log_every=100"]
    cmd += ["--config.eval.zeroshot.shards=", "--config.eval.retrieval.shards="]  # no test split
    p = subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = p.communicate(timeout=600)  # minutes on a loaded machine
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and the processes it started
        p.wait()
        raise
    with open(os.path.join(logs, "process_0.log")) as f:
        return p.returncode, err, f.read()


def read_leg(workdir, leg: str) -> dict[int, dict[int, list[int]]]:
    """process -> step -> the labels that process's batch of that step held."""
    out = {}
    directory = os.path.join(str(workdir), "batches")
    for name in sorted(os.listdir(directory)):
        m = re.fullmatch(rf"{leg}-p(\d+)\.jsonl", name)
        if m:
            with open(os.path.join(directory, name)) as f:
                lines = [json.loads(line) for line in f if line.endswith("\n")]
            out[int(m.group(1))] = {line["step"]: line["labels"] for line in lines}
    return out


def resumed_from(log: str) -> int:
    m = re.search(r"resumed from the checkpoint of step (\d+)", log)
    assert m, log[-3000:]
    return int(m.group(1))


def test_process_count_changes_and_a_killed_process_read_every_record_once(tmp_path, data_dir, env):
    work = tmp_path / "run"
    rc, err, log = launch(work, data_dir, env, "leg1", processes=1, steps=4)
    assert rc == 0, err[-3000:] + log[-3000:]
    rc, err, log = launch(work, data_dir, env, "leg2", 2, TOTAL, faults="sigkill_at:10:1")
    assert rc != 0 and "process 1 exited with -9; stopping the others" in err, err[-3000:]
    assert resumed_from(log) == 4
    assert "data state saved by 1 processes, resumed on 2" in log
    rc, err, log = launch(work, data_dir, env, "leg3", processes=2, steps=16)
    assert rc == 0, err[-3000:] + log[-3000:]
    assert resumed_from(log) == 8
    assert "resumed on" not in log  # the same process count: the carry goes on, not restarts
    rc, err, log = launch(work, data_dir, env, "leg4", processes=1, steps=TOTAL)
    assert rc == 0, err[-3000:] + log[-3000:]
    assert resumed_from(log) == 16
    assert "data state saved by 2 processes, resumed on 1" in log
    assert f"completed at step {TOTAL}" in log
    assert str(TOTAL) in os.listdir(work / "checkpoints")

    legs = {leg: read_leg(work, leg) for leg in ("leg1", "leg2", "leg3", "leg4")}
    assert [sorted(legs[leg]) for leg in legs] == [[0], [0, 1], [0, 1], [0]]
    # Each leg's committed steps: from its resume point to the next leg's.
    bounds = {"leg1": (0, 4), "leg2": (4, 8), "leg3": (8, 16), "leg4": (16, TOTAL)}
    history: dict[int, list[int]] = {}
    for leg, (first, last) in bounds.items():
        for process, steps in legs[leg].items():
            assert min(steps) == first + 1, (leg, process, sorted(steps))
            for step in range(first + 1, last + 1):
                assert len(steps[step]) == BATCH // len(legs[leg]), (leg, process, step)
                history.setdefault(step, []).extend(steps[step])
    assert sorted(history) == list(range(1, TOTAL + 1))

    # The killed leg's steps after its last checkpoint were redone with the same batches.
    assert max(legs["leg2"][1]) == 10
    for process, killed in legs["leg2"].items():
        for step in [s for s in killed if s > 8]:  # process 0 may have run on a step or two
            assert legs["leg3"][process][step] == killed[step], (process, step)

    def read(first: int, last: int) -> list[int]:
        return sorted(label for step in range(first, last + 1) for label in history[step])

    # Epoch 0 (1 process, carried onto 2, killed and resumed mid-carry) and epoch 1 (2
    # processes, carried onto 1): every record exactly once. Epoch 2: no record twice.
    assert read(1, EPOCH_STEPS) == list(range(RECORDS))
    assert read(EPOCH_STEPS + 1, 2 * EPOCH_STEPS) == list(range(RECORDS))
    epoch2 = read(2 * EPOCH_STEPS + 1, TOTAL)
    assert len(epoch2) == (TOTAL - 2 * EPOCH_STEPS) * BATCH == len(set(epoch2))
