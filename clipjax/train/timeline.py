"""Where a run's wall-clock time goes before its first step and after its last: the phases from
process start to the first train step (imports, mesh, data, init, compile, first batch) and of
the end (final save, eval, export), for the progress output and metrics.jsonl.

Short runs (sweeps, smoke tests) pay the start-up every time, so it is measured, not guessed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

_IMPORTED = time.time()  # fallback origin where the process start time cannot be read


def process_start_time() -> float:
    """Epoch seconds at which this process started: from /proc on Linux (clock ticks since boot
    of /proc/self/stat against /proc/uptime), else the time this module was imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        # Fields after the parenthesised command name start at field 3; starttime is field 22.
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        started = time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED
    return started if started <= _IMPORTED else _IMPORTED


class Timeline:
    """Consecutive wall-clock phases since an origin (epoch seconds, default now).

    `mark(name)` books the time since the previous mark (or the origin) to `name`; marking a name
    again adds to it, so the phases always sum to the time elapsed at the last mark.
    """

    def __init__(self, origin: float | None = None):
        now_wall, now_mono = time.time(), time.monotonic()
        origin = now_wall if origin is None else float(origin)
        self._origin = now_mono - max(0.0, now_wall - origin)  # on the monotonic clock
        self._last = self._origin
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        """Seconds since the origin."""
        return time.monotonic() - self._origin

    def mark(self, name: str) -> float:
        """Book the time since the previous mark to phase `name`; returns that time."""
        now = time.monotonic()
        seconds = now - self._last
        self._last = now
        self.add(name, seconds)
        return seconds

    def add(self, name: str, seconds: float) -> None:
        """Book `seconds` to `name` without moving the mark (e.g. work done in the background)."""
        self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)

    def since_mark(self) -> float:
        """Seconds since the previous mark."""
        return time.monotonic() - self._last

    def metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix}/{phase}_s` for every phase, names with '_' for spaces."""
        return {f"{prefix}/{k.replace(' ', '_')}_s": v for k, v in self.phases.items()}


def startup_line(
    timeline: Timeline, first_step_at: float, notes: Mapping[str, str] | None = None
) -> str:
    """'start-up: imports 3.1 s, ..., first step 0.4 s -> first step done at 15.0 s'; `notes`
    add a parenthesised remark after a phase."""
    notes = notes or {}
    parts = [
        f"{name} {s:.1f} s" + (f" ({notes[name]})" if name in notes else "")
        for name, s in timeline.phases.items()
    ]
    return f"start-up: {', '.join(parts)} -> first step done at {first_step_at:.1f} s"


def end_line(timeline: Timeline) -> str:
    """'end: final save 0.5 s, eval 2.0 s, export 0.3 s'."""
    return "end: " + ", ".join(f"{name} {s:.1f} s" for name, s in timeline.phases.items())
