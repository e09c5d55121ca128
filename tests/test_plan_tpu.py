"""`python -m clipjax.plan` against the real TPU compiler (libtpu, compile-only, no TPU): the B/16
pod recipe fits with the intended collective pattern, multi-slice crosses DCN only over 'data'
(gradient all-reduces, the loss's global batch), and a config that does not fit says so and
exits 1. Slow (a B/16 compile takes minutes of CPU); small topologies stand in for the pods. The
L/14 recipe on v5p and the pods themselves are in benchmarks/plan_pods.py (the README's table)."""

import json
import os
import subprocess
import sys

import pytest

from clipjax.parallel.tpu_topology import find_libtpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_libtpu() is None, reason="libtpu not installed (`make install` puts it in .venv/tpu)"
    ),
]


def run_plan(*args, tmp_path):
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)  # the tests' 8 fake CPU devices are not the plan's business
    proc = subprocess.run(
        [sys.executable, "-m", "clipjax.plan", *args, f"--json={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    plan = json.loads(out.read_text()) if out.exists() else None
    return proc, plan


def rows(plan, kind=None, axes=None, dcn=None):
    return [
        r
        for r in plan["collectives"]
        if (kind is None or r["kind"] == kind)
        and (axes is None or r["axes"] == axes)
        and (dcn is None or r["dcn"] == dcn)
    ]


def test_b16_recipe_fits_with_fsdp_collectives(tmp_path):
    """experiments/b16_laion.py (FSDP 8, ring loss, scan + remat) on a v5e slice of 8 chips at a
    1024 batch: fits; weights are all-gathered over 'fsdp' per layer (inside the layer scan: one
    instruction, run once per layer) and gradients reduce-scattered back; quiet output."""
    proc, plan = run_plan(
        "--config=experiments/b16_laion.py:batch=1024", "--topology=v5e-8", tmp_path=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no libtpu / XLA start-up lines
    assert "FITS (margin" in proc.stdout
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert plan["fits"] and plan["memory_per_chip"]["total"] < plan["hbm_bytes"]
    gathers = rows(plan, "all-gather", ["fsdp"])
    assert gathers and max(r["count"] for r in gathers) >= 12 * 2  # per layer, fwd and bwd
    assert rows(plan, "reduce-scatter", ["fsdp"]) or rows(plan, "all-reduce", ["fsdp"])
    # No parameter is gathered whole outside the layers: the largest all-gather per execution
    # is below one transformer layer's bf16 weights (B/16: 12 * 768^2 * 2 bytes).
    assert max(r["bytes_per_step"] / r["count"] for r in gathers) < 12 * 768**2 * 2
    # Params and Adam's moments split 8 ways: 150M float32 params -> ~75 MB each per chip.
    assert plan["memory_per_chip"]["params"] < 150e6 * 4 / 8 * 1.1
    assert plan["flops_per_step"] > 0 and plan["images_per_second"]["mfu"] > 0


def test_multi_slice_crosses_dcn_over_data_only(tmp_path):
    proc, plan = run_plan(
        "--config=experiments/demo.py", "--topology=v5e-8", "--slices=2",
        "--config.mesh.fsdp=2", "--config.batch_size=64", tmp_path=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert plan["slices"] == 2 and plan["num_chips"] == 16
    dcn = rows(plan, dcn=True)
    # Across slices: the gradients' all-reduce, and the loss's global batch (embeddings, caption
    # ids) gathered; never FSDP's weight gathers, which stay inside a slice.
    assert dcn and {r["kind"] for r in dcn} <= {"all-reduce", "reduce-scatter", "all-gather"}
    assert all(r["axes"] == ["data"] for r in dcn)
    by_kind = {k: sum(r["bytes_per_step"] for r in dcn if r["kind"] == k) for k in ("all-reduce",
               "all-gather")}  # fmt: skip
    assert by_kind["all-reduce"] > by_kind["all-gather"]
    assert rows(plan, "all-gather", ["fsdp"], dcn=False)
    assert "across slices (DCN)" in proc.stdout


def test_a_config_that_does_not_fit_says_so(tmp_path):
    """The B/16 recipe without FSDP or remat, float32, 1024 images per chip on 16 GiB chips."""
    proc, plan = run_plan(
        "--config=experiments/b16_laion.py:batch=8192", "--topology=v5e-8",
        "--config.mesh.fsdp=1", "--config.model.remat=none", "--config.model.dtype=float32",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    if plan is not None:  # compiled, over the chip's HBM
        assert not plan["fits"] and "DOES NOT FIT" in proc.stdout
        assert "error: does not fit" in proc.stderr and "activations/temporaries" in proc.stderr
    else:  # XLA refused it: the largest buffers are named
        assert "error: does not compile" in proc.stderr and "largest buffers" in proc.stderr
