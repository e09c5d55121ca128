"""The plan command's pure parts: topology names, collective parsing (on a program compiled
for the test's CPU devices), the analytic FLOPs count, the batch search and the table."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clipjax.models.presets import PRESETS
from clipjax.plan.chips import CHIPS, GiB, parse_topology
from clipjax.plan.collectives import Collective, group_axes, parse_collectives, parse_groups
from clipjax.plan.flops import train_step_flops
from clipjax.plan.planner import Memory, Plan, largest_fitting
from clipjax.plan.report import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name, topology, chips",
    [
        ("v5e-256", "v5e:16x16", 256),
        ("v5litepod-16", "v5e:4x4", 16),
        ("v6e-8", "v6e:2x4", 8),
        ("v5p-8", "v5p:2x2x1", 4),  # v5p names count TensorCores
        ("v5p-128", "v5p:4x4x4", 64),
        ("v4-32", "v4:2x2x4", 16),
        ("v4-64", "v4:2x4x4", 32),
        ("v4-256", "v4:4x4x8", 128),
        ("v4-1024", "v4:8x8x8", 512),
        ("V5E:16x16", "v5e:16x16", 256),
        ("v4:4x4x8", "v4:4x4x8", 128),
    ],
)
def test_topology_names(name, topology, chips):
    t = parse_topology(name)
    assert (t.name, t.num_chips) == (topology, chips)


@pytest.mark.parametrize(
    "name, words",
    [
        ("v3-8", "unknown chip 'v3'"),
        ("v5e:4x4x4", "v5e slices are 2-D"),
        ("v4:4x4", "v4 slices are 3-D"),
        ("v5p-7", "not a slice size"),
        ("v5e-12", "not a slice size"),
        ("v4-2", "at least 4 chips"),
        ("tpu", "expected CHIP:AxB"),
    ],
)
def test_topology_names_rejected(name, words):
    with pytest.raises(ValueError, match=words):
        parse_topology(name)


def test_chip_table():
    assert {k: (c.hbm_bytes // GiB, c.peak_bf16_flops / 1e12) for k, c in CHIPS.items()} == {
        "v4": (32, 275),
        "v5e": (16, 197),
        "v5p": (95, 459),
        "v6e": (32, 918),
    }


def test_replica_group_forms():
    assert parse_groups("replica_groups={{0,2},{1,3}}, x", 4) == [[0, 2], [1, 3]]
    assert parse_groups("replica_groups=[2,2]<=[4], x", 4) == [[0, 1], [2, 3]]
    assert parse_groups("replica_groups=[2,2]<=[2,2]T(1,0), x", 4) == [[0, 2], [1, 3]]
    assert parse_groups("replica_groups={}, x", 4) == [[0, 1, 2, 3]]
    assert parse_groups("source_target_pairs={{0,1},{1,0}}, x", 4) == [[0, 1], [1, 0]]
    groups = parse_groups("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0'}", 8)
    assert groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    groups = parse_groups(
        "replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_0'}", 8
    )
    assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    shape, names = (2, 1, 4), ("data", "fsdp", "tensor")
    assert group_axes([[0, 4], [1, 5]], shape, names) == ("data",)
    assert group_axes([[0, 1, 2, 3]], shape, names) == ("tensor",)
    assert group_axes([[0, 1, 4, 5]], shape, names) == ("data", "tensor")


def test_collectives_of_a_compiled_program():
    """A psum over 'b' inside a 5-step scan and an all-gather over 'a', compiled for 8 CPU
    devices: kinds, per-device bytes, executions per step and mesh axes."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("a", "b"))

    def f(x):
        def body(c, _):
            return jax.lax.psum(c * 2.0 + x, "b"), None

        y, _ = jax.lax.scan(body, x, None, length=5)
        return y, jax.lax.all_gather(x, "a", tiled=True)

    g = jax.jit(
        jax.shard_map(
            f,
            mesh=mesh,
            in_specs=P("a", "b"),
            out_specs=(P("a", "b"), P(None, "b")),
            check_vma=False,
        )
    )
    x = jnp.ones((8, 16), jnp.float32)  # per device [4, 4] float32 = 64 bytes
    text = g.lower(x).compile().as_text()
    found = parse_collectives(text, (2, 4), ("a", "b"))
    by_kind = {c.kind: c for c in found}
    assert set(by_kind) == {"all-reduce", "all-gather"}, found
    ar, ag = by_kind["all-reduce"], by_kind["all-gather"]
    assert (ar.bytes, ar.count, ar.axes, ar.crosses_dcn) == (64, 5, ("b",), False)
    assert (ag.bytes, ag.count, ag.axes) == (128, 1, ("a",))


# From a program compiled for 2 slices of v5e:2x4 (a sum over a batch split on data=8, fsdp=2):
# the slice-local all-reduce, then the cross-slice part handed to the megascale (DCN) runtime.
DCN_HLO = """
ENTRY %main.1 (param: f32[4,128]) -> f32[128] {
  %all-reduce.1 = f32[1,1,128]{2,1,0:T(1,128)} all-reduce(%bitcast.2), channel_id=1, \
replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%region_0.0.clone
  %send = (f32[1,1,128]{2,1,0:T(1,128)}, u32[], token[]) send(%all-reduce.1, %after-all), \
channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name=\
"xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce_0",\
_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}"}
  %recv = (f32[1,1,128]{2,1,0:T(1,128)}, u32[], token[]) recv(%after-all), channel_id=1, \
is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name=\
"xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce_0"}
}
""".replace("\\\n", "")


def test_collectives_across_slices():
    found = parse_collectives(DCN_HLO, (8, 2, 1), ("data", "fsdp", "tensor"), slices=2)
    assert found == [
        Collective("all-reduce", 512, 1, ("data", "fsdp"), False, (1, 1, 128)),  # in a slice
        Collective("all-reduce", 512, 1, ("data",), True, (1, 1, 128)),  # over DCN
    ]


def test_flops_match_a_hand_count():
    """B/16 at 224 px: the image tower's forward per image counted by hand."""
    cfg = PRESETS["B/16"]
    assert (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers) == (
        224,
        16,
        768,
        12,
    )
    n, w, d = 197, 768, cfg.embed_dim
    layer = 2 * n * w * 4 * w + 4 * n * n * w + 4 * n * w * 4 * w
    image = 2 * 196 * 16 * 16 * 3 * w + 12 * layer + 2 * w * d
    t, tw = cfg.context_length, cfg.text_width
    text = cfg.text_layers * (2 * t * tw * 4 * tw + 4 * t * t * tw + 4 * t * tw * 4 * tw)
    text += 2 * tw * d
    batch = 1024
    want = 3 * (batch * (image + text) + 2 * batch * batch * d)
    assert train_step_flops(cfg, batch) == pytest.approx(want, rel=1e-12)
    assert image / 1e9 == pytest.approx(35.1, rel=0.01)  # 17.6 GMACs: the known ViT-B/16 cost


def test_largest_fitting_batch():
    for cap in (0, 8, 96, 1000, 5000):
        for start in (8, 256, 4096):
            probes = []

            def fits(n, cap=cap, probes=probes):
                probes.append(n)
                return n <= cap

            got = largest_fitting(fits, start, 8, 4096)
            assert got == min(cap // 8 * 8, 4096)
            assert all(p % 8 == 0 and 8 <= p <= 4096 for p in probes)
            assert len(probes) <= 2 * 10 + 2  # doubling then bisection


def _plan(temporaries: int, slices: int = 1) -> Plan:
    mem = Memory(
        params=1 * GiB, optimizer=2 * GiB, loss_state=0, other_state=0, batch=GiB // 4,
        temporaries=temporaries, arguments=3 * GiB + GiB // 4, outputs=3 * GiB, aliased=3 * GiB,
        code=0,
    )  # fmt: skip
    return Plan(
        config_name="experiments/x.py",
        topology="v5e:2x4",
        chip="v5e",
        slices=slices,
        num_chips=8,
        hbm_bytes=16 * GiB,
        peak_flops=197e12,
        mesh={"data": 4, "fsdp": 2, "tensor": 1},
        axis_sharding={"embed": ["fsdp"], "mlp": None},
        batch_size=1024,
        microbatches=1,
        remat="dots",
        memory=mem,
        flops_per_step=8 * 197e12,  # one second per step per chip at 100%
        collectives=[
            Collective("all-gather", 1024, 12, ("fsdp",), False),
            Collective("all-reduce", 4096, 1, ("data",), slices > 1),
        ],
        compile_seconds=12.0,
        eval_memory={"image": GiB, "text": GiB // 2},
        eval_compile_seconds=3.0,
        mfu=0.5,
    )


def test_table_fits():
    plan = _plan(temporaries=8 * GiB)
    text = render(plan)
    assert plan.memory.total == 11 * GiB + GiB // 4
    assert "11.25 GiB of 16.00 GiB HBM (v5e)" in text
    assert "FITS (margin 4.75 GiB)" in text
    assert "mesh                   data=4 fsdp=2 tensor=1" in text
    assert "embed->fsdp" in text and "batch->data+fsdp" in text
    assert "bound at 100%          1 s/step, 1,024 images/s" in text
    assert "at 50% MFU             2 s/step, 512 images/s" in text
    assert "all-gather           fsdp: 12.0 KiB (1 ops, 12 runs)" in text
    assert "DCN" not in text
    assert plan.to_json()["fits"] is True


def test_table_does_not_fit_and_dcn():
    plan = _plan(temporaries=14 * GiB, slices=2)
    text = render(plan)
    assert not plan.fits
    assert "DOES NOT FIT (over by 1.25 GiB)" in text
    assert "all-reduce           data [DCN]: 4.0 KiB (1 ops, 1 runs)" in text
    assert "  across slices (DCN)  4.0 KiB per chip per step" in text
    assert "2 slices over DCN" in text


def test_missing_libtpu_is_one_line():
    """Without libtpu the plan stops before any work with one line saying how to install it."""
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    env["PYTHONPATH"] = ROOT
    code = (
        "import sys, clipjax.parallel.tpu_topology as t; t.find_libtpu = lambda: None; "
        "sys.argv = ['plan', '--config=experiments/demo.py', '--topology=v5e-8']; "
        "from absl import app; import clipjax.plan.__main__ as m; "
        "app.run(m.main, flags_parser=m.parse_config_flags)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "libtpu is not installed" in proc.stderr
