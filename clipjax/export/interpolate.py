"""Weight-space interpolation of two models of one architecture (WiSE-FT).

`(1 - alpha) * A + alpha * B` for every float array (params, and BatchNorm statistics of ResNet
towers): interpolating a fine-tuned model with the zero-shot one it started from keeps much of
the zero-shot model's robustness (Wortsman et al., 2022). alpha 0 gives A and 1 gives B exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from clipjax.export import modeldir
from clipjax.export.serialization import flatten_params, unflatten_params
from clipjax.models import CLIPConfig, unstack_layer_params


def check_alpha(alpha: float) -> float:
    """alpha as a float in [0, 1]; a clear error otherwise."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha={alpha!r} is invalid: expected a number in [0, 1]") from None
    if not (math.isfinite(a) and 0.0 <= a <= 1.0):
        raise ValueError(f"alpha={alpha!r} is invalid: expected a number in [0, 1]")
    return a


def check_same_architecture(a: CLIPConfig, b: CLIPConfig, names: tuple[str, str]) -> None:
    """Raise naming every architecture field in which `a` and `b` differ (compute settings such
    as dtype or scan_layers, and patch_dropout, may differ: they do not change the weights)."""
    da, db = a.architecture(), b.architecture()
    diff = [k for k in sorted(da) if da[k] != db[k]]
    if diff:
        parts = ", ".join(f"{k}: {da[k]!r} vs {db[k]!r}" for k in diff)
        raise ValueError(
            f"cannot interpolate {names[0]} and {names[1]}: their model configs differ in "
            f"{diff} ({parts})"
        )


def _flat(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """'collection/path' -> array in the looped-layer layout, whatever the config scans."""
    variables = modeldir.variables_of(tree)
    return {
        f"{c}/{k}": v
        for c, t in variables.items()
        for k, v in flatten_params(unstack_layer_params(t)).items()
    }


def interpolate_params(a: Mapping[str, Any], b: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """`(1 - alpha) * a + alpha * b` leaf by leaf (computed in float64, stored in each leaf's
    dtype), in the looped-layer layout; non-float leaves must be equal and are copied. Params or
    variables dicts (ResNet); the two trees must have the same paths, shapes and dtypes."""
    alpha = check_alpha(alpha)
    fa, fb = _flat(a), _flat(b)
    if fa.keys() != fb.keys():
        only_a, only_b = sorted(fa.keys() - fb.keys()), sorted(fb.keys() - fa.keys())
        raise ValueError(
            f"the two models have different parameters: only in A {only_a[:3]}, only in B "
            f"{only_b[:3]}{' ...' if len(only_a) > 3 or len(only_b) > 3 else ''}"
        )
    out = {}
    for path in sorted(fa):
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        if x.shape != y.shape or x.dtype != y.dtype:
            raise ValueError(
                f"parameter {path}: A is {x.dtype}{list(x.shape)}, B is {y.dtype}{list(y.shape)}"
            )
        if np.issubdtype(x.dtype, np.floating):
            mixed = (1.0 - alpha) * x.astype(np.float64) + alpha * y.astype(np.float64)
            out[path] = mixed.astype(x.dtype)
        elif np.array_equal(x, y):
            out[path] = x.copy()
        else:
            raise ValueError(f"parameter {path}: non-float values differ between A and B")
    variables = unflatten_params(out)
    return variables if modeldir.is_variables(a) else variables["params"]
