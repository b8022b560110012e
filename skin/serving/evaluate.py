"""The two commands on a published model: `skin evaluate` and `skin predict`.

:func:`evaluate` scores a labelled folder (``benign/``, ``malignant/``) with the
published threshold (:mod:`skin.serving.scoring`) and :func:`format_report` prints it (the
rows of :func:`skin.serving.formatting.figure_rows`); :func:`predict` gives P(malignant) and
the label per image and :func:`format_predictions` writes them for a program. Finding
and loading the model is :mod:`skin.serving.contract`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skin.data.images import CLASSES, IMAGE_EXTENSIONS, find_images
from skin.errors import ConfigError, DataError
from skin.infra.storage import is_gcs
from skin.serving.contract import check_model, load_published, malignant_probability
from skin.serving.formatting import figure_rows
from skin.serving.scoring import DEFAULT_THRESHOLD, classification_metrics

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Reading folders of images.

def find_labelled_images(data_dir: Path) -> list[tuple[Path, int]]:
    """``(path, label)`` for every image under ``benign/`` (0) and ``malignant/`` (1)."""
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such folder")
    class_dirs = {p.name.lower(): p for p in sorted(data_dir.iterdir()) if p.is_dir()}
    missing = [c for c in CLASSES if c not in class_dirs]
    if len(missing) == len(CLASSES):
        raise DataError(f"--data {data_dir}: expected folders benign/ and malignant/ "
                        f"(found: {', '.join(sorted(class_dirs)) or 'no folders'})")
    for name in missing:
        log.warning("%s has no %s/ folder: every image is %s", data_dir, name,
                    CLASSES[1 - CLASSES.index(name)])
    labelled = [(path, label) for label, name in enumerate(CLASSES) if name in class_dirs
                for path in find_images(class_dirs[name])]
    if not labelled:
        raise DataError(f"--data {data_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                        "under benign/ or malignant/")
    return labelled


def _load_images_fn():
    from skin.data.dataset import load_images

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
    from skin.serving import clinical

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
    if is_gcs(str(out)):
        if storage is None:
            from skin.infra.storage import Storage

            storage = Storage()
        storage.write_text(str(out), text)
        return
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


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
