"""An optional Keras Applications backbone in place of the searched CNN body.

The experiment's ``backbone`` section (``skin.infra.config.BackboneConfig``):

=============  ==========================================================================
``name``       ``none`` (the from-scratch CNN of ``skin.model.hypermodel``), ``mobilenetv2`` or
               ``efficientnetb0`` (``keras.applications``, without their top), or
               ``efficientnet_lite0`` (``skin.model.lite0``: EfficientNet-Lite0, whose ImageNet
               weights come from a PyTorch checkpoint converted by ``skin weights import``)
``weights``    ``""``: random initialisation (from scratch); ``imagenet``: Keras's ImageNet
               weights, downloaded by Keras (the cluster needs internet access) or found in
               its cache (``$KERAS_HOME/models``; not for ``efficientnet_lite0``);
               ``gs://bucket/path.h5`` or a local path: a weights file for that backbone
               (Keras's own ImageNet file uploaded to a bucket, for clusters without internet
               access, a ``.weights.h5`` saved from the backbone, or one written by
               ``skin weights import``)
``trainable``  fine-tune the backbone with the head (``true``) or train the head alone on
               frozen features (``false``; needs weights)
=============  ==========================================================================

The hyperparameters of the from-scratch body (``BODY_HYPERPARAMETERS``) do not apply to a
backbone and are not searched; the head (pooling, dense units, dropout) and the training
ones are. With pretrained weights the learning-rate choices are lower (fine-tuning) and
the backbone's batch-norm layers are frozen (inference mode: their statistics stay those
the weights were trained with, as in Keras's fine-tuning examples).

Where the weights come from is resolved once per process (``fetch_weights``): a ``gs://``
object is downloaded into a cache folder; a file that is byte for byte Keras's ImageNet
file for EfficientNetB0 (its MD5) is handed to Keras as ``weights="imagenet"`` through
Keras's own cache, because Keras builds that network with one more rescaling layer for
those weights than for any other file. Every failure is a ``ConfigError`` that names
``backbone.weights`` and the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from skin.errors import ConfigError

log = logging.getLogger(__name__)

NAMES: tuple[str, ...] = ("none", "mobilenetv2", "efficientnetb0", "efficientnet_lite0")
# Hyperparameters of skin.model.hypermodel's own CNN body, which a backbone replaces.
BODY_HYPERPARAMETERS: tuple[str, ...] = ("stem", "blocks", "filters", "kernel_size", "block_type",
                                         "batch_norm")
# Keras's ImageNet file (include_top=False) for the backbones whose network differs when
# built for it: name -> (file name in Keras's cache, MD5 Keras checks it against).
IMAGENET_FILES: dict[str, tuple[str, str]] = {
    "efficientnetb0": ("efficientnetb0_notop.h5", "50bc09e76180e00e4465e1a485ddc09d"),
}

# Batch-norm momentum of a randomly initialised backbone (see Backbone.build).
RANDOM_INIT_BN_MOMENTUM = 0.9

_fetch_lock = threading.Lock()
_fetched: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Backbone:
    """A backbone ready to build: ``weights`` is None, ``"imagenet"`` or a local file."""

    name: str
    weights: str | None
    trainable: bool
    source: str = ""  # what backbone.weights said (for messages and the model card)

    @property
    def pretrained(self) -> bool:
        return self.weights is not None

    def build(self, image_size: int):
        """The backbone as a Keras model: float 0..255 ``[S, S, 3]`` in, feature map out."""
        import keras

        shape = (image_size, image_size, 3)
        load_file = self.weights if self.weights not in (None, "imagenet") else None
        weights = None if load_file else self.weights
        try:
            if self.name == "mobilenetv2":
                net = keras.applications.MobileNetV2(input_shape=shape, include_top=False,
                                                     weights=weights)
            elif self.name == "efficientnetb0":
                net = keras.applications.EfficientNetB0(input_shape=shape, include_top=False,
                                                        weights=weights)
            elif self.name == "efficientnet_lite0":
                if weights == "imagenet":
                    raise ConfigError(
                        "backbone.weights: 'imagenet' is not available for efficientnet_lite0; "
                        "convert the PyTorch checkpoint with `skin weights import` and set "
                        "backbone.weights to the file (README.md, Backbones)")
                from skin.model import lite0

                net = lite0.build(image_size)
            else:
                raise ConfigError(f"backbone.name: {self.name!r} is not valid; expected one of "
                                  + ", ".join(repr(n) for n in NAMES[1:]))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 -- Keras's download and file errors
            if self.source == "imagenet":
                raise ConfigError(
                    f"backbone.weights: 'imagenet' for {self.name} cannot be loaded ({_short(e)}); "
                    "without internet access, upload Keras's weights file to a bucket and set "
                    "backbone.weights to its gs:// URI") from None
            raise ConfigError(f"backbone.weights: {self.source!r} cannot be loaded into "
                              f"{self.name}: {_short(e)}") from None
        if load_file is not None:
            try:
                net.load_weights(load_file)
            except Exception as e:  # noqa: BLE001 -- wrong architecture, corrupt file
                raise ConfigError(f"backbone.weights: {self.source!r} does not fit {self.name} "
                                  f"({_short(e)})") from None
        net.trainable = self.trainable
        for layer in net.layers:
            if not isinstance(layer, keras.layers.BatchNormalization):
                continue
            if self.pretrained:
                # Batch norm keeps the statistics the weights were trained with, also while
                # the rest is fine-tuned: a frozen BatchNormalization runs in inference mode.
                # (Calling the network with training=False does not do it in Keras 3: the
                # outer model's training flag replaces it.)
                layer.trainable = False
            else:
                # Random weights: the moving statistics start at mean 0, variance 1, while
                # deep in these networks activations vary by 1e-3 or less; whatever is left of
                # the start when training ends (0.999 ** steps with MobileNetV2's momentum)
                # shrinks every layer's output in inference mode until all images score the
                # same (validation AUC 0.5 through 41 of 60 epochs in BENCHMARKS.md, and with
                # 0.99 too in tests/test_backbone.py). 0.9 (PyTorch's default) forgets the
                # start in ~100 steps.
                layer.momentum = RANDOM_INIT_BN_MOMENTUM
        return net

    def preprocess(self):
        """The layer that maps 0..255 to what the backbone expects (None: it does it itself)."""
        import keras

        if self.name == "mobilenetv2":
            return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="backbone_rescale")
        # EfficientNet rescales and normalises inside; EfficientNet-Lite0 too ((x - 127) / 128,
        # its first layer: skin.model.lite0).
        return None


def fetch_weights(name: str, weights: str, trainable: bool, *, storage=None,
                  cache_dir: str | os.PathLike | None = None) -> Backbone:
    """Resolve ``backbone.weights`` once per process: download a ``gs://`` file into
    ``cache_dir`` (default: a folder under the system's temporary directory), check a local
    one exists. Raises ConfigError naming the problem."""
    weights = (weights or "").strip()
    if not weights:
        return Backbone(name, None, trainable, "")
    if weights == "imagenet":
        return Backbone(name, "imagenet", trainable, weights)
    from skin.infra import storage as st

    if not st.is_gcs(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"backbone.weights: {weights!r} is not a file on this machine; "
                              "expected a gs:// URI, 'imagenet' or a local weights file")
        return _file_backbone(name, str(path), trainable, weights)
    cache = Path(cache_dir) if cache_dir else Path(_default_cache())
    key = (weights, str(cache))
    with _fetch_lock:
        local = _fetched.get(key)
        if local is None or not Path(local).is_file():
            storage = storage or st.Storage()
            bucket, obj = st.split_gcs(weights)
            if not obj or obj.endswith("/"):
                raise ConfigError(f"backbone.weights: {weights!r} names no object; expected "
                                  "gs://bucket/path/to/weights.h5")
            target = cache / hashlib.sha256(weights.encode()).hexdigest()[:16] / Path(obj).name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if not storage.exists(weights):
                    raise ConfigError(f"backbone.weights: {weights!r} does not exist")
                storage.download_file(weights, target)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 -- name the file in the error
                raise ConfigError(f"backbone.weights: {weights!r} cannot be downloaded "
                                  f"({_short(e)})") from None
            log.info("backbone %s: weights %s -> %s (%d bytes)", name, weights, target,
                     target.stat().st_size)
            _fetched[key] = local = str(target)
    return _file_backbone(name, local, trainable, weights)


def _default_cache() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"skin-backbone-{os.getuid()}")


def md5(path: str | os.PathLike) -> str:
    h = hashlib.md5()  # Keras names its files by MD5; not a security use
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_backbone(name: str, path: str, trainable: bool, source: str) -> Backbone:
    """The backbone for a local weights file (decided once, when the file is fetched).

    Keras's own ImageNet file of a backbone listed in IMAGENET_FILES goes into Keras's
    cache under Keras's name (``keras.utils.get_file`` from a ``file://`` origin, which checks
    the MD5), and the network is built with ``weights="imagenet"``, as Keras builds it for
    that file. Any other file is loaded into the network built for random weights.
    """
    known = IMAGENET_FILES.get(name)
    if known is None or md5(path) != known[1]:
        return Backbone(name, path, trainable, source)
    import keras

    file_name, digest = known
    try:
        keras.utils.get_file(file_name, Path(path).resolve().as_uri(), cache_subdir="models",
                             file_hash=digest)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"backbone.weights: {path!r} is Keras's ImageNet file for {name} but "
                          f"cannot be placed in Keras's cache ({_short(e)})") from None
    log.info("backbone %s: %s is Keras's ImageNet file (%s)", name, path, file_name)
    return Backbone(name, "imagenet", trainable, source)


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def clear_cache() -> None:
    """Forget the files fetched by this process (tests)."""
    with _fetch_lock:
        _fetched.clear()
