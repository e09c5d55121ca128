import jax
import pytest

from clipjax.parallel import mesh as mesh_lib


def test_make_mesh_fills_the_rest():
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert mesh_lib.batch_axis_size(mesh) == 8


def test_make_mesh_on_a_device_subset():
    mesh = mesh_lib.make_mesh({"data": 2}, devices=jax.devices()[:2])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 3}, "use 3 devices"),
        ({"data": -1, "fsdp": -1}, "at most one axis"),
        ({"model": 2}, "unknown axis"),
        ({"data": -1, "fsdp": 3}, "not divisible"),
    ],
)
def test_bad_mesh_config_names_the_problem(sizes, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.make_mesh(sizes)


def test_batch_sharding_splits_leading_dim():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
    x = jax.device_put(jax.numpy.arange(16.0).reshape(16, 1), mesh_lib.batch_sharding(mesh))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 1)}


def test_multi_slice_mesh_splits_data_across_contiguous_device_groups():
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "slices": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    ids = [[d.id for d in row.flat] for row in mesh.devices]
    # CPU devices carry no slice_index: slice 0 is devices 0-3 (data rows 0-1), slice 1 is 4-7.
    assert ids == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mesh_lib.make_mesh({"data": -1, "slices": 1}).devices.size == 8


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": -1, "slices": 3}, "does not divide the 8 devices"),
        ({"data": -1, "slices": 0}, "must be a positive int"),
        ({"data": 1, "fsdp": 8, "slices": 2}, "fsdp and tensor axes must fit in one slice"),
    ],
)
def test_bad_slices_name_the_problem(sizes, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.make_mesh(sizes)


def test_find_libtpu_order_and_missing_libtpu(tmp_path, monkeypatch):
    from clipjax.parallel import tpu_topology

    venv_lib = tmp_path / "venv" / "tpu" / "libtpu" / "libtpu.so"
    venv_lib.parent.mkdir(parents=True)
    venv_lib.write_bytes(b"")
    own = tmp_path / "own.so"
    own.write_bytes(b"")
    monkeypatch.setattr(tpu_topology.sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(tpu_topology.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(own))
    assert tpu_topology.find_libtpu() == str(own)
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(tmp_path / "missing.so"))
    assert tpu_topology.find_libtpu() == str(venv_lib)
    venv_lib.unlink()
    assert tpu_topology.find_libtpu() is None
    with pytest.raises(RuntimeError, match="libtpu is not installed: run `make`"):
        tpu_topology.abstract_devices("v5e:2x4")
