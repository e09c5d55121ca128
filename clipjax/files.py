"""File helpers shared by the whole package: glob expansion and atomic writes.

Writers go through `atomic_path` / `write_dir_atomically`: the data lands under a temporary
sibling name and is renamed into place once complete, so a crash never leaves a half-written file
or directory under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def split_patterns(spec: str | Iterable[str]) -> list[str]:
    """Globs from a comma-separated string or an iterable of strings (blanks dropped)."""
    parts = spec.split(",") if isinstance(spec, str) else [str(p) for p in spec]
    return [p.strip() for p in parts if p.strip()]


def expand_globs(
    spec: str | Iterable[str],
    *,
    files_only: bool = False,
    recursive: bool = False,
    missing: Callable[[str], Exception] | None = None,
) -> list[str]:
    """Paths matching a glob or several (comma-separated string or iterable).

    Each pattern's matches are sorted; patterns keep their order and a path matched twice is
    listed once. Remote patterns (gs://, ...) are listed through tf.io.gfile, local ones with `~`
    expanded. `files_only` drops directories; `missing(pattern)`, when given, is the exception
    raised for a pattern that matches nothing (callers word their own errors).
    """
    out: dict[str, None] = {}
    for pattern in split_patterns(spec):
        if "://" in pattern:
            import tensorflow as tf

            matches = tf.io.gfile.glob(pattern)
            if files_only:
                matches = [m for m in matches if not tf.io.gfile.isdir(m)]
        else:
            matches = glob.glob(os.path.expanduser(pattern), recursive=recursive)
            if files_only:
                matches = [m for m in matches if os.path.isfile(m)]
        if not matches and missing is not None:
            raise missing(pattern)
        out.update(dict.fromkeys(sorted(matches)))
    return list(out)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Write `obj` as JSON (plus a newline) to `path` atomically."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_dir_atomically(out: str, write: Callable[[str], None]) -> None:
    """Run `write(tmp_dir)` on a sibling temporary directory, then move it to `out` (replacing
    what was there)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(out)) + ".", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(out) and not os.path.islink(out):
            shutil.rmtree(out)
        elif os.path.exists(out):
            os.remove(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
