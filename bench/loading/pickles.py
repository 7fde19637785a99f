"""Reading PyTorch checkpoints (torch.save files) without running anything from them.

    with open_torch_file("last.ckpt") as ckpt:
        top = ckpt.root                               # dicts, lists, numbers, strings, TensorRefs
        state = ckpt.materialize(top["state_dict"])   # the tensors of this part only

A torch.save file is a pickle, and unpickling calls whatever functions the pickle names: loading
an untrusted checkpoint with torch.load(weights_only=False) runs code from it. Here every name
the pickle asks for is resolved by `find_class` from a fixed table, and nothing is ever imported:

- tensors and storages: the rebuild functions torch.save writes (torch._utils._rebuild_tensor_v2,
  _rebuild_parameter, ...) become TensorRef records of (storage key, dtype, offset, size, stride);
  the bytes are read only by `materialize`, and only for the part of the file asked for (a
  Lightning checkpoint's optimizer state is never read);
- plain containers and values: OrderedDict, set, frozenset, complex, torch.Size, torch dtypes,
  _codecs.encode (protocol-2 pickles write bytes with it), and getattr on a placeholder class
  (protocol-2 pickles name a nested class that way);
- any other name becomes a Placeholder class that records the name. Used as a value (Lightning
  keys its `callbacks` dict by the ModelCheckpoint class) it stays an inert object. Called,
  constructed or given state (REDUCE, NEWOBJ, BUILD), it builds an inert record when the name
  belongs to a training framework whose objects a checkpoint carries (pytorch_lightning,
  omegaconf, numpy, argparse), and is refused with UnsafePickle otherwise: os.system,
  builtins.exec, subprocess.Popen and the like are never looked up, let alone called.

Both formats torch.save writes are read: the zip archive (torch >= 1.6) and the legacy
sequential file (magic number, then pickles, then raw storages). The tar format of torch < 0.4
is refused.
"""
from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BenchError

# Modules whose objects may be constructed as inert placeholders: what training frameworks put
# into checkpoints besides tensors. Anything else called from a pickle is refused.
INERT_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "argparse")

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "double", "float", "half", "long", "int", "short")}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafePickle(BenchError):
    """The pickle asks to call something bench does not run (nothing of it was run)."""


@dataclass(frozen=True, slots=True)
class StorageRef:
    key: str
    dtype: torch.dtype
    numel: int
    location: str


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor of the file, not yet read: `materialize` turns it into a torch.Tensor."""
    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype


class Placeholder:
    """Stands for a global the pickle names and bench never builds. The class records the name;
    an instance (where its module is in INERT_MODULES) records the arguments and state it was
    given, and does nothing else."""
    pickle_name = "?"

    def __new__(cls, *args, **kwargs):
        module = cls.pickle_name.rpartition(".")[0]
        if not any(module == m or module.startswith(m + ".") for m in INERT_MODULES):
            raise UnsafePickle(f"its pickle calls {cls.pickle_name}, which a checkpoint has no reason to do; "
                               f"refused (bench runs nothing from a checkpoint, and ran nothing of this one)")
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self):
        return f"<placeholder {self.pickle_name}>"


def _placeholder(module: str, name: str) -> type:
    qual = f"{module}.{name}"
    return type(f"Placeholder[{qual}]", (Placeholder,), {"pickle_name": qual, "__module__": __name__})


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: torch.dtype


class _TensorType:
    """torch.Tensor or torch.nn.Parameter named by _rebuild_from_type_v2."""

    def __init__(self, name: str):
        self.name = name


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)) and all(type(v) is int for v in value):
        return tuple(value)
    raise UnsafePickle(f"its pickle gives a tensor {what} of {value!r}; expected a tuple of integers")


def _rebuild_tensor(storage, offset, size, stride, *rest):
    """torch._utils._rebuild_tensor[_v2](storage, offset, size, stride[, requires_grad,
    backward_hooks[, metadata]]) -> TensorRef (gradient flags and hooks are dropped: an empty
    hooks dict is all torch.save ever writes)."""
    if not isinstance(storage, StorageRef):
        raise UnsafePickle(f"its pickle rebuilds a tensor from {type(storage).__name__}, not from a stored storage")
    if type(offset) is not int or offset < 0:
        raise UnsafePickle(f"its pickle gives a tensor offset of {offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise UnsafePickle(f"its pickle gives a tensor of size {size} and stride {stride}")
    if len(rest) >= 2 and rest[1]:
        raise UnsafePickle("its pickle attaches backward hooks to a tensor")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise UnsafePickle(f"its pickle puts a tensor of size {size} at offset {offset} in a storage of "
                               f"{storage.numel} elements (out of bounds)")
    return TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise UnsafePickle("its pickle rebuilds a parameter from something other than a tensor")
    if backward_hooks:
        raise UnsafePickle("its pickle attaches backward hooks to a parameter")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func is not _rebuild_tensor and func is not _rebuild_parameter:
        raise UnsafePickle("its pickle rebuilds a tensor subclass with a function other than torch's tensor rebuild")
    if not isinstance(new_type, _TensorType):
        raise UnsafePickle(f"its pickle rebuilds a tensor as {getattr(new_type, 'pickle_name', new_type)!r}")
    return func(*args)


def _size(values=()):
    return torch.Size(_int_tuple(tuple(values), "size"))


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickle(f"its pickle calls _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode(encoding)


def _builtin(kind):
    def build(*args):
        if any(isinstance(a, Placeholder) for a in args):
            raise UnsafePickle(f"its pickle builds a {kind.__name__} from a placeholder object")
        return kind(*args)
    return build


def _getattr(obj, name):
    """builtins.getattr, which protocol-2 pickles call to name a nested class: on placeholder
    classes only, giving the placeholder of the nested name."""
    if isinstance(obj, type) and issubclass(obj, Placeholder) and isinstance(name, str):
        module, _, outer = obj.pickle_name.rpartition(".")
        return _placeholder(module, f"{outer}.{name}")
    raise UnsafePickle(f"its pickle calls builtins.getattr on {type(obj).__name__}")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("torch.nn.parameter.Parameter"),
    ("torch", "Size"): _size,
    ("collections", "OrderedDict"): OrderedDict,
    # protocol-2 pickles name builtins `__builtin__` (Python 2's name)
    **{(module, name): value for module in ("builtins", "__builtin__") for name, value in (
        ("set", _builtin(set)), ("frozenset", _builtin(frozenset)), ("complex", _builtin(complex)),
        ("getattr", _getattr))},
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """find_class from the fixed table (never an import); persistent ids become StorageRefs."""

    def __init__(self, file, storages: dict[str, StorageRef], legacy: bool):
        super().__init__(file, encoding="utf-8")
        self.storages, self.legacy = storages, legacy
        self.placeholders: dict[str, type] = {}

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafePickle(f"its pickle names a global {module!r}.{name!r}")
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        qual = f"{module}.{name}"
        if qual not in self.placeholders:
            self.placeholders[qual] = _placeholder(module, name)
        return self.placeholders[qual]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            kind = pid[0] if isinstance(pid, tuple) and pid else pid
            raise UnsafePickle(f"its pickle refers to a persistent object of kind {kind!r}; only storages are read")
        if self.legacy:
            if len(pid) != 6:
                raise UnsafePickle(f"its pickle has a malformed storage reference {pid!r}")
            _, storage_type, key, location, numel, view = pid
            if view is not None:
                raise BenchError("its pickle uses storage views (a pre-1.0 torch.save feature) that bench does not read")
        else:
            if len(pid) != 5:
                raise UnsafePickle(f"its pickle has a malformed storage reference {pid!r}")
            _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickle(f"its pickle stores data of type {getattr(storage_type, 'pickle_name', storage_type)!r}")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if isinstance(location, bytes):
            location = location.decode("ascii")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise UnsafePickle(f"its pickle has a malformed storage reference {pid!r}")
        dtype = storage_type.dtype  # an UntypedStorage counts bytes, as uint8
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = StorageRef(key, dtype, numel, str(location))
        elif ref.dtype != dtype or ref.numel != numel:
            raise UnsafePickle(f"its pickle reads storage {key} as two different types or sizes")
        return ref


def _unpickle(data: bytes | io.BufferedIOBase, storages: dict, legacy: bool, path) -> Any:
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return _Unpickler(file, storages, legacy).load()
    except BenchError as e:
        raise type(e)(f"checkpoint {path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise BenchError(f"checkpoint {path} is unreadable or truncated (its pickle is corrupt: "
                         f"{type(e).__name__}: {e})") from None


class TorchFile:
    """One torch.save file, unpickled safely; tensors are read on demand by `materialize`."""

    def __init__(self, path):
        self.path = Path(path)
        self.storages: dict[str, StorageRef] = {}
        self._zip: zipfile.ZipFile | None = None
        self._file = None
        self._offsets: dict[str, int] = {}
        self._loaded: dict[str, torch.Tensor] = {}
        self._swap = False
        if not self.path.is_file():
            raise BenchError(f"checkpoint {self.path} not found")
        try:
            with open(self.path, "rb") as f:
                head = f.read(4)
            if head[:2] == b"PK":
                self.root = self._open_zip()
            elif head[:1] == b"\x80":
                self.root = self._open_legacy()
            else:
                raise BenchError(f"checkpoint {self.path} is not a file torch.save writes (neither a zip archive "
                                 f"nor a legacy pickle; the tar format of torch < 0.4 is not read)")
        except BaseException:
            self.close()
            raise

    # -- formats

    def _open_zip(self):
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise BenchError(f"checkpoint {self.path} is unreadable or truncated ({e})") from None
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise BenchError(f"checkpoint {self.path} is a zip archive but not one torch.save writes "
                             f"(expected one <name>/data.pkl, found {len(pickles)})")
        self._prefix = pickles[0][:-len("data.pkl")]
        order = self._read_record("byteorder", optional=True)
        if order not in (None, b"little", b"big"):
            raise BenchError(f"checkpoint {self.path}: unknown byte order {order!r}")
        self._swap = (order or b"little").decode() != sys.byteorder
        return _unpickle(self._read_record("data.pkl"), self.storages, False, self.path)

    def _read_record(self, name: str, optional: bool = False) -> bytes | None:
        full = self._prefix + name
        try:
            return self._zip.read(full)
        except KeyError:
            if optional:
                return None
            raise BenchError(f"checkpoint {self.path} lacks {full} (truncated, or not written by torch.save)") from None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise BenchError(f"checkpoint {self.path} is unreadable or truncated ({full}: {e})") from None

    def _open_legacy(self):
        self._file = open(self.path, "rb")
        f = self._file
        magic = _unpickle(f, {}, True, self.path)
        if magic != _LEGACY_MAGIC:
            raise BenchError(f"checkpoint {self.path} is not a file torch.save writes (bad magic number)")
        protocol = _unpickle(f, {}, True, self.path)
        if protocol != _LEGACY_PROTOCOL:
            raise BenchError(f"checkpoint {self.path}: unknown legacy protocol version {protocol!r}")
        sys_info = _unpickle(f, {}, True, self.path)
        little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
        self._swap = little != (sys.byteorder == "little")
        root = _unpickle(f, self.storages, True, self.path)
        keys = _unpickle(f, {}, True, self.path)
        if not isinstance(keys, list) or set(map(str, keys)) != set(self.storages):
            raise BenchError(f"checkpoint {self.path} is unreadable or truncated (its storage list does not match "
                             f"its pickle)")
        pos = f.tell()
        size = self.path.stat().st_size
        for key in keys:
            ref = self.storages[str(key)]
            f.seek(pos)
            header = f.read(8)
            if len(header) != 8:
                raise BenchError(f"checkpoint {self.path} is truncated (storage {key} missing)")
            (numel,) = struct.unpack("<q", header)
            nbytes = numel * _itemsize(ref.dtype)
            if numel != ref.numel or pos + 8 + nbytes > size:
                raise BenchError(f"checkpoint {self.path} is truncated or corrupt (storage {key}: {numel} elements "
                                 f"stored, {ref.numel} expected)")
            self._offsets[ref.key] = pos + 8
            pos += 8 + nbytes
        return root

    # -- tensors

    def _storage(self, ref: StorageRef) -> torch.Tensor:
        """The storage's elements as a flat tensor (read once)."""
        if ref.key in self._loaded:
            return self._loaded[ref.key]
        nbytes = ref.numel * _itemsize(ref.dtype)
        if self._zip is not None:
            raw = self._read_record(f"data/{ref.key}")
        else:
            self._file.seek(self._offsets[ref.key])
            raw = self._file.read(nbytes)
        if len(raw) != nbytes:
            raise BenchError(f"checkpoint {self.path} is truncated or corrupt (storage {ref.key} holds {len(raw)} "
                             f"bytes, {nbytes} expected)")
        data = np.frombuffer(raw, np.uint8)
        if self._swap and _itemsize(ref.dtype) > 1:
            data = data.reshape(-1, _itemsize(ref.dtype))[:, ::-1]
        flat = torch.from_numpy(data.copy()).view(ref.dtype) if nbytes else torch.empty(0, dtype=ref.dtype)
        self._loaded[ref.key] = flat
        return flat

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        return self._storage(ref.storage).as_strided(ref.size, ref.stride, ref.offset)

    def materialize(self, obj):
        """obj with every TensorRef in it (in dicts, lists, tuples) replaced by its tensor."""
        if isinstance(obj, TensorRef):
            return self.tensor(obj)
        if isinstance(obj, OrderedDict):
            return OrderedDict((k, self.materialize(v)) for k, v in obj.items())
        if isinstance(obj, dict):
            return {k: self.materialize(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.materialize(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.materialize(v) for v in obj)
        return obj

    def close(self):
        for handle in (self._zip, self._file):
            if handle is not None:
                handle.close()
        self._zip = self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def open_torch_file(path) -> TorchFile:
    """A torch.save file opened safely (see the module docstring); use as a context manager."""
    return TorchFile(path)


def load_tensors(path) -> Any:
    """The whole content of a torch.save file with every tensor read (for small files and tests)."""
    with TorchFile(path) as f:
        return f.materialize(f.root)
