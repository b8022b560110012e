"""Reading a PyTorch checkpoint without PyTorch (``skin weights import``, :mod:`skin.model.weights`).

The checkpoint is read with numpy and a restricted unpickler
(``read_checkpoint``), because a checkpoint is untrusted input and a plain
``pickle.load`` runs whatever code it names. The unpickler allows exactly the
globals a state dict needs: ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``
and the typed storage classes (``torch.FloatStorage`` ...); any other global is refused
with an error naming it, before anything is called. Both of PyTorch's formats are read:

- the legacy stream (PyTorch < 1.6, and the shipped EfficientNet-Lite0 checkpoint): five
  pickles in a row (magic number, protocol version 1001, system info, the state dict,
  the list of storage keys), then each storage's bytes in that order, each preceded by
  its element count (8 bytes, little-endian);
- the zip format (``torch.save`` since 1.6): ``<name>/data.pkl`` and ``<name>/data/<key>``
  for each storage, persistent ids ``('storage', <Type>Storage, key, location, numel)``.

``safetensors`` files (``.safetensors``) are read with the ``safetensors`` package when it
is installed (it parses a JSON header; no code runs).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skin.errors import ConfigError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> element type (little-endian). BFloat16 has no numpy type: its
# 16 bits are the top half of a float32.
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}
class CheckpointError(ConfigError):
    """The checkpoint cannot be read or does not fit (exit 2)."""


@dataclass(frozen=True)
class _Storage:
    """A storage named by a persistent id; its bytes come later (legacy) or from the zip."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    view: tuple[str, int, int] | None = None  # legacy storage views: (root key, offset, size)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """Stands in for ``torch._utils._rebuild_tensor_v2``: records where the tensor lies."""
    view = None
    if isinstance(storage, tuple):  # (storage, view) from a legacy storage view
        storage, view = storage
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"a tensor's storage is {type(storage).__name__}, not a storage")
    return _Tensor(storage, int(storage_offset), tuple(int(s) for s in size),
                   tuple(int(s) for s in stride), view)


class _StorageType:
    """Stands in for ``torch.<Name>Storage`` (only ever a tag in a persistent id)."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __call__(self, *args, **kwargs):
        raise CheckpointError(f"torch.{self.name} is called in the checkpoint; a state dict "
                              "only names storage types")


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2}
_ALLOWED.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})


class _Unpickler(pickle.Unpickler):
    """Allows the globals of a state dict and nothing else."""

    def __init__(self, file, what: str):
        super().__init__(file)
        self.what = what
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise CheckpointError(
                f"{self.what}: refused the global {module}.{name}: a checkpoint may only name "
                "collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch storage "
                "types (a plain pickle.load would run it)")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"{self.what}: unexpected persistent id {_short(pid)}; "
                                  "expected ('storage', type, key, location, numel)")
        _, stype, key, _location, numel, *view = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"{self.what}: storage type {_short(stype)} is not a torch "
                                  "storage type")
        key = str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, stype.dtype, int(numel))
        if view and view[0] is not None:  # legacy: (view key, offset, size)
            view_key, offset, size = view[0]
            return storage, (str(view_key), int(offset), int(size))
        return storage


def read_checkpoint(path: str | os.PathLike) -> collections.OrderedDict[str, np.ndarray]:
    """The state dict of a PyTorch checkpoint (legacy or zip) or a safetensors file, as
    numpy arrays, without running any code from it. Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--from: {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    return _read_legacy(path)


def _read_legacy(path: Path):
    what = str(path)
    with open(path, "rb") as f:
        try:
            magic = _Unpickler(f, what).load()
            if magic != LEGACY_MAGIC:
                raise CheckpointError(f"{what}: not a PyTorch checkpoint (no zip archive, and "
                                      "the legacy format's magic number is missing)")
            protocol = _Unpickler(f, what).load()
            if protocol != LEGACY_PROTOCOL:
                raise CheckpointError(f"{what}: legacy protocol version {protocol!r} is not "
                                      f"supported; expected {LEGACY_PROTOCOL}")
            info = _Unpickler(f, what).load()
            if isinstance(info, dict) and not info.get("little_endian", True):
                raise CheckpointError(f"{what}: a big-endian checkpoint is not supported")
            unpickler = _Unpickler(f, what)
            state = unpickler.load()
            keys = _Unpickler(f, what).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- truncated or not a pickle
            raise CheckpointError(f"{what}: not a readable PyTorch checkpoint ({_short(e)})") from None
        if not isinstance(keys, list):
            raise CheckpointError(f"{what}: the storage key list is {type(keys).__name__}")
        data: dict[str, np.ndarray] = {}
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise CheckpointError(f"{what}: storage {key!r} is listed but no tensor uses it")
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{what}: truncated before storage {key!r}")
            (count,) = struct.unpack("<q", head)
            if count != storage.numel:
                raise CheckpointError(f"{what}: storage {key!r} has {count} elements; its tensors "
                                      f"say {storage.numel}")
            data[storage.key] = _array(f.read(count * _itemsize(storage.dtype)), storage, what)
    return _tensors(state, data, what)


def _read_zip(path: Path):
    what = str(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(f"{what}: a zip without exactly one <name>/data.pkl; not a "
                                      "PyTorch checkpoint")
            root = pkl[0][: -len("data.pkl")]
            unpickler = _Unpickler(io.BytesIO(z.read(pkl[0])), what)
            state = unpickler.load()
            byteorder = root + "byteorder"
            if byteorder in names and z.read(byteorder).strip() != b"little":
                raise CheckpointError(f"{what}: a big-endian checkpoint is not supported")
            data = {}
            for key, storage in unpickler.storages.items():
                member = f"{root}data/{key}"
                if member not in names:
                    raise CheckpointError(f"{what}: storage {key!r} ({member}) is missing")
                data[key] = _array(z.read(member), storage, what)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- corrupt zip or pickle
        raise CheckpointError(f"{what}: not a readable PyTorch checkpoint ({_short(e)})") from None
    return _tensors(state, data, what)


def _read_safetensors(path: Path):
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package "
                              "(pip install safetensors)") from None
    try:
        return collections.OrderedDict(load_file(str(path)))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({_short(e)})") from None


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _array(raw: bytes, storage: _Storage, what: str) -> np.ndarray:
    if len(raw) != storage.numel * _itemsize(storage.dtype):
        raise CheckpointError(f"{what}: storage {storage.key!r} is truncated ({len(raw)} bytes, "
                              f"expected {storage.numel * _itemsize(storage.dtype)})")
    if storage.dtype == "bfloat16":
        bits = np.frombuffer(raw, "<u2").astype("<u4") << 16
        return bits.view("<f4")
    return np.frombuffer(raw, storage.dtype)


def _tensors(state, data: dict[str, np.ndarray], what: str):
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint's weights
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: holds a {type(state).__name__}, not a state dict")
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for name, t in state.items():
        if not isinstance(t, _Tensor):
            raise CheckpointError(f"{what}: {name!r} is a {type(t).__name__}, not a tensor")
        flat = data[t.storage.key]
        if t.view is not None:
            _, offset, size = t.view
            flat = flat[offset: offset + size]
        out[str(name)] = _strided(flat, t, str(name), what)
    return out


def _strided(flat: np.ndarray, t: _Tensor, name: str, what: str) -> np.ndarray:
    if not t.size:
        if t.offset >= len(flat):
            raise CheckpointError(f"{what}: tensor {name!r} lies outside its storage")
        return np.array(flat[t.offset])
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if all(t.size) else 0
    if t.offset < 0 or last >= max(len(flat), 1) or any(s < 0 for s in t.stride):
        raise CheckpointError(f"{what}: tensor {name!r} (size {list(t.size)}, stride "
                              f"{list(t.stride)}, offset {t.offset}) lies outside its storage "
                              f"of {len(flat)} elements")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.size,
                                           strides=tuple(s * item for s in t.stride),
                                           writeable=False)
    return np.array(view)  # a copy: contiguous, owns its memory


def _short(x, limit: int = 200) -> str:
    text = repr(x) if not isinstance(x, BaseException) else f"{type(x).__name__}: {x}"
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
