"""Weights files are read as data: torch zips and TorchScript archives without running anything.

torch is not a test dependency, so the archives are written here byte by byte as torch writes
them: `<name>/data.pkl` (pickle protocol 2, the opcodes of torch's C++ pickler for TorchScript
and of torch.save for state dicts), `<name>/data/<key>` raw little-endian storages, and for
TorchScript `constants.pkl` and `code/`.
"""

import importlib.util
import pickle
import struct
import zipfile

import flax
import jax
import ml_dtypes
import numpy as np
import pytest

from clipjax.export.__main__ import main as export_main
from clipjax.export.load import load
from clipjax.export.modeldir import read_model_dir
from clipjax.export.openai import from_openai_state_dict, read_state_dict, to_openai_state_dict
from clipjax.export.torchfile import UnsafePickleError, is_torchscript, read_torch_zip
from clipjax.models import CLIPConfig, abstract_variables

TINY = CLIPConfig(
    embed_dim=24,
    image_size=32,
    patch_size=8,
    vision_width=64,
    vision_layers=1,
    vision_heads=1,
    context_length=12,
    vocab_size=300,
    text_width=64,
    text_layers=1,
    text_heads=1,
)
STORAGE = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
}
HAS_TORCH = importlib.util.find_spec("torch") is not None


class Module:
    """A TorchScript module object for the writer: its type name and attributes."""

    def __init__(self, type_name, **attrs):
        self.type_name, self.attrs = type_name, attrs


class View:
    """A tensor that views storage `key` with an explicit offset/size/stride."""

    def __init__(self, key, offset, size, stride):
        self.key, self.offset, self.size, self.stride = key, offset, size, stride


class TorchPickle:
    """Writes pickle opcodes as torch does: GLOBAL + REDUCE tensors with storage persistent ids."""

    def __init__(self, byteorder="little"):
        self.out = bytearray(b"\x80\x02")
        self.storages = {}  # key -> (dtype, raw bytes)
        self.byteorder = byteorder

    def glob(self, module, name):
        self.out += f"c{module}\n{name}\n".encode()

    def string(self, s):
        b = s.encode()
        self.out += b"X" + struct.pack("<I", len(b)) + b

    def integer(self, n):
        if 0 <= n < 256:
            self.out += b"K" + bytes([n])
        elif -(2**31) <= n < 2**31:
            self.out += b"J" + struct.pack("<i", n)
        else:
            self.out += b"\x8a\x08" + struct.pack("<q", n)

    def ints_tuple(self, xs):
        self.out += b"("
        for x in xs:
            self.integer(x)
        self.out += b"t"

    def add_storage(self, key, array):
        array = np.ascontiguousarray(array).reshape(-1)
        order = "<" if self.byteorder == "little" else ">"
        raw = array
        if array.itemsize > 1:
            raw = array.view(f"=u{array.itemsize}").astype(f"{order}u{array.itemsize}")
        self.storages[key] = (array.dtype, array.size, raw.tobytes())

    def tensor(self, key, offset, size, stride):
        dtype, numel, _ = self.storages[key]
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("  # MARK: the rebuild arguments
        self.out += b"("  # the persistent id tuple: storage, type, key, location, numel
        self.string("storage")
        self.glob("torch", STORAGE[dtype])
        self.string(key)
        self.string("cuda:0")  # OpenAI saved from the GPU; the location is ignored
        self.integer(numel)
        self.out += b"tQ"
        self.integer(offset)
        self.ints_tuple(size)
        self.ints_tuple(stride)
        self.out += b"\x89"  # requires_grad False
        self.glob("collections", "OrderedDict")
        self.out += b")R"  # backward hooks: OrderedDict()
        self.out += b"tR"

    def value(self, v):
        if isinstance(v, Module):
            prefix, _, name = v.type_name.rpartition(".")
            self.glob(prefix, name)
            self.out += b")\x81}("  # EMPTY_TUPLE NEWOBJ EMPTY_DICT MARK
            for k, x in v.attrs.items():
                self.string(k)
                self.value(x)
            self.out += b"ub"  # SETITEMS BUILD
        elif isinstance(v, View):
            self.tensor(v.key, v.offset, v.size, v.stride)
        elif isinstance(v, np.ndarray):
            key = str(len(self.storages))
            self.add_storage(key, v)
            strides = tuple(int(np.prod(v.shape[i + 1 :])) for i in range(v.ndim))
            self.tensor(key, 0, v.shape, strides)
        elif isinstance(v, dict):  # torch.save of a state dict: an OrderedDict
            self.glob("collections", "OrderedDict")
            self.out += b")R("
            for k, x in v.items():
                self.string(k)
                self.value(x)
            self.out += b"u"
        elif isinstance(v, bool):
            self.out += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            self.integer(v)
        elif v is None:
            self.out += b"N"
        else:
            raise TypeError(type(v))

    def dumps(self, root):
        self.value(root)
        return bytes(self.out + b".")


def write_archive(path, data_pkl, storages=(), torchscript=False, name="archive", byteorder=None):
    """A torch zip: name/data.pkl, name/data/<key>, and the TorchScript members if asked."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/data.pkl", data_pkl)
        if torchscript:
            zf.writestr(
                f"{name}/code/__torch__/model.py", "class CLIP(Module):\n  __parameters__ = []\n"
            )
            zf.writestr(f"{name}/constants.pkl", b"\x80\x02).")
        for key, (_, _, raw) in dict(storages).items():
            zf.writestr(f"{name}/data/{key}", raw)
        zf.writestr(f"{name}/version", "3\n")
        if byteorder:
            zf.writestr(f"{name}/byteorder", byteorder)
    return str(path)


def module_tree(sd, type_prefix="__torch__.model"):
    """OpenAI-named flat tensors -> nested TorchScript module objects (dotted names split)."""
    tree = {}
    for name, v in sd.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v

    def build(node, type_name):
        attrs = {"training": False}
        for k, v in node.items():
            attrs[k] = build(v, f"{type_prefix}.Sub") if isinstance(v, dict) else v
        return Module(type_name, **attrs)

    return build(tree, f"{type_prefix}.CLIP")


@pytest.fixture(scope="module")
def openai_sd():
    """A tiny CLIP's OpenAI-named state dict in float16, as OpenAI's releases store it."""
    rng = np.random.default_rng(0)
    shapes = flax.core.meta.unbox(abstract_variables(TINY))["params"]
    params = jax.tree.map(
        lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes
    )
    params["logit_scale"] = np.array(2.6, np.float32)
    return {k: v.astype(np.float16) for k, v in to_openai_state_dict(TINY, params).items()}


def openai_archive(path, sd):
    """An OpenAI-style TorchScript .pt: fp16 module attributes, a shared storage, a strided
    tensor, and the non-weight tensors OpenAI's archives carry."""
    sd = dict(sd)
    tp = TorchPickle()
    # ln_final weight and bias share one storage (offsets 0 and W).
    w, b = sd.pop("ln_final.weight"), sd.pop("ln_final.bias")
    tp.add_storage("shared", np.concatenate([w, b]))
    sd["ln_final.weight"] = View("shared", 0, w.shape, (1,))
    sd["ln_final.bias"] = View("shared", w.size, b.shape, (1,))
    # text_projection stored transposed: the tensor is a strided view of its storage.
    proj = sd.pop("text_projection")
    tp.add_storage("projT", proj.T)
    sd["text_projection"] = View("projT", 0, proj.shape, (1, proj.shape[0]))
    sd["input_resolution"] = np.array(TINY.image_size, np.int64)
    sd["transformer.resblocks.0.attn_mask"] = np.full((4, 4), -np.inf, np.float16)
    sd["visual.transformer.resblocks.0.attn_mask"] = None
    data = tp.dumps(module_tree(sd))
    return write_archive(path, data, tp.storages, torchscript=True, name="ViT-Tiny")


# ------------------------------------------------------------------ reading as data
def test_openai_torchscript_archive_reads_without_flag_or_torch(tmp_path, openai_sd):
    path = openai_archive(tmp_path / "ViT-Tiny.pt", openai_sd)
    assert is_torchscript(path)
    got = read_torch_zip(path)
    assert got["input_resolution"].dtype == np.int64 and int(got["input_resolution"]) == 32
    for k, v in openai_sd.items():
        assert got[k].dtype == np.float16 and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # clipjax.load and the import CLI take it as an OpenAI state dict, no flag needed.
    expect_cfg, expect = from_openai_state_dict(openai_sd)
    model, variables, _ = load(path)
    params = variables["params"]
    assert model.config == expect_cfg
    for k, v in flax.traverse_util.flatten_dict(expect).items():
        np.testing.assert_array_equal(flax.traverse_util.flatten_dict(params)[k], v)
    assert (
        export_main(["import", "--from", "openai", path, "--out", str(tmp_path / "imported")]) == 0
    )
    cfg, imported = read_model_dir(str(tmp_path / "imported"))
    assert cfg == expect_cfg
    np.testing.assert_array_equal(imported["visual"]["proj"], expect["visual"]["proj"])


@pytest.mark.parametrize("byteorder", [None, "little", "big"])
def test_torch_save_state_dict_zip_reads_without_torch(tmp_path, byteorder):
    rng = np.random.default_rng(1)
    sd = {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.bias": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        "steps": np.array(7, np.int64),
    }
    tp = TorchPickle(byteorder=byteorder or "little")
    data = tp.dumps({"epoch": 3, "state_dict": sd})
    path = write_archive(tmp_path / "ckpt.pt", data, tp.storages, byteorder=byteorder)
    assert not is_torchscript(path)
    got = read_torch_zip(path)
    assert got["epoch"] == 3
    for k, v in sd.items():
        assert got["state_dict"][k].dtype == v.dtype
        np.testing.assert_array_equal(got["state_dict"][k], v)
    flat = read_state_dict(path)  # the "state_dict" entry, as float32
    np.testing.assert_array_equal(flat["a.bias"], sd["a.bias"].astype(np.float32))


# ------------------------------------------------------------------ refusing code
def evil_pickle(marker):
    """A state dict whose unpickling creates `marker` (a __reduce__ calling exec)."""

    class Evil:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    return pickle.dumps({"visual.proj": Evil()}, protocol=2)


def test_the_payload_runs_under_a_plain_unpickler(tmp_path):
    marker = tmp_path / "pwned-by-plain-pickle"
    pickle.loads(evil_pickle(marker))  # what torch.load(weights_only=False) would do
    assert marker.exists()


@pytest.mark.parametrize("torchscript", [False, True])
def test_malicious_pickle_in_a_pt_is_refused_and_never_runs(tmp_path, capsys, torchscript):
    marker = tmp_path / "pwned"
    path = write_archive(tmp_path / "model.pt", evil_pickle(marker), torchscript=torchscript)
    with pytest.raises(UnsafePickleError, match=r"refusing (__builtin__|builtins)\.exec") as e:
        read_state_dict(path)
    assert ("--trust-torchscript" in str(e.value)) == torchscript
    with pytest.raises(UnsafePickleError):
        load(path)
    assert export_main(["import", "--from", "openai", path, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "exec: the file" in err and "model.pt" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    if torchscript and not HAS_TORCH:  # the flag would hand it to torch.jit.load
        with pytest.raises(ImportError, match="torch"):
            read_state_dict(path, trust_torchscript=True)
        assert not marker.exists()


def test_a_torch_global_outside_torchscript_and_state_on_tensors_are_refused(tmp_path):
    tp = TorchPickle()
    data = tp.dumps(module_tree({"w": np.ones(2, np.float32)}))
    with pytest.raises(UnsafePickleError, match="refusing __torch__.model.CLIP"):
        read_torch_zip(write_archive(tmp_path / "a.pt", data, tp.storages))  # not TorchScript
    tp = TorchPickle()
    tp.value(np.ones(2, np.float32))
    tp.out += b"}b"  # BUILD a tensor with a state dict: it would set attributes
    data = bytes(tp.out + b".")
    with pytest.raises(UnsafePickleError, match="unexpected state"):
        read_torch_zip(write_archive(tmp_path / "b.pt", data, tp.storages))


def test_tensors_cannot_read_outside_their_storage(tmp_path):
    tp = TorchPickle()
    tp.add_storage("0", np.arange(4, dtype=np.float32))
    data = tp.dumps({"w": View("0", 2, (100,), (1,))})
    with pytest.raises(UnsafePickleError, match="reads past storage"):
        read_torch_zip(write_archive(tmp_path / "oob.pt", data, tp.storages))
    tp = TorchPickle()
    tp.add_storage("0", np.arange(4, dtype=np.float32))
    dtype, numel, raw = tp.storages["0"]
    tp.storages["0"] = (dtype, numel, raw[:8])  # the file is shorter than its declared size
    data = tp.dumps({"w": View("0", 0, (4,), (1,))})
    with pytest.raises(ValueError, match="holds 8 bytes, expected 4"):
        read_torch_zip(write_archive(tmp_path / "short.pt", data, tp.storages))
