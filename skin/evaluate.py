"""Use a published model: `skin evaluate` and `skin predict`.

A published model version (``<root>/models/<version>/``, written by
:mod:`skin.retrain`) is self-describing: ``model.keras`` carries the decision
threshold, the image size and the class names (``serving.json`` beside it and
inside the archive). :func:`load_published` finds and loads one from a local
folder, a ``.keras`` file, a ``gs://`` version folder or an experiment's
``LATEST``, always with Keras safe mode.

The metric functions at the top (ROC curve and AUC, confusion matrix,
threshold choice) are plain numpy so they can be checked exactly against
hand-computed values; :mod:`skin.retrain` uses the same ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skin.artifacts import LATEST, METRICS, MODEL, MODELS, SERVING, SERVING_ARCHIVE_ENTRY
from skin.documents import ServingDocument
from skin.errors import ConfigError, DataError, DocumentError

log = logging.getLogger(__name__)

CLASS_NAMES = ("benign", "malignant")  # label 0, label 1 (the positive class)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_THRESHOLD = 0.5
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------
# Metrics: plain numpy, label 1 (malignant) is the positive class, a sample is
# predicted positive when its probability is >= the threshold.

def _as_arrays(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (benign) or 1 (malignant)")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y.astype(np.int64), s


def roc_curve(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: one point per distinct score, highest first.

    The first point is ``(0, 0)`` at threshold ``inf``; the last is ``(1, 1)``
    at the lowest score. Needs both classes present.
    """
    y, s = _as_arrays(labels, scores)
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    if not positives or not negatives:
        raise ValueError("ROC needs both classes among the labels")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last_of_run]
    fp = (last_of_run + 1) - tp
    fpr = np.r_[0.0, fp / negatives]
    tpr = np.r_[0.0, tp / positives]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def roc_auc(labels: Sequence, scores: Sequence) -> float:
    """Area under the ROC curve: P(score of a malignant > score of a benign), ties half.

    NaN when one class is missing (the area is undefined).
    """
    y, s = _as_arrays(labels, scores)
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    if not positives or not negatives:
        return float("nan")
    # Mann-Whitney U from average ranks (ties share their mean rank).
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_s))[0] + 1]
    ends = np.r_[starts[1:], s.size]
    mean_rank = (starts + ends + 1) / 2.0  # ranks are 1-based
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def confusion_matrix(labels: Sequence, scores: Sequence, threshold: float) -> list[list[int]]:
    """``[[tn, fp], [fn, tp]]`` with malignant predicted when score >= threshold."""
    y, s = _as_arrays(labels, scores)
    predicted = s >= threshold
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    fn = int(np.sum(~predicted & (y == 1)))
    tn = int(np.sum(~predicted & (y == 0)))
    return [[tn, fp], [fn, tp]]


def choose_threshold(labels: Sequence, scores: Sequence, target_sensitivity: float) -> float:
    """The highest threshold whose malignant sensitivity is >= ``target_sensitivity``.

    Sensitivity only changes at a malignant score, so the answer is the k-th
    highest malignant score with k = ceil(target x malignant count). With no
    malignant sample there is nothing to keep: :data:`DEFAULT_THRESHOLD`.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity!r}")
    y, s = _as_arrays(labels, scores)
    malignant = np.sort(s[y == 1])[::-1]
    if malignant.size == 0:
        return DEFAULT_THRESHOLD
    # The small slack keeps 0.7 x 10 (7.000000000000001) from asking for 8.
    needed = max(1, math.ceil(target_sensitivity * malignant.size - 1e-9))
    return float(malignant[needed - 1])


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


Z_95 = 1.959963984540054  # two-sided 95 %


def wilson_interval(successes: int, n: int, z: float = Z_95) -> list[float] | None:
    """Wilson score interval of a proportion (95 % by default); None when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0/n and n/n,
    which is where small medical test sets put sensitivity and specificity.
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


INTERVAL_METHODS = {"accuracy": "Wilson", "sensitivity": "Wilson", "specificity": "Wilson",
                    "roc_auc": "DeLong"}


def classification_metrics(labels: Sequence, scores: Sequence, threshold: float, *,
                           extended: bool = True) -> dict:
    """The published figures at ``threshold``. A ratio with nothing to divide by is None.

    ``intervals_95`` holds the Wilson 95 % interval of accuracy, sensitivity and
    specificity and the DeLong interval of the ROC AUC (``interval_methods`` says which):
    with a few hundred test images they are several points wide. ``extended`` adds the
    Brier score, the expected calibration error and the calibration bins
    (:mod:`skin.clinical`).
    """
    from skin import clinical

    y, s = _as_arrays(labels, scores)
    (tn, fp), (fn, tp) = confusion_matrix(y, s, threshold)
    sensitivity = _ratio(tp, tp + fn)
    precision = _ratio(tp, tp + fp)
    auc = roc_auc(y, s)
    f1 = (None if sensitivity is None or precision is None
          else (2 * precision * sensitivity / (precision + sensitivity)
                if precision + sensitivity else 0.0))
    result = {
        "n": int(y.size),
        "n_benign": int(tn + fp),
        "n_malignant": int(tp + fn),
        "accuracy": _ratio(tp + tn, y.size),
        "roc_auc": None if math.isnan(auc) else auc,
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": f1,
        "threshold": float(threshold),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "intervals_95": {
            "accuracy": wilson_interval(tp + tn, int(y.size)),
            "sensitivity": wilson_interval(tp, tp + fn),
            "specificity": wilson_interval(tn, tn + fp),
            "roc_auc": clinical.auc_interval(y, s),
        },
        "interval_methods": dict(INTERVAL_METHODS),
    }
    if extended:
        result.update(clinical.extended_metrics(y, s))
    return result


# ---------------------------------------------------------------------------
# Loading a published model.

@dataclass(frozen=True)
class ServingInfo:
    """What a caller needs to use the model: how to feed it and how to read it."""

    threshold: float = DEFAULT_THRESHOLD
    image_size: int = 0
    class_names: tuple[str, ...] = CLASS_NAMES
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
                     class_names: Sequence[str] = CLASS_NAMES,
                     data_source: dict | None = None) -> dict:
    """The serving description retrain writes beside and inside ``model.keras``.

    ``data_source``: what the model was trained on (``{"kind": "synthetic" | "folder" |
    "zip" | "gcs", "dataset", "licence"}``, :func:`skin.provenance.serving_entry`):
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


def _is_remote(uri: str) -> bool:
    return str(uri).startswith("gs://")


def check_model(model_uri: str | os.PathLike, storage=None) -> str:
    """Where the ``model.keras`` that ``model_uri`` means is, without loading it (no
    TensorFlow): a missing model is reported before anything about the data."""
    uri = str(model_uri)
    if _is_remote(uri):
        if storage is None:
            from skin.storage import Storage

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
    if _is_remote(uri):
        if storage is None:
            from skin.storage import Storage

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
    import skin.model  # noqa: F401 -- registers the skin> layers of a TTA or ensemble model
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


# ---------------------------------------------------------------------------
# Reading folders of images.

def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_images(root: Path) -> list[Path]:
    """Image files below ``root`` (nested folders too), by extension, case-insensitive, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        for name in files:
            if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(folder) / name)
    return sorted(found)


def find_labelled_images(data_dir: Path) -> list[tuple[Path, int]]:
    """``(path, label)`` for every image under ``benign/`` (0) and ``malignant/`` (1)."""
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such folder")
    class_dirs = {p.name.lower(): p for p in sorted(data_dir.iterdir()) if p.is_dir()}
    missing = [c for c in CLASS_NAMES if c not in class_dirs]
    if len(missing) == len(CLASS_NAMES):
        raise DataError(f"--data {data_dir}: expected folders benign/ and malignant/ "
                        f"(found: {', '.join(sorted(class_dirs)) or 'no folders'})")
    for name in missing:
        log.warning("%s has no %s/ folder: every image is %s", data_dir, name,
                    CLASS_NAMES[1 - CLASS_NAMES.index(name)])
    labelled = [(path, label) for label, name in enumerate(CLASS_NAMES) if name in class_dirs
                for path in find_images(class_dirs[name])]
    if not labelled:
        raise DataError(f"--data {data_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                        "under benign/ or malignant/")
    return labelled


def _load_images_fn():
    from skin.data import load_images

    return load_images


def _load_one(path: Path, image_size: int, load_images) -> np.ndarray:
    """One image; if the pipeline's decoder refuses it, retry once through Pillow as RGB PNG."""
    try:
        return _checked(load_images([str(path)], image_size), 1, image_size)[0]
    except Exception as first:  # noqa: BLE001 - any decoder failure means "try the fallback"
        try:
            from PIL import Image

            with Image.open(path) as img:
                rgb = img.convert("RGB")
            with tempfile.TemporaryDirectory(prefix="skin-img-") as tmp:
                png = Path(tmp) / "image.png"
                rgb.save(png)
                x = _checked(load_images([str(png)], image_size), 1, image_size)[0]
            log.info("%s: converted to RGB (%s)", path, _reason(first))
            return x
        except Exception as second:
            raise ValueError(_reason(second) or _reason(first)) from second


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _checked(x, n: int, image_size: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.shape != (n, image_size, image_size, 3):
        raise ValueError(f"loader returned shape {x.shape}, expected {(n, image_size, image_size, 3)}")
    return x


def iter_image_batches(paths: Sequence[Path], image_size: int, batch_size: int,
                       skipped: list[dict]):
    """Yield ``(images, indices)`` batches; unreadable files go to ``skipped`` instead."""
    load_images = _load_images_fn()
    for start in range(0, len(paths), batch_size):
        chunk = list(range(start, min(start + batch_size, len(paths))))
        try:
            yield _checked(load_images([str(paths[i]) for i in chunk], image_size),
                           len(chunk), image_size), chunk
            continue
        except Exception:  # noqa: BLE001 - find the bad file(s) one by one
            pass
        images, kept = [], []
        for i in chunk:
            try:
                images.append(_load_one(paths[i], image_size, load_images))
                kept.append(i)
            except Exception as e:  # noqa: BLE001
                log.info("skipping %s: %s", paths[i], e)
                skipped.append({"path": str(paths[i]), "reason": str(e)})
        if kept:
            yield np.stack(images), kept


# ---------------------------------------------------------------------------
# skin evaluate

def evaluate(model_uri: str | os.PathLike, data_dir: str | os.PathLike,
             out: str | os.PathLike | None = None, *, storage=None, batch_size: int = 32,
             prevalence: float | None = None) -> dict:
    """Metrics of a published model on a labelled folder (``benign/``, ``malignant/``).

    Returns, and writes to ``out`` as JSON when given, at least: n, accuracy,
    roc_auc, sensitivity, specificity, precision, f1, threshold (the published
    one), confusion_matrix ``[[tn, fp], [fn, tp]]``, the intervals, Brier score,
    ECE and calibration bins, and the skipped files. ``prevalence`` adds
    ``at_prevalence``: PPV and NPV at that share of malignant lesions.

    The model is checked before the data (a missing model is named first), and the
    folder before the model is loaded (no TensorFlow start-up for a wrong folder).
    """
    from skin import clinical

    if batch_size < 1:
        raise ConfigError(f"batch_size: {batch_size!r} is not valid; expected >= 1")
    if prevalence is not None:
        prevalence = clinical.check_prevalence(prevalence, "--prevalence")
    check_model(model_uri, storage)
    data_dir = Path(data_dir).expanduser()
    labelled = find_labelled_images(data_dir)
    model, info = load_published(model_uri, storage)
    paths = [p for p, _ in labelled]
    labels = np.array([y for _, y in labelled], np.int64)
    skipped: list[dict] = []
    probabilities = np.full(len(paths), np.nan)
    for images, indices in iter_image_batches(paths, info.image_size, batch_size, skipped):
        probabilities[indices] = malignant_probability(model, images)
    read = ~np.isnan(probabilities)
    if not read.any():
        raise DataError(f"--data {data_dir}: none of the {len(paths)} images could be read")
    if skipped:
        log.warning("%d of %d files could not be read and were skipped", len(skipped), len(paths))
    result = classification_metrics(labels[read], probabilities[read], info.threshold)
    result.update({
        "model": info.source,
        "version": info.version,
        "image_size": info.image_size,
        "data": str(data_dir),
        "files_found": len(paths),
        "skipped": skipped,
        "n_skipped": len(skipped),
        "trained_on": info.data_source_kind or "unknown",
    })
    if prevalence is not None:
        result["at_prevalence"] = clinical.predictive_values(result, prevalence)
    if out is not None:
        _write_json(out, result, storage)
    return result


def _write_json(out: str | os.PathLike, doc: dict, storage=None) -> None:
    text = json.dumps(doc, indent=2) + "\n"
    if _is_remote(str(out)):
        if storage is None:
            from skin.storage import Storage

            storage = Storage()
        storage.write_text(str(out), text)
        return
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def interval_text(metrics: dict, key: str, sep: str = "-") -> str:
    """``metrics``' 95 % interval of ``key`` as "low-high" (3 decimals); "" when it has none."""
    ci = (metrics.get("intervals_95") or {}).get(key)
    return f"{ci[0]:.3f}{sep}{ci[1]:.3f}" if ci else ""


FIGURES = (  # (key, name, what it means): the order every report lists them in
    ("accuracy", "Accuracy", ""),
    ("roc_auc", "ROC AUC", ""),
    ("sensitivity", "Sensitivity", "malignant recall"),
    ("specificity", "Specificity", "benign recall"),
    ("precision", "Precision", "at this set's prevalence"),
    ("f1", "F1", ""),
    ("brier", "Brier score", "0 is perfect; 0.25 is a constant 0.5"),
    ("ece", "ECE", "expected calibration error"),
)


def figure_rows(metrics: dict, *, sep: str = "-", digits: int = 3) -> list[dict]:
    """The figures of :func:`classification_metrics` as rows for any report (the text of
    ``skin evaluate``, the model card, ``report.html``): ``{"key", "name", "value",
    "interval", "method", "note"}``, numbers already formatted. One formatter for all.
    ``at_prevalence`` (PPV, NPV) adds two rows."""
    methods = metrics.get("interval_methods") or {}
    rows = []
    for key, name, note in FIGURES:
        if key not in metrics:
            continue
        if key == "ece" and metrics.get("calibration"):
            note = f"{note}, {metrics['calibration']['bins']} equal-width bins"
        interval = interval_text(metrics, key, sep)
        rows.append({"key": key, "name": name, "value": _fmt(metrics[key], digits),
                     "interval": interval, "method": methods.get(key, "") if interval else "",
                     "note": note})
    pv = metrics.get("at_prevalence")
    if pv:
        for key, name in (("ppv", "PPV"), ("npv", "NPV")):
            interval = interval_text(pv, key, sep)
            rows.append({"key": key, "name": name, "value": _fmt(pv.get(key), digits),
                         "interval": interval,
                         "method": "from the Wilson bounds" if interval else "",
                         "note": f"at a prevalence of {100 * pv['prevalence']:.3g} %"})
    return rows


def format_report(result: dict) -> str:
    """A readable report of :func:`evaluate`'s result (what ``skin evaluate`` prints)."""
    (tn, fp), (fn, tp) = result["confusion_matrix"]
    version = f" (version {result['version']})" if result.get("version") else ""
    lines = [
        f"Model:        {result.get('model', '?')}{version}",
        f"Data:         {result.get('data', '?')}: {result['n']} images "
        f"({result['n_benign']} benign, {result['n_malignant']} malignant)"
        + (f", {result['n_skipped']} unreadable skipped" if result.get("n_skipped") else ""),
        f"Threshold:    {result['threshold']:.4f} (published; malignant when p >= threshold)",
    ]
    if result.get("trained_on") == "synthetic":
        lines.append("Trained on:   SYNTHETIC images: these figures say nothing about real "
                     "lesions")
    lines.append("")
    for row in figure_rows(result):
        line = f"{row['name']:<13} {row['value']}"
        if row["interval"]:
            line += f"   95 % interval {row['interval']} ({row['method']})"
        if row["note"]:
            line += f"   ({row['note']})"
        lines.append(line)
    lines += [
        "",
        "Confusion matrix   predicted benign   predicted malignant",
        f"  benign          {tn:>16d}   {fp:>19d}",
        f"  malignant       {fn:>16d}   {tp:>19d}",
    ]
    skipped = result.get("skipped") or []
    if skipped:
        lines += ["", f"Skipped ({len(skipped)}):"]
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"  ... and {len(skipped) - 20} more (see the JSON)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# skin predict

PREDICTION_FIELDS = ("path", "probability", "label", "threshold", "model_version", "error")
PREDICTION_FORMATS = ("tsv", "csv", "json")


@dataclass(frozen=True)
class Prediction:
    path: str
    probability: float | None  # P(malignant); None when the image could not be read
    label: str | None  # the class at the published threshold
    threshold: float = DEFAULT_THRESHOLD
    error: str | None = None
    model_version: str = ""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in PREDICTION_FIELDS}


def _expand(images: Iterable[str | os.PathLike]) -> list[Path]:
    paths = []
    for item in images:
        path = Path(item).expanduser()
        paths.extend(find_images(path) if path.is_dir() else [path])
    return paths


def predict(model_uri: str | os.PathLike, images: Iterable[str | os.PathLike], *,
            storage=None, batch_size: int = 32) -> list[Prediction]:
    """P(malignant) and the label at the published threshold, one per image (folders expand).

    A missing or unreadable image gives a Prediction with ``error`` set, in its place.
    The model is checked first (a missing model is named before anything else).
    """
    check_model(model_uri, storage)
    paths = _expand(images)
    if not paths:
        raise DataError("no images to predict (give image files or folders of .jpg/.jpeg/.png)")
    model, info = load_published(model_uri, storage)
    errors: dict[int, str] = {}
    readable = []
    for i, p in enumerate(paths):
        if p.is_file():
            readable.append(i)
        else:
            errors[i] = "no such file"
    skipped: list[dict] = []
    probabilities: dict[int, float] = {}
    readable_paths = [paths[i] for i in readable]
    for batch, indices in iter_image_batches(readable_paths, info.image_size, batch_size, skipped):
        for j, p in zip(indices, malignant_probability(model, batch)):
            probabilities[readable[j]] = float(p)
    by_path = {s["path"]: s["reason"] for s in skipped}
    predictions = []
    for i, path in enumerate(paths):
        if i in probabilities:
            p = probabilities[i]
            label = info.class_names[1] if p >= info.threshold else info.class_names[0]
            predictions.append(Prediction(str(path), p, label, info.threshold,
                                          model_version=info.version))
        else:
            reason = errors.get(i) or by_path.get(str(path), "unreadable")
            predictions.append(Prediction(str(path), None, None, info.threshold, reason,
                                          model_version=info.version))
    return predictions


def format_predictions(predictions: Sequence[Prediction], fmt: str = "tsv") -> str:
    """The predictions for a program to read: ``tsv`` or ``csv`` with a header line
    (:data:`PREDICTION_FIELDS`), or ``json``, an array of one object per image with the
    same fields. An image that could not be scored has an empty probability and label
    and its reason in ``error``."""
    if fmt == "json":
        return json.dumps([p.to_dict() for p in predictions], indent=1)
    if fmt not in ("tsv", "csv"):
        raise ConfigError(f"--format: {fmt!r} is not valid; expected one of "
                          f"{', '.join(PREDICTION_FORMATS)}")
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    writer.writerow(PREDICTION_FIELDS)
    for p in predictions:
        writer.writerow([p.path, "" if p.probability is None else f"{p.probability:.6f}",
                         p.label or "", f"{p.threshold:.6f}", p.model_version, p.error or ""])
    return buf.getvalue().rstrip("\n")
