"""`python tests/train_with_faults.py FAULTS <python -m clipjax.train flags>`: the training CLI with
fault-injection and recording hooks, for the exact-resume tests.

FAULTS: comma-separated, any of `kill_in_save:STEP` sends SIGKILL to this process once the
(async) save of STEP has started writing (a half-written checkpoint); `sigterm_at:STEP` sends
SIGTERM, as a preemption notice, after STEP; `sigkill_at:STEP:PROCESS` sends SIGKILL to process
PROCESS (of a multi-process run) after STEP, once the checkpoint last due is committed;
`record_batches:NAME` appends, after every step, the step and the labels of this process's
batch of that step to WORKDIR/batches/NAME-pI.jsonl (the test's records carry unique labels, so
they name the records each step read); `none` injects nothing.
"""

import collections
import functools
import json
import os
import signal
import sys
import time

from absl import app

from clipjax.train import __main__ as cli
from clipjax.train.hooks import Hook, RunContext


class SigtermAt(Hook):
    def __init__(self, step: int):
        self.step = step

    def after_step(self, run: RunContext) -> None:
        if run.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class KillInSave(Hook):
    def __init__(self, step: int):
        self.step = step

    def after_save(self, run: RunContext) -> None:
        if run.step != self.step:
            return
        directory = run.checkpointer.directory
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the step's temporary directory exists
            if any(p.name.startswith(f"{self.step}.") for p in directory.iterdir()):
                break
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)


class SigkillAt(Hook):
    """SIGKILL on one process after a step, once the checkpoint last due is committed (so the
    test knows where the restart resumes)."""

    def __init__(self, step: int, process: int):
        self.step, self.process = step, process

    def after_step(self, run: RunContext) -> None:
        import jax

        if run.step != self.step or jax.process_index() != self.process:
            return
        every = run.config.checkpoint.every_steps
        due = self.step - self.step % every if every else 0
        committed = os.path.join(str(run.checkpointer.directory), str(due))
        deadline = time.monotonic() + 60
        while due and not os.path.isdir(committed) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(Hook):
    """Writes which records (by label) each step read on this process.

    The loop gives hooks no batch, so TrainPipeline's iterator is wrapped to queue each batch's
    labels with the data state yielded alongside; batches reach the steps in that order (through
    the device prefetch), and each step checks its queued state against `run.data_state`."""

    def __init__(self, name: str):
        from clipjax.data.train_pipeline import TrainPipeline

        self.name, self._file = name, None
        queued = self._queued = collections.deque()
        iterate = TrainPipeline.__iter__

        def recording_iter(pipeline):
            for batch, state in iterate(pipeline):
                queued.append((batch["label"].tolist(), state))
                yield batch, state

        TrainPipeline.__iter__ = recording_iter

    def after_step(self, run: RunContext) -> None:
        import jax

        labels, state = self._queued.popleft()
        if state != run.data_state:
            raise RuntimeError(f"step {run.step}: recorded batch out of order ({state})")
        if self._file is None:
            directory = os.path.join(os.path.dirname(str(run.checkpointer.directory)), "batches")
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"{self.name}-p{jax.process_index()}.jsonl")
            self._file = open(path, "a")
        line = {"step": run.step, "process_count": jax.process_count(), "labels": labels}
        self._file.write(json.dumps(line | {"data_state": state}) + "\n")
        self._file.flush()  # in the kernel's hands: survives a SIGKILL of this process

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


FAULTS = {
    "kill_in_save": (KillInSave, "kill_in_save:STEP"),
    "sigterm_at": (SigtermAt, "sigterm_at:STEP"),
    "sigkill_at": (SigkillAt, "sigkill_at:STEP:PROCESS"),
}


def make_hooks(faults: str) -> list[Hook]:
    hooks = []
    for fault in faults.split(","):
        kind, _, arg = fault.partition(":")
        args = arg.split(":")
        if fault == "none":
            continue
        if kind == "record_batches" and arg:
            hooks.append(RecordBatches(arg))
        elif (
            kind in FAULTS
            and all(a.isdigit() for a in args)
            and len(args) == FAULTS[kind][1].count(":")
        ):
            hooks.append(FAULTS[kind][0](*map(int, args)))
        else:
            forms = [form for _, form in FAULTS.values()] + ["record_batches:NAME", "none"]
            raise SystemExit(f"unknown fault {fault!r}; expected a comma-separated list of {forms}")
    return hooks


if __name__ == "__main__":
    hooks = make_hooks(sys.argv.pop(1))
    app.run(functools.partial(cli.main, hooks=hooks))
