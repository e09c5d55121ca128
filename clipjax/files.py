"""File helpers shared by the whole package: glob expansion, reading local or remote text, and
atomic writes.

Writers go through `atomic_path` / `write_dir_atomically`: the data lands under a temporary
sibling name and is renamed into place once complete, so a crash never leaves a half-written file
or directory under the final name. What they create gets the mode the umask gives (0666/0777
masked), so outputs on shared storage stay readable to whoever the umask allows.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"  # a write in progress: ".<name>.<8 hex>.tmp" next to <name>
OLD_SUFFIX = ".old"  # a directory being replaced, set aside: ".<name>.<8 hex>.old"


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


def read_text_if_exists(path: str) -> str | None:
    """The text of a local or remote (gs://, ...) file, or None where there is none. Local paths
    are read without TensorFlow, whose import costs seconds of start-up."""
    if "://" not in path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return f.read()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _new_sibling(path, TMP_SUFFIX, _create_file)
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


def write_dir_atomically(
    out: str, write: Callable[[str], None], replaceable: Callable[[str], bool] = lambda d: False
) -> None:
    """Run `write(tmp_dir)` on a sibling temporary directory, then swap it in as `out`.

    An existing `out` is replaced only if it is an empty directory or `replaceable(out)` holds
    (e.g. "is a model directory"): anything else raises FileExistsError before `write` runs. The
    old directory is renamed aside, the new one renamed in, then the old one removed, so a kill
    at any moment leaves the old or the new directory whole (between the two renames, the old
    one under its aside name: the next call puts it back). Temporaries of killed calls are
    removed first.
    """
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    clean_stale(out)
    check_replaceable(out, replaceable)
    tmp = _new_sibling(out, TMP_SUFFIX, _create_dir)
    try:
        write(tmp)
        check_replaceable(out, replaceable)  # it may have appeared meanwhile
        old = None
        if os.path.lexists(out):
            old = _new_sibling(out, OLD_SUFFIX, lambda p: None)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def check_replaceable(out: str, replaceable: Callable[[str], bool]) -> None:
    """FileExistsError unless `out` is absent, an empty directory or `replaceable(out)`."""
    if not os.path.lexists(out):
        return
    if os.path.islink(out) or not os.path.isdir(out):
        raise FileExistsError(f"{out}: exists and is not a directory; not replacing it")
    if os.listdir(out) and not replaceable(out):
        raise FileExistsError(
            f"{out}: exists, is not empty and is not of the kind being written; not replacing "
            f"it (remove it or choose another path)"
        )


def clean_stale(path: str | os.PathLike) -> None:
    """Remove the temporaries that killed atomic writes of `path` left next to it; a directory
    set aside by a swap that was killed before the new one came in is put back first."""
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    pattern = re.compile(re.escape("." + name + ".") + r"[0-9a-f]{8}(\.tmp|\.old)\Z")
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    for entry in names:
        match = pattern.match(entry)
        if not match:
            continue
        stale = os.path.join(directory, entry)
        if match.group(1) == OLD_SUFFIX and not os.path.lexists(path):
            os.rename(stale, path)
            log.warning("%s: restored from %s (an interrupted replace)", path, entry)
        elif os.path.isdir(stale) and not os.path.islink(stale):
            shutil.rmtree(stale)
        else:
            os.remove(stale)


def _new_sibling(path: str, suffix: str, create: Callable[[str], None]) -> str:
    """A fresh `.<name>.<8 hex><suffix>` next to `path`, made by `create` (which fails with
    FileExistsError when taken)."""
    directory, name = os.path.split(os.path.abspath(path))
    for _ in range(100):
        candidate = os.path.join(directory, f".{name}.{secrets.token_hex(4)}{suffix}")
        if os.path.lexists(candidate):
            continue
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name next to {path}")


def _create_file(path: str) -> None:
    # os.open with 0o666 lets the umask decide the mode (mkstemp would give 0600).
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _create_dir(path: str) -> None:
    os.mkdir(path, 0o777)  # the umask applies (mkdtemp would give 0700)
