"""JAX's persistent compilation cache for training runs, on by default.

A run compiles its init and train step once per process; with the cache a rerun of the same
config (sweeps, resumes, smoke tests) loads the executables from disk instead. `config.
compile_cache_dir`: 'auto' (default) = a directory already set for JAX (JAX_COMPILATION_CACHE_DIR)
or the user cache directory ($XDG_CACHE_HOME or ~/.cache, then clipjax/jax); '' = off; else a
directory. The cache holds executables JAX will run: keep it private to the user.
"""

from __future__ import annotations

import logging
import os
import threading

import jax

log = logging.getLogger(__name__)

HIT_EVENT = "/jax/compilation_cache/cache_hits"
# Computations that compile faster than this are not written (JAX's default is 1 s, which leaves
# out the small CPU programs of the demo and tests).
MIN_COMPILE_SECS = 0.2

_hits = 0
_hits_lock = threading.Lock()
_listening = False


def default_dir() -> str:
    """$XDG_CACHE_HOME/clipjax/jax, else ~/.cache/clipjax/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipjax", "jax")


def resolve_dir(spec: str) -> str | None:
    """The cache directory `spec` (a config.compile_cache_dir value) names, or None (off)."""
    spec = (spec or "").strip()
    if not spec:
        return None
    if spec == "auto":
        return jax.config.jax_compilation_cache_dir or default_dir()
    return os.path.abspath(os.path.expanduser(spec))


def enable(spec: str) -> str | None:
    """Point JAX's persistent cache at the directory of `spec` (see the module docstring), or
    turn it off; count its hits. Returns the directory, or None (off)."""
    _listen()
    path = resolve_dir(spec)
    if path is not None:
        os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        # JAX decides at its first compile whether the cache is used and with which directory;
        # start over so that a process that compiled before (tests, notebooks) follows too.
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    if path is None:
        return None
    if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_SECS:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    log.info("persistent compilation cache in %s", path)
    return path


def hits() -> int:
    """Persistent-cache hits in this process so far (executables loaded instead of compiled)."""
    return _hits


def _on_event(event: str, **kwargs) -> None:
    global _hits
    if event == HIT_EVENT:
        with _hits_lock:
            _hits += 1


def _listen() -> None:
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        _listening = True
