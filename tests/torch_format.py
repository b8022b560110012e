"""Writes PyTorch checkpoints without PyTorch (tests of skin.model.weights).

``save_zip`` writes ``torch.save``'s zip layout (``archive/data.pkl``, ``archive/data/<key>``,
``archive/version``, ``archive/byteorder``; persistent ids ``('storage', torch.FloatStorage,
key, 'cpu', numel)``); ``save_legacy`` the legacy stream (magic number, protocol 1001, system
info, the state dict, the storage keys, then each storage as an 8-byte element count and its
bytes). The pickles name the same globals torch writes (``torch._utils._rebuild_tensor_v2``,
``torch.<Type>Storage``), through stand-in modules that exist only while pickling.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types
import zipfile
from contextlib import contextmanager

import numpy as np

STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                 np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
                 np.dtype("int32"): "IntStorage", np.dtype("uint8"): "ByteStorage",
                 np.dtype("bool"): "BoolStorage"}


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, np.ascontiguousarray(array).reshape(-1)


@contextmanager
def _fake_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name goes into the pickle
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in set(STORAGE_NAMES.values()):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Tensor:
    def __init__(self, storage: _Storage, shape, rebuild):
        self.storage, self.shape, self.rebuild = storage, tuple(shape), rebuild

    def __reduce__(self):
        stride, acc = [], 1
        for n in reversed(self.shape):
            stride.insert(0, acc)
            acc *= n
        return self.rebuild, (self.storage, 0, self.shape, tuple(stride), False,
                              collections.OrderedDict())


def _pickle_state(state: dict, torch, *, legacy: bool) -> tuple[bytes, list[_Storage]]:
    storages = []
    tensors = collections.OrderedDict()
    for i, (name, value) in enumerate(state.items()):
        array = np.asarray(value)
        storage = _Storage(str(i), array)
        storages.append(storage)
        tensors[name] = _Tensor(storage, array.shape, torch._utils._rebuild_tensor_v2)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                stype = getattr(torch, STORAGE_NAMES[obj.array.dtype])
                pid = ("storage", stype, obj.key, "cpu", obj.array.size)
                return pid + (None,) if legacy else pid
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(tensors)
    return buf.getvalue(), storages


def save_zip(state: dict, path, root: str = "archive") -> None:
    """``state`` (name -> numpy array) in PyTorch's zip format."""
    with _fake_torch() as torch:
        data, storages = _pickle_state(state, torch, legacy=False)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", data)
        z.writestr(f"{root}/byteorder", "little")
        for s in storages:
            z.writestr(f"{root}/data/{s.key}", s.array.tobytes())  # little-endian machines
        z.writestr(f"{root}/version", "3\n")


def save_legacy(state: dict, path) -> None:
    """``state`` in PyTorch's legacy (pre-1.6) stream format."""
    with _fake_torch() as torch:
        data, storages = _pickle_state(state, torch, legacy=True)
    with open(path, "wb") as f:
        for head in (0x1950A86A20F9469CFC6C, 1001,
                     {"protocol_version": 1001, "little_endian": True,
                      "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(head, f, protocol=2)
        f.write(data)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.array.size))
            f.write(s.array.tobytes())


class _Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def malicious_state(func, *args) -> bytes:
    """A pickled 'state dict' whose value is a call of ``func(*args)`` on load."""
    return pickle.dumps(collections.OrderedDict(weight=_Payload(func, *args)), protocol=2)
