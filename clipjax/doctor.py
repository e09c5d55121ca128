"""`python -m clipjax.doctor`: check an environment before launching a job on it.

Prints the Python and package versions (read from the installed metadata: nothing heavy is
imported for them), JAX's backend and devices, the accelerator plugins present, and whether the
huge-page malloc tunable that CPU runs use is active (`clipjax.hostmem`). `--json` prints one JSON
object instead. Exit status 1 when JAX cannot start a backend or `--expect` names another one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

from clipjax.hostmem import HUGEPAGE_TUNABLE

PACKAGES = (
    "clipjax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "ml-collections",
    "numpy",
    "tensorflow-cpu",
    "tensorflow",
    "tensorflow-datasets",
    "pillow",
    "safetensors",
)
PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def transparent_hugepages() -> str | None:
    """The kernel's THP mode ('always', 'madvise' or 'never'), where Linux reports it."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def jax_report() -> dict[str, Any]:
    """Backend and devices, or the error JAX gave when starting one."""
    try:
        import jax

        devices = jax.devices()
    except Exception as e:  # a missing or broken plugin: report it, do not crash
        return {"backend": None, "error": f"{type(e).__name__}: {e}"}
    kinds: dict[str, int] = {}
    for d in devices:
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    return {
        "backend": jax.default_backend(),
        "devices": kinds,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
    }


def report() -> dict[str, Any]:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "packages": {name: version(name) for name in PACKAGES if version(name)},
        "accelerator_plugins": {name: version(name) for name in PLUGINS if version(name)},
        "jax": jax_report(),
        "hugepage_malloc": HUGEPAGE_TUNABLE in tunables.split(":"),
        "transparent_hugepages": transparent_hugepages(),
        "env": {
            k: os.environ[k]
            for k in ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES", "GLIBC_TUNABLES")
            if k in os.environ
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipjax.doctor", description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument(
        "--expect", choices=["cpu", "gpu", "tpu"], help="exit 1 unless this is JAX's backend"
    )
    args = parser.parse_args(argv)
    r = report()
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"python    {r['python']}")
        print(f"platform  {r['platform']}")
        print("packages  " + ", ".join(f"{k} {v}" for k, v in r["packages"].items()))
        plugins = ", ".join(f"{k} {v}" for k, v in r["accelerator_plugins"].items())
        print(f"plugins   {plugins or 'none (CPU-only jax)'}")
        j = r["jax"]
        if j["backend"] is None:
            print(f"jax       cannot start a backend: {j['error']}")
        else:
            kinds = ", ".join(f"{n} x {k}" for k, n in j["devices"].items())
            print(
                f"jax       backend {j['backend']}: {kinds}; {j['process_count']} process(es), "
                f"{j['local_device_count']} local device(s)"
            )
        print(
            f"host mem  huge-page malloc tunable {'on' if r['hugepage_malloc'] else 'off'} "
            f"(transparent huge pages: {r['transparent_hugepages'] or 'unknown'})"
        )
        for k, v in r["env"].items():
            print(f"env       {k}={v}")
    backend = r["jax"]["backend"]
    if backend is None:
        return 1
    if args.expect and backend != args.expect:
        print(f"error: expected the {args.expect} backend, JAX started {backend}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
