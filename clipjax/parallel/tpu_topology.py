"""Abstract TPU devices for compiling without a TPU: locate libtpu, set up its environment.

`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4")` loads
libtpu as a compile-only PJRT plugin and returns the devices of a real pod slice; a mesh over them
lets `jax.jit(...).lower(abstract args).compile()` run the real TPU compiler on a CPU host. The
CPU backend stays the default (`jax_platforms` is left alone when set, else set to 'cpu'),
so arrays, tests and training on CPU are unaffected.

libtpu is found, in order, at `$TPU_LIBRARY_PATH`, as an importable `libtpu` module, or at
`<sys.prefix>/tpu/libtpu/libtpu.so` (where `make` installs it with `pip install --target
.venv/tpu`, out of the import path so that a CPU process never picks it up by itself).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence

import jax

# Installed by `make` with `pip install --target <venv>/tpu libtpu`.
VENV_TPU_DIR = "tpu"
INSTALL_HINT = (
    "libtpu is not installed: run `make` (installs it under .venv/tpu), or "
    "`pip install --target .venv/tpu libtpu==<the version matching jax>`, or set "
    "TPU_LIBRARY_PATH to a libtpu.so"
)


def find_libtpu() -> str | None:
    """Path of libtpu.so, or None: $TPU_LIBRARY_PATH, an importable `libtpu`, then
    `<sys.prefix>/tpu/libtpu/libtpu.so`."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, "libtpu.so")
            if os.path.isfile(path):
                return path
    path = os.path.join(sys.prefix, VENV_TPU_DIR, "libtpu", "libtpu.so")
    return path if os.path.isfile(path) else None


@contextlib.contextmanager
def libtpu_env(libtpu: str) -> Iterator[None]:
    """The environment a compile-only libtpu needs on a host without TPUs while jax loads it: its
    path (restored afterwards, so child processes do not load libtpu), no metadata-server query
    (it can hang off Cloud), several processes may load it (parallel tests), and the CPU backend
    as default unless JAX_PLATFORMS says otherwise."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
    if not jax.config.jax_platforms:  # env is read at import; an unset one would try libtpu
        jax.config.update("jax_platforms", "cpu")
    before = os.environ.get("TPU_LIBRARY_PATH")
    os.environ["TPU_LIBRARY_PATH"] = libtpu
    try:
        yield
    finally:
        if before is None:
            del os.environ["TPU_LIBRARY_PATH"]
        else:
            os.environ["TPU_LIBRARY_PATH"] = before


def abstract_devices(
    topology_name: str, slices: int = 1, chip_config_name: str | None = None
) -> Sequence[jax.Device]:
    """Compile-only devices of `slices` TPU slices of `topology_name` (jax's form, e.g.
    'v5e:2x4', 'v4:4x4x8'); each carries `slice_index` when `slices` > 1. `chip_config_name`:
    libtpu's chip configuration ('megacore' for v4/v5p: one device per chip).

    Raises RuntimeError with install instructions when libtpu is missing."""
    from jax.experimental import topologies

    libtpu = find_libtpu()
    if libtpu is None:
        raise RuntimeError(INSTALL_HINT)
    kwargs = {"num_slices": int(slices)} if int(slices) > 1 else {}
    if chip_config_name:
        kwargs["chip_config_name"] = chip_config_name
    with libtpu_env(libtpu):
        return topologies.get_topology_desc(
            platform="tpu", topology_name=topology_name, **kwargs
        ).devices
