"""PyTorch `pytorch_model.bin` state dicts, read without torch.

`torch.save` (torch >= 1.6) writes a zip archive:

* `<archive>/data.pkl`: a pickle of the state dict, in which every tensor is a call
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` (or
  `_rebuild_tensor_v3(..., dtype)` for dtypes without a legacy storage class, such as uint16), and
  every storage a persistent id `("storage", torch.FloatStorage, key, location, numel)`;
* `<archive>/data/<key>`: the raw bytes of each storage, stored uncompressed;
* `<archive>/byteorder`: "little" or "big" (absent in old files, which are little-endian).

Unpickling runs code that the file chooses, so this reader resolves only the globals a flat state
dict of tensors needs (`_ALLOWED`) to harmless stand-ins of its own, and refuses every other
global before anything is called. Tensors are rebuilt as NumPy views of their storage
(`as_strided`, bounds-checked) and copied, so each array is C-contiguous and owns its memory.
bfloat16 and float8 tensors become `ml_dtypes` arrays, bit for bit.

The legacy format (torch < 1.6: consecutive pickles, no zip) is not read here; `is_legacy_format`
tells it apart, so that a caller with torch installed can hand it to `torch.load`.
"""

from __future__ import annotations

import collections
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from free_jax.errors import CheckpointError

# torch.save's legacy format starts with this number, pickled (protocol 2: LONG1 of 10 bytes).
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# A tensor whose elements overlap (a broadcast) is copied out in full only up to this size.
_MAX_EXPANSION = 1 << 30

# The legacy `torch.<Name>Storage` classes a typed storage is pickled as.
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}

# `torch.<dtype>` names, which `_rebuild_tensor_v3` receives next to an untyped (byte) storage.
_TORCH_DTYPES: dict[str, Any] = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}


class _Refused(CheckpointError):
    """A pickle that asks for more than rebuilding tensors; raised before anything runs."""


class _StandIn:
    """Base of what `find_class` hands out: no attributes a pickle's BUILD opcode could set."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"the pickle tries to set the state of {self!r}; refusing to unpickle.")


class _StorageType(_StandIn):
    """`torch.FloatStorage` & co. (and `torch.UntypedStorage`, bytes): only names a dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: Any):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", np.dtype(dtype))

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _DType(_StorageType):
    """`torch.float32` & co., as `_rebuild_tensor_v3` receives them: a name and a dtype too."""

    __slots__ = ()


class _Rebuild(_StandIn):
    """A `torch._utils._rebuild_*` function, carried out by `_Reader.<method>` instead."""

    __slots__ = ("name", "method")

    def __init__(self, name: str, method: Any):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "method", method)

    def __call__(self, *args: Any) -> Any:
        return self.method(*args)

    def __repr__(self) -> str:
        return f"torch._utils.{self.name}"


class _Storage:
    """A storage record of the archive: its bytes (not yet copied) and the dtype it holds."""

    __slots__ = ("key", "dtype", "data")

    def __init__(self, key: str, dtype: np.dtype, data: np.ndarray):
        self.key, self.dtype, self.data = key, dtype, data

    def __setstate__(self, state: Any) -> None:
        raise _Refused("the pickle tries to set the state of a storage; refusing to unpickle.")

    def __repr__(self) -> str:
        return f"storage {self.key!r}"


ALLOWED_GLOBALS = (
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch.<Type>Storage",
    "torch.storage.UntypedStorage",
    "torch.<dtype>",
)


def is_legacy_format(file: Path) -> bool:
    """Whether `file` was written in torch's legacy (pre-1.6, non-zip) `torch.save` format."""
    with open(file, "rb") as f:
        head = f.read(64)
    return not zipfile.is_zipfile(file) and _LEGACY_MAGIC in head[:16]


def read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    """Reads a `torch.save`d flat state dict (name -> tensor) as NumPy arrays, without torch.

    Tensors that are the same view of one storage (a tied `lm_head.weight` saved next to
    `shared.weight`) come back as one array, as `torch.load` would share their memory.

    Raises:
      CheckpointError: the file is not a torch.save zip archive (the legacy format is named as
        such), its pickle references a global other than those that rebuild tensors, a tensor lies
        outside its storage, or an entry is not a tensor.
    """
    file = Path(file)
    if not zipfile.is_zipfile(file):
        if is_legacy_format(file):
            raise CheckpointError(
                f"{file} is in PyTorch's legacy serialization format (torch < 1.6, not a zip "
                f"archive), which free_jax reads only through torch: install torch (pip install "
                f"torch), or convert the checkpoint to safetensors (or re-save it with a torch "
                f">= 1.6)."
            )
        raise CheckpointError(
            f"cannot read weights file {file}: not a PyTorch checkpoint written by torch.save "
            f"(neither a zip archive nor torch's legacy pickle format)."
        )
    try:
        with zipfile.ZipFile(file) as archive:
            state = _Reader(file, archive).load()
    except _Refused as e:
        if str(file) in str(e):
            raise
        raise _Refused(f"{file}: {e}") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle or zip fails in many ways
        raise CheckpointError(f"cannot read weights file {file}: {e!r}.") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{file} holds a {type(state).__name__}; expected a state dict (tensor name -> tensor)."
        )
    out = {}
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{file}: entry {name!r} is named by a non-string.")
        if not isinstance(tensor, np.ndarray):
            raise CheckpointError(
                f"{file}: entry {name!r} is not a tensor but a {type(tensor).__name__}; expected a "
                f"flat state dict (a training checkpoint must be reduced to its model weights)."
            )
        out[name] = tensor
    return out


class _Reader:
    """One archive: resolves its storages and unpickles `data.pkl` with the restricted globals."""

    def __init__(self, file: Path, archive: zipfile.ZipFile):
        self.file = file
        self.archive = archive
        names = archive.namelist()
        # As torch does: the archive's folder is the folder of its first record.
        prefix = names[0].split("/", 1)[0] if names and "/" in names[0] else ""
        if f"{prefix}/data.pkl" not in names:
            pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
                raise CheckpointError(
                    f"cannot read weights file {file}: a zip archive, but not one written by "
                    f"torch.save (no <archive>/data.pkl; it holds {shown})."
                )
            prefix = pickles[0].split("/", 1)[0]
        self.prefix = prefix
        byteorder = "little"  # what torch assumes for archives without a byteorder record
        if f"{prefix}/byteorder" in names:
            byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(
                    f"{file}: byteorder record says {byteorder!r}; expected 'little' or 'big'."
                )
        self.swap = byteorder != sys.byteorder
        self.records: dict[str, np.ndarray] = {}  # storage key -> its bytes
        self.tensors: dict[tuple, np.ndarray] = {}  # (key, dtype, offset, size, stride) -> array
        self.mapped: np.ndarray | None = None

        rebuilds = {
            "_rebuild_tensor_v2": self.rebuild_tensor_v2,
            "_rebuild_tensor_v3": self.rebuild_tensor_v3,
            "_rebuild_parameter": self.rebuild_parameter,
        }
        self.globals: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            **{("torch._utils", n): _Rebuild(n, m) for n, m in rebuilds.items()},
            **{("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()},
            ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
            ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
            **{("torch", n): _DType(n, d) for n, d in _TORCH_DTYPES.items()},
        }

    def load(self) -> Any:
        reader = self

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                return reader.find_class(module, name)

            def persistent_load(self, pid: Any) -> Any:
                return reader.persistent_load(pid)

        with self.archive.open(f"{self.prefix}/data.pkl") as f:
            try:
                return Unpickler(f).load()
            finally:
                self.records.clear()
                self.mapped = None

    # ---------------------------------------------------------------- pickle hooks

    def find_class(self, module: str, name: str) -> Any:
        found = self.globals.get((module, name))
        if found is None:
            raise _Refused(
                f"{self.file}: `{module}.{name}`: not a tensor-rebuilding global; refusing to "
                f"unpickle (without torch, free_jax reads only flat state dicts of tensors, whose "
                f"pickles reference only {', '.join(ALLOWED_GLOBALS)})."
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and type(pid[1]) is _StorageType  # not a _DType
            and isinstance(pid[2], str)
            and _is_index(pid[4])
        ):
            raise _Refused(
                f"{self.file}: persistent id {pid!r:.200} is not a storage reference "
                f"('storage', torch.<Type>Storage, key, location, numel); refusing to unpickle."
            )
        _, storage_type, key, _location, numel = pid
        data = self.record(key)
        dtype = storage_type.dtype
        if data.size != numel * dtype.itemsize:
            raise CheckpointError(
                f"{self.file}: storage {key!r} should hold {numel} {dtype} values "
                f"({numel * dtype.itemsize} bytes), but its record holds {data.size} bytes."
            )
        return _Storage(key, dtype, data)

    # ---------------------------------------------------------------- tensors

    def rebuild_tensor_v2(
        self, storage, offset, size, stride, requires_grad, hooks, metadata=None
    ) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise _Refused(f"{self.file}: a tensor is rebuilt from {storage!r}, not a storage.")
        return self.tensor(storage, storage.dtype, offset, size, stride, metadata)

    def rebuild_tensor_v3(
        self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None
    ) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise _Refused(f"{self.file}: a tensor is rebuilt from {storage!r}, not a storage.")
        if not isinstance(dtype, _DType):
            raise _Refused(f"{self.file}: a tensor is rebuilt with dtype {dtype!r:.100}.")
        return self.tensor(storage, dtype.dtype, offset, size, stride, metadata)

    def rebuild_parameter(self, data, requires_grad, hooks) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise _Refused(f"{self.file}: a parameter is rebuilt from {data!r:.100}.")
        return data

    def tensor(self, storage, dtype, offset, size, stride, metadata) -> np.ndarray:
        where = f"{self.file}: tensor in storage {storage.key!r}"
        if metadata:
            # Only the conjugate and negative bits of complex views are recorded here.
            raise CheckpointError(f"{where} has tensor metadata {metadata!r:.100}; not supported.")
        if not (
            _is_index(offset)
            and isinstance(size, tuple | list)
            and isinstance(stride, tuple | list)
            and len(size) == len(stride)
            and all(map(_is_index, size))
            and all(map(_is_index, stride))
        ):
            raise CheckpointError(
                f"{where} has an invalid layout (offset {offset!r:.50}, size {size!r:.100}, "
                f"stride {stride!r:.100}); expected non-negative integers, as many strides as "
                f"dimensions."
            )
        size, stride = tuple(size), tuple(stride)
        cache_key = (storage.key, dtype, offset, size, stride)
        if cache_key in self.tensors:
            return self.tensors[cache_key]
        data = storage.data
        if data.size % dtype.itemsize:
            raise CheckpointError(
                f"{where}: {data.size} bytes are not a whole number of {dtype} values."
            )
        numel = data.size // dtype.itemsize
        if 0 in size:
            out = np.zeros(size, dtype)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
            if last >= numel:
                raise CheckpointError(
                    f"{where} (offset {offset}, size {size}, stride {stride}) reaches element "
                    f"{last}, past the storage's {numel} {dtype} values."
                )
            count = int(np.prod(size, dtype=object))
            if count > numel and count * dtype.itemsize > _MAX_EXPANSION:
                # Overlapping elements (stride 0, a broadcast): torch.load makes a view of these,
                # a copy could be any size, so that a tiny file cannot ask for terabytes.
                raise CheckpointError(
                    f"{where} (size {size}, stride {stride}) repeats its storage's {numel} values "
                    f"as {count}; refusing to expand it beyond {_MAX_EXPANSION >> 20} MiB."
                )
            values = data.view(dtype)[offset:]
            view = np.lib.stride_tricks.as_strided(
                values,
                shape=size,
                strides=tuple(s * dtype.itemsize for s in stride),
                writeable=False,
            )
            out = view.copy(order="C")
            if self.swap:
                out.byteswap(inplace=True)
        self.tensors[cache_key] = out
        return out

    # ---------------------------------------------------------------- records

    def record(self, key: str) -> np.ndarray:
        """The bytes of storage record `key` (memory-mapped when stored uncompressed)."""
        if key in self.records:
            return self.records[key]
        name = f"{self.prefix}/data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise CheckpointError(
                f"{self.file}: the pickle references storage {key!r}, but the archive has no "
                f"record {name!r}."
            ) from None
        data = self.mapped_record(info)
        if data is None:
            data = np.frombuffer(self.archive.read(name), np.uint8)
        self.records[key] = data
        return data

    def mapped_record(self, info: zipfile.ZipInfo) -> np.ndarray | None:
        # torch stores records uncompressed, so they can be read in place instead of copied once
        # more; anything else (compressed, encrypted, unmappable) is read through zipfile.
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1 or not info.file_size:
            return None
        try:
            if self.mapped is None:
                self.mapped = np.memmap(self.file, dtype=np.uint8, mode="r")
            with open(self.file, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
        except (OSError, ValueError):
            return None
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            return None
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        if start + info.file_size > self.mapped.size:
            return None
        return self.mapped[start : start + info.file_size]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
