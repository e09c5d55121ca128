"""Parameter pytrees <-> files: safetensors (flat '/'-joined names) and flax msgpack.

Every writer goes through `clipjax.files.write_bytes`, so a crash never leaves a half-written file
behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from clipjax.files import write_bytes

SEP = "/"


def _unbox(tree: Any) -> Any:
    """Strip flax partitioning boxes (nn.Partitioned etc.) so leaves are plain arrays."""
    try:
        from flax.core import meta
    except ImportError:  # pragma: no cover - flax is a hard dependency
        return tree
    return meta.unbox(tree)


def flatten_params(params: Mapping[str, Any], as_numpy: bool = True) -> dict[str, Any]:
    """Nested dict of arrays -> {'a/b/c': np.ndarray} (host numpy copies, dtypes kept).

    With `as_numpy=False` leaves are returned as they are (e.g. jax.ShapeDtypeStruct).
    """
    params = _unbox(params)
    if hasattr(params, "unfreeze"):
        params = params.unfreeze()
    flat: dict[str, np.ndarray] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key in sorted(node):
                if not isinstance(key, str) or SEP in key:
                    raise ValueError(
                        f"parameter key {key!r} under {prefix or '<root>'!r} must be "
                        f"a string without {SEP!r}"
                    )
                visit(node[key], f"{prefix}{SEP}{key}" if prefix else key)
        elif node is None:
            return
        else:
            flat[prefix] = np.asarray(node) if as_numpy else node

    visit(params, "")
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': x} -> nested dict; the inverse of `flatten_params`."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split(SEP)
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"parameter name {name!r} clashes with a leaf at {part!r}")
            node = child
        if parts[-1] in node:
            raise ValueError(f"parameter name {name!r} appears twice or clashes with a subtree")
        node[parts[-1]] = value
    return tree


def save_safetensors(
    params: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write params as one safetensors file with '/'-joined names."""
    from safetensors.numpy import save

    flat = {k: np.array(v, order="C") for k, v in flatten_params(params).items()}  # keeps 0-d
    write_bytes(path, save(flat, metadata=dict(metadata) if metadata else None))


def load_safetensors_flat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays, names as stored."""
    from safetensors.numpy import load_file

    _require_file(path, "a safetensors file")
    return dict(load_file(os.fspath(path)))


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    return unflatten_params(load_safetensors_flat(path))


def save_msgpack(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write params with flax's msgpack serialisation (nested dict of numpy arrays)."""
    from flax import serialization

    tree = unflatten_params(flatten_params(params))
    write_bytes(path, serialization.msgpack_serialize(tree))


def load_msgpack(path: str | os.PathLike) -> dict[str, Any]:
    from flax import serialization

    _require_file(path, "a flax msgpack file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"{os.fspath(path)}: not a valid flax msgpack file ({e})") from e
    if not isinstance(tree, dict):
        raise ValueError(
            f"{os.fspath(path)}: expected a nested dict of arrays, got {type(tree).__name__}"
        )
    return tree


def json_field(path: str | os.PathLike, key: str) -> Any:
    """`key` of the JSON object in file `path`; None when the file is missing or not such JSON."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _require_file(path: str | os.PathLike, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such file (expected {what})")
