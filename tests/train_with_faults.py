"""`python tests/train_with_faults.py FAULT <python -m clipjax.train flags>`: the training CLI with
a fault-injection hook, for the exact-resume tests.

FAULT: `kill_in_save:STEP` sends SIGKILL to this process once the (async) save of STEP has
started writing (a half-written checkpoint); `sigterm_at:STEP` sends SIGTERM, as a preemption
notice, after STEP; `none` injects nothing.
"""

import functools
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


def make_hooks(fault: str) -> list[Hook]:
    if fault == "none":
        return []
    kind, _, step = fault.partition(":")
    hooks = {"kill_in_save": KillInSave, "sigterm_at": SigtermAt}
    if kind not in hooks or not step.isdigit():
        raise SystemExit(
            f"unknown fault {fault!r}; expected kill_in_save:STEP, sigterm_at:STEP or none"
        )
    return [hooks[kind](int(step))]


if __name__ == "__main__":
    hooks = make_hooks(sys.argv.pop(1))
    app.run(functools.partial(cli.main, hooks=hooks))
