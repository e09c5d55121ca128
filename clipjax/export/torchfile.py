"""Tensors of PyTorch zip checkpoints and TorchScript archives, read as data only (no torch).

Both `torch.save` files and `torch.jit.save` archives (OpenAI's released CLIP `.pt` files) are
zips holding `<name>/data.pkl`, a pickle, and `<name>/data/<key>`, the raw tensor storages. A
pickle may call any importable function while it loads, so it is read here by an unpickler that
knows only what tensors are made of: the torch rebuild functions, storage types, OrderedDict,
TorchScript's list tags and its module objects (`__torch__.*`, rebuilt as inert attribute
holders; their code in `code/` is never read). Anything else is refused with `UnsafePickleError`
before it runs.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_PICKLE_BYTES = 1 << 30  # data.pkl holds structure only; tensors live in data/


class UnsafePickleError(ValueError):
    """A weights file whose pickle needs something other than tensors and plain containers."""


def _bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# torch.<Name>Storage -> numpy dtype (None: bfloat16, from ml_dtypes, which comes with jax).
_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": None,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Inert:
    """Base of everything the reader builds: the pickle may not set state on it."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"unexpected state for a {type(self).__name__}")


class _StorageType(_Inert):
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    @property
    def dtype(self) -> np.dtype:
        d = _STORAGE_DTYPES[self.name]
        return _bfloat16() if d is None else np.dtype(d)


class _Storage(_Inert):
    __slots__ = ("array", "key")

    def __init__(self, array: np.ndarray, key: str):
        self.array, self.key = array, key


class Tensor(_Inert):
    """A rebuilt tensor: a numpy view of its storage (converted by `read_torch_zip`)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class ScriptObject:
    """A TorchScript module/object from data.pkl: its attributes, nothing else."""

    def __init__(self, type_name: str):
        self.type_name = type_name
        self.attributes: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.attributes = {str(k): v for k, v in state.items()}
        else:  # a custom __getstate__: keep what it gave, it names no tensors
            self.attributes = {"__state__": state}


def _script_class(type_name: str) -> type:
    """A fresh inert class for TorchScript type `type_name` (NEWOBJ calls cls.__new__(cls))."""

    def new(cls: type) -> ScriptObject:
        return ScriptObject(type_name)

    return type("ScriptObjectType", (), {"__new__": new})


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = None,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> Tensor:
    """torch._utils._rebuild_tensor_v2, bounds-checked against the storage."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("tensor rebuilt from something that is not a storage")
    ints = (int, np.integer)
    if not (
        isinstance(offset, ints)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(v, ints) for v in size + stride)
    ):
        raise UnsafePickleError(
            f"malformed tensor: offset {offset!r}, size {size!r}, stride {stride!r}"
        )
    size, stride, offset = tuple(map(int, size)), tuple(map(int, stride)), int(offset)
    flat = storage.array
    if min(size + stride + (offset,), default=0) < 0:
        raise UnsafePickleError(
            f"tensor with a negative size, stride or offset in storage {storage.key}"
        )
    numel = math.prod(size)
    if numel == 0:
        return Tensor(np.zeros(size, flat.dtype))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise UnsafePickleError(
            f"tensor of size {size}, stride {stride}, offset {offset} reads "
            f"past storage {storage.key} of {flat.size} elements"
        )
    contiguous = tuple(math.prod(size[i + 1 :]) for i in range(len(size)))
    if all(s == c for n, s, c in zip(size, stride, contiguous) if n > 1):
        return Tensor(flat[offset : offset + numel].reshape(size))
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], size, tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return Tensor(np.array(view))


def _rebuild_parameter(
    data: Any, requires_grad: Any = None, backward_hooks: Any = None, state: Any = None
) -> Tensor:
    if not isinstance(data, Tensor):
        raise UnsafePickleError("parameter rebuilt from something that is not a tensor")
    return data


def _identity_list(items: Any) -> list:
    if not isinstance(items, list):
        raise UnsafePickleError(f"expected a list, got {type(items).__name__}")
    return items


def _restore_type_tag(value: Any, type_str: Any = None) -> Any:
    return value


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
    ("torch", "device"): _device,
    ("torch.jit._pickle", "build_intlist"): _identity_list,
    ("torch.jit._pickle", "build_doublelist"): _identity_list,
    ("torch.jit._pickle", "build_boollist"): _identity_list,
    ("torch.jit._pickle", "build_tensorlist"): _identity_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _WeightsUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED`, storage types and (in TorchScript) `__torch__` classes."""

    def __init__(
        self,
        data: bytes,
        zf: zipfile.ZipFile,
        prefix: str,
        path: str,
        byteorder: str,
        torchscript: bool,
    ):
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix, self.path = zf, prefix, path
        self.byteorder, self.torchscript = byteorder, torchscript
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if self.torchscript and (module == "__torch__" or module.startswith("__torch__.")):
            return _script_class(f"{module}.{name}")
        raise UnsafePickleError(
            f"{self.path}: refusing {module}.{name}: the file's pickle "
            f"asks for it, and only tensors, storages and plain containers "
            f"are read from weights files (loading it with torch.load or "
            f"torch.jit.load could run code from the file)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) >= 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], (int, np.integer))
        ):
            raise UnsafePickleError(f"{self.path}: unsupported persistent id {pid!r:.200}")
        stype, key, numel = pid[1], pid[2], int(pid[4])
        if key in self.storages:
            return self.storages[key]
        dtype = stype.dtype
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise ValueError(
                f"{self.path}: storage {key!r} is not in the archive (no {name})"
            ) from None
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            raise ValueError(
                f"{self.path}: {name} holds {info.file_size} bytes, expected "
                f"{numel} x {dtype} = {nbytes}"
            )
        buf = np.empty(nbytes, np.uint8)
        with self.zf.open(info) as f:
            view, done = memoryview(buf), 0
            while done < nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path}: {name} ends early")
                done += n
        if dtype.itemsize > 1:  # to native byte order, as unsigned ints of the same width
            order = "<" if self.byteorder == "little" else ">"
            word = np.dtype(f"u{dtype.itemsize}").newbyteorder(order)
            if not word.isnative:
                buf = buf.view(word).astype(word.newbyteorder("=")).view(np.uint8)
        self.storages[key] = _Storage(buf.view(dtype), key)
        return self.storages[key]


def archive_layout(zf: zipfile.ZipFile, path: str) -> tuple[str, bool]:
    """(prefix of data.pkl, is TorchScript) of a torch zip; ValueError if it is not one."""
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pkls) != 1:
        raise ValueError(
            f"{path}: a zip, but not a PyTorch checkpoint (expected one "
            f"<name>/data.pkl, found {len(pkls)})"
        )
    prefix = pkls[0][: -len("data.pkl")]
    torchscript = f"{prefix}constants.pkl" in names or any(
        n.startswith(f"{prefix}code/") for n in names
    )
    return prefix, torchscript


def is_torchscript(path: str) -> bool:
    """Whether `path` is a TorchScript archive (a torch zip with constants.pkl / code/)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        try:
            return archive_layout(zf, path)[1]
        except ValueError:
            return False


def _tensors(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Tensors of a TorchScript object tree, named by their attribute paths (a state dict)."""
    if isinstance(obj, Tensor):
        out[prefix] = obj.array
    elif isinstance(obj, ScriptObject):
        for k, v in obj.attributes.items():
            if isinstance(v, (Tensor, ScriptObject)):
                _tensors(v, f"{prefix}.{k}" if prefix else k, out)


def _unwrap(obj: Any) -> Any:
    """Tensor wrappers -> numpy arrays inside plain containers (a torch.save'd object)."""
    if isinstance(obj, Tensor):
        return obj.array
    if isinstance(obj, Mapping):
        return {k: _unwrap(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(v) for v in obj)
    return obj


def read_torch_zip(path: str) -> Any:
    """The object a torch zip holds, tensors as numpy arrays, without running anything.

    A TorchScript archive gives its module's tensors as a flat {dotted name: array} state
    dict (parameters, buffers and tensor attributes); a `torch.save` file gives the saved
    object (usually a state dict). Raises UnsafePickleError for anything else.
    """
    with zipfile.ZipFile(path) as zf:
        prefix, torchscript = archive_layout(zf, path)
        info = zf.getinfo(f"{prefix}data.pkl")
        if info.file_size > MAX_PICKLE_BYTES:
            raise ValueError(
                f"{path}: data.pkl is {info.file_size} bytes; a weights file's "
                f"structure is far smaller"
            )
        byteorder = "little"
        if f"{prefix}byteorder" in zf.namelist():
            byteorder = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        unpickler = _WeightsUnpickler(zf.read(info), zf, prefix, path, byteorder, torchscript)
        try:
            obj = unpickler.load()
        except ValueError:
            raise
        except Exception as e:  # malformed pickles fail in many ways; name the file
            raise ValueError(
                f"{path}: cannot read {prefix}data.pkl as weights: {type(e).__name__}: {e}"
            ) from e
    if isinstance(obj, ScriptObject):
        out: dict[str, np.ndarray] = {}
        _tensors(obj, "", out)
        log.info(
            "%s: read %d tensors of TorchScript %s as data (its code was not run)",
            path,
            len(out),
            obj.type_name,
        )
        return out
    return _unwrap(obj)
