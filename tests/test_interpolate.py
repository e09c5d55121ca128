"""Weight interpolation (WiSE-FT): exact endpoints, the mean, ResNet statistics, and the CLI's
refusals (configs, parameter trees, alpha)."""

import dataclasses

import numpy as np
import pytest
from test_export import TINY, TINY_RN, assert_trees_equal, init_params

from clipjax.export import serialization as ser
from clipjax.export.__main__ import main as export_main
from clipjax.export.interpolate import interpolate_params
from clipjax.export.modeldir import read_model_dir, save_model_dir


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two model dirs of TINY with different weights; B saved with scanned layers and
    patch_dropout set (compute / training settings, not architecture)."""
    root = tmp_path_factory.mktemp("interp")
    a, b = init_params(TINY, seed=0), init_params(TINY, seed=1)
    save_model_dir(str(root / "a"), TINY, a)
    cfg_b = dataclasses.replace(TINY, scan_layers=True, patch_dropout=0.5)
    save_model_dir(str(root / "b"), cfg_b, b)
    return root, a, b


def interpolate(root, alpha, out, *extra):
    return export_main(
        ["interpolate", str(root / "a"), str(root / "b"), "--alpha", str(alpha), "--out", out]
        + list(extra)
    )


@pytest.mark.parametrize("alpha, which", [(0.0, "a"), (1.0, "b")])
def test_endpoints_are_the_inputs_exactly(two, alpha, which, tmp_path):
    root, a, b = two
    assert interpolate(root, alpha, str(tmp_path / "c")) == 0
    config, params = read_model_dir(str(tmp_path / "c"))
    assert config == TINY  # A's config
    assert_trees_equal(params, a if which == "a" else b)


def test_half_is_the_mean(two, tmp_path):
    root, a, b = two
    assert interpolate(root, 0.5, str(tmp_path / "c"), "--format", "msgpack") == 0
    _, params = read_model_dir(str(tmp_path / "c"))
    fa, fb, fc = (ser.flatten_params(t) for t in (a, b, params))
    assert fc.keys() == fa.keys()
    for k in fa:
        np.testing.assert_allclose(fc[k], (fa[k] + fb[k]) / 2, rtol=1e-6, atol=1e-8, err_msg=k)
    assert not np.array_equal(fc["visual/proj"], fa["visual/proj"])


def test_resnet_batch_stats_are_interpolated_too():
    a, b = init_params(TINY_RN, seed=0), init_params(TINY_RN, seed=1)
    c = interpolate_params(a, b, 0.25)
    assert set(c) == {"params", "batch_stats"}
    for coll in ("params", "batch_stats"):
        fa, fb, fc = (ser.flatten_params(t[coll]) for t in (a, b, c))
        for k in fa:
            want = 0.75 * fa[k].astype(np.float64) + 0.25 * fb[k].astype(np.float64)
            np.testing.assert_allclose(fc[k], want, rtol=1e-6, atol=1e-9, err_msg=k)


def test_mismatched_configs_are_refused_by_field_name(two, tmp_path, capsys):
    root, a, _ = two
    other = dataclasses.replace(TINY, embed_dim=32, context_length=16)
    save_model_dir(str(root / "other"), other, init_params(other))
    code = export_main(
        ["interpolate", str(root / "a"), str(root / "other"), "--alpha", "0.5"]
        + ["--out", str(tmp_path / "c")]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "context_length: 12 vs 16" in err and "embed_dim: 24 vs 32" in err
    assert not (tmp_path / "c").exists()


def test_different_parameter_trees_are_refused_by_path():
    a = init_params(TINY, seed=0)
    b = init_params(TINY, seed=1)
    del b["visual"]["proj"]
    with pytest.raises(ValueError, match=r"only in A \['params/visual/proj'\]"):
        interpolate_params(a, b, 0.5)
    b = init_params(TINY, seed=1)
    b["visual"]["proj"] = b["visual"]["proj"][:, :5]
    with pytest.raises(ValueError, match=r"params/visual/proj: A is float32\[64, 24\]"):
        interpolate_params(a, b, 0.5)


@pytest.mark.parametrize("alpha", ["-0.1", "1.5", "nan"])
def test_alpha_outside_0_1_is_refused(two, alpha, tmp_path, capsys):
    root, _, _ = two
    assert interpolate(root, alpha, str(tmp_path / "c")) == 1
    assert "expected a number in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_existing_out_needs_overwrite(two, tmp_path):
    root, _, _ = two
    (tmp_path / "c").mkdir()
    with pytest.raises(SystemExit, match="--overwrite"):
        interpolate(root, 0.5, str(tmp_path / "c"))
    assert interpolate(root, 0.5, str(tmp_path / "c"), "--overwrite") == 0
