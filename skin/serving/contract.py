"""The serving contract: what retrain writes into a published model and predict reads.

A published model version (``<root>/models/<version>/``, written by
:mod:`skin.publishing.retrain`) is self-describing: ``model.keras`` carries the decision
threshold, the image size and the class names (``serving.json`` beside it and
inside the archive). :func:`load_published` finds and loads one from a local
folder, a ``.keras`` file, a ``gs://`` version folder or an experiment's
``LATEST``, always with Keras safe mode; :func:`malignant_probability` reads its output.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skin.data.images import CLASSES
from skin.errors import ConfigError, DocumentError
from skin.infra.artifacts import (
    LATEST,
    METRICS,
    MODEL,
    MODELS,
    SERVING,
    SERVING_ARCHIVE_ENTRY,
)
from skin.infra.documents import ServingDocument
from skin.infra.storage import is_gcs
from skin.serving.scoring import DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

@dataclass(frozen=True)
class ServingInfo:
    """What a caller needs to use the model: how to feed it and how to read it."""

    threshold: float = DEFAULT_THRESHOLD
    image_size: int = 0
    class_names: tuple[str, ...] = CLASSES
    version: str = ""
    source: str = ""  # where the model was loaded from (resolved)
    described: bool = True  # False when no serving description was found (defaults used)
    data_source_kind: str = ""  # what it was trained on: synthetic, folder, zip, gcs ('' unknown)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_document(cls, doc: ServingDocument, **override: Any) -> ServingInfo:
        values = dict(threshold=doc.threshold, image_size=doc.image_size,
                      class_names=doc.class_names, version=doc.version,
                      data_source_kind=str((doc.data_source or {}).get("kind") or ""))
        values.update(override)
        return cls(**values)


def serving_document(threshold: float, image_size: int, version: str,
                     class_names: Sequence[str] = CLASSES,
                     data_source: dict | None = None) -> dict:
    """The serving description retrain writes beside and inside ``model.keras``.

    ``data_source``: what the model was trained on (``{"kind": "synthetic" | "folder" |
    "zip" | "gcs", "dataset", "licence"}``, :func:`skin.data.provenance.serving_entry`):
    ``predict`` and ``evaluate`` warn when it is synthetic.
    """
    return ServingDocument(threshold=float(threshold), image_size=int(image_size),
                           class_names=tuple(class_names), version=version,
                           data_source=data_source).to_json()


def embed_serving(keras_file: Path, doc: dict) -> None:
    """Add the serving description to a ``.keras`` archive (Keras ignores extra entries)."""
    with zipfile.ZipFile(keras_file, "a") as zf:
        if SERVING_ARCHIVE_ENTRY not in zf.namelist():
            zf.writestr(SERVING_ARCHIVE_ENTRY, json.dumps(doc, indent=2))


def _read_serving(keras_file: Path) -> ServingDocument | None:
    """The serving description: inside the archive, else serving.json or metrics.json beside it.
    One of another shape is refused (DocumentError naming it)."""
    try:
        with zipfile.ZipFile(keras_file) as zf:
            if SERVING_ARCHIVE_ENTRY in zf.namelist():
                return ServingDocument.from_json(json.loads(zf.read(SERVING_ARCHIVE_ENTRY)),
                                                 f"{keras_file}!{SERVING_ARCHIVE_ENTRY}")
    except DocumentError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        log.debug("no serving description inside %s: %s", keras_file, e)
    for name in (SERVING, METRICS):
        path = keras_file.parent / name
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except ValueError:
                log.warning("%s is not valid JSON; ignored", path)
                continue
            if isinstance(doc, dict) and "threshold" in doc:
                return ServingDocument.from_json(doc, str(path))
    return None


def _check_version(version: str, where: str) -> str:
    version = version.strip()
    if not _VERSION_RE.match(version):
        raise ConfigError(f"{where}: {version!r} is not a model version")
    return version


def _resolve_local(path: Path) -> Path:
    """The ``model.keras`` a local model path means."""
    if path.is_file():
        if path.name == LATEST:
            return _resolve_local(path.parent / _check_version(path.read_text(), str(path)))
        if path.suffix == ".keras":
            return path
        raise ConfigError(f"--model {path}: not a .keras file, a model folder or LATEST")
    if path.is_dir():
        if (path / MODEL).is_file():
            return path / MODEL
        for latest in (path / LATEST, path / MODELS / LATEST):
            if latest.is_file():
                return _resolve_local(latest)
        if (path / "model" / MODEL).is_file():  # the OUT folder of `skin run`
            return path / "model" / MODEL
        raise ConfigError(f"--model {path}: no published model there (expected {MODEL}, "
                          "LATEST or models/LATEST)")
    raise ConfigError(f"--model {path}: no such file or folder")


def _resolve_remote(uri: str, storage) -> str:
    """The ``gs://…/model.keras`` a remote model URI means."""
    uri = uri.rstrip("/")
    if uri.endswith(".keras"):
        if not storage.exists(uri):
            raise ConfigError(f"--model {uri}: no such object")
        return uri
    parent, _, last = uri.rpartition("/")
    if last == LATEST:
        try:
            version = storage.read_text(uri)
        except FileNotFoundError:
            raise ConfigError(f"--model {uri}: no such object (no model published yet?)") from None
        return f"{parent}/{_check_version(version, uri)}/{MODEL}"
    if storage.exists(f"{uri}/{MODEL}"):
        return f"{uri}/{MODEL}"
    for latest in (f"{uri}/{LATEST}", f"{uri}/{MODELS}/{LATEST}"):
        if storage.exists(latest):
            return _resolve_remote(latest, storage)
    raise ConfigError(f"--model {uri}: no published model there (expected {MODEL}, "
                      "LATEST or models/LATEST)")


def check_model(model_uri: str | os.PathLike, storage=None) -> str:
    """Where the ``model.keras`` that ``model_uri`` means is, without loading it (no
    TensorFlow): a missing model is reported before anything about the data."""
    uri = str(model_uri)
    if is_gcs(uri):
        if storage is None:
            from skin.infra.storage import Storage

            storage = Storage()
        return _resolve_remote(uri, storage)
    return str(_resolve_local(Path(uri).expanduser()))


_warned_synthetic: set[str] = set()


def warn_if_synthetic(info: ServingInfo) -> None:
    """Once per model and process: a model trained on synthetic images says nothing about
    real lesions."""
    if info.data_source_kind == "synthetic" and info.source not in _warned_synthetic:
        _warned_synthetic.add(info.source)
        log.warning("model %s was trained on SYNTHETIC images (data.source: synthetic): its "
                    "scores say nothing about real skin lesions", info.version or info.source)


def load_published(model_uri: str | os.PathLike, storage=None):
    """``(keras.Model, ServingInfo)`` for a published model, loaded in Keras safe mode.

    ``model_uri``: a local version folder (or the OUT folder of ``skin run``),
    a local ``.keras`` file, a ``gs://`` version folder, ``gs://…/models/LATEST``,
    ``gs://…/models`` or an experiment root.
    """
    import keras

    uri = str(model_uri)
    if is_gcs(uri):
        if storage is None:
            from skin.infra.storage import Storage

            storage = Storage()
        keras_uri = _resolve_remote(uri, storage)
        with tempfile.TemporaryDirectory(prefix="skin-model-") as tmp:
            local = Path(tmp) / MODEL
            storage.download_file(keras_uri, str(local))
            folder = keras_uri.rpartition("/")[0]
            for name in (SERVING, METRICS):
                try:
                    storage.download_file(f"{folder}/{name}", str(Path(tmp) / name))
                except FileNotFoundError:
                    pass
            model, info = _load_file(keras, local, source=keras_uri)
    else:
        keras_file = _resolve_local(Path(uri).expanduser())
        model, info = _load_file(keras, keras_file, source=str(keras_file))
    log.info("loaded model %s (version %s, threshold %.4f, image size %d)", info.source,
             info.version or "?", info.threshold, info.image_size)
    warn_if_synthetic(info)
    return model, info


def _load_file(keras, keras_file: Path, *, source: str):
    import skin.model.inference  # noqa: F401 -- registers the skin> layers of a TTA or ensemble model
    try:
        model = keras.models.load_model(str(keras_file), compile=False, safe_mode=True)
    except (ValueError, TypeError, OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"--model {source}: cannot be loaded in safe mode: {e}") from e
    input_size = _model_image_size(model)
    doc = _read_serving(keras_file)
    if doc is None:
        log.warning("%s has no serving description: using threshold %.2f", source,
                    DEFAULT_THRESHOLD)
        info = ServingInfo(image_size=input_size, source=source, described=False)
    else:
        info = ServingInfo.from_document(doc, source=source)
        if not info.image_size:
            info = ServingInfo.from_document(doc, source=source, image_size=input_size)
    if not info.image_size:
        raise ConfigError(f"--model {source}: the image size is unknown (no serving description "
                          "and no fixed input shape)")
    return model, info


def _model_image_size(model) -> int:
    try:
        shape = model.inputs[0].shape
        return int(shape[1]) if shape[1] is not None else 0
    except (AttributeError, IndexError, TypeError):
        return 0


def malignant_probability(model, images: np.ndarray) -> np.ndarray:
    """P(malignant) per image from a sigmoid (one unit) or softmax (two units) output."""
    out = np.asarray(model.predict_on_batch(np.asarray(images, np.float32)), np.float64)
    out = out.reshape(len(images), -1)
    return out[:, 1] if out.shape[1] == 2 else out[:, 0]
