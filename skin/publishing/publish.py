"""Publishing a version: ``<root>/models/<version>/`` and ``LATEST``, written last.

Two retrains may race (a retried Job beside a manual run): :func:`new_version` claims the
version name by creating its ``metrics.json`` only if absent (a placeholder until the
real one is uploaded), so no two retrains share a folder, and :func:`move_latest` writes
``LATEST`` with a precondition on the generation :func:`read_latest` saw when the retrain
started: the one that loses keeps its complete version, leaves ``LATEST`` naming the other
and raises ``PublishRaceLostError`` (exit 7). :func:`write_version` writes every file of a
version into a local folder: ``model.keras`` with its serving description embedded,
``serving.json``, the SavedModel (:func:`export_saved_model`), ``metrics.json``, the
plots (:mod:`skin.publishing.plots`), the model card (:mod:`skin.publishing.model_card`) and the run report
(:mod:`skin.publishing.report`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from pathlib import Path

import keras

from skin.errors import PreconditionFailedError, PublishRaceLostError
from skin.infra import artifacts, documents
from skin.infra.storage import join
from skin.publishing.model_card import model_card
from skin.publishing.plots import (
    plot_confusion_matrix,
    plot_learning_curves,
    plot_reliability,
    plot_roc,
)
from skin.serving.contract import embed_serving

log = logging.getLogger(__name__)

VERSION_FORMAT = "%Y%m%d-%H%M%S"


def new_version(storage, models_uri: str) -> str:
    """A UTC timestamp no published version uses yet, claimed for this retrain: its
    ``metrics.json`` created only if absent (the upload replaces the placeholder)."""
    while True:
        version = _dt.datetime.now(_dt.UTC).strftime(VERSION_FORMAT)
        if not storage.list(join(models_uri, version) + "/"):
            try:
                storage.write_json(join(models_uri, version, artifacts.METRICS),
                                   {"version": version, "publishing": True},
                                   if_generation_match=0)
                return version
            except PreconditionFailedError:
                log.info("version %s was just claimed by another retrain; taking the next",
                         version)
        time.sleep(1.05)


def read_latest(storage, models_uri: str) -> tuple[str | None, int]:
    """(the version LATEST names, its generation); (None, 0) when nothing is published."""
    try:
        data, generation = storage.read_versioned(join(models_uri, artifacts.LATEST))
    except FileNotFoundError:
        return None, 0
    return data.decode("utf-8", errors="replace").strip() or None, generation


def move_latest(storage, models_uri: str, version: str, seen: tuple[str | None, int]) -> None:
    """Point LATEST at ``version`` unless another retrain moved it since we read ``seen``."""
    latest = join(models_uri, artifacts.LATEST)
    try:
        storage.write_text(latest, version + "\n", if_generation_match=seen[1])
    except PreconditionFailedError:
        other, _ = read_latest(storage, models_uri)
        raise PublishRaceLostError(
            f"another retrain published {other} while this one ran (LATEST named "
            f"{seen[0] or 'nothing'} when it started): LATEST stays on {other}. This retrain's "
            f"version {version} is complete at {join(models_uri, version)}; to serve it "
            f"instead, write {version!r} into {latest}") from None


def render_report(result: documents.SearchResult | None, out_dir: Path,
                   metrics: dict | None = None, published: dict | None = None) -> None:
    """``report.html``: the published model's figures and plots (``metrics`` and the PNGs
    in ``out_dir``), then the search (``result``), when there is either."""
    if result is None and metrics is None:
        log.info("no search result in the bucket: no run report")
        return
    from skin.publishing.report import (
        render_search_report,  # matplotlib: loaded when a report is drawn
    )

    try:
        render_search_report(result, out_dir, metrics=metrics, published=published)
    except Exception:  # the report is a by-product; the model is published anyway
        log.exception("the run report failed; publishing without it")


def export_saved_model(model, path: Path, image_size: int) -> None:
    """A SavedModel whose ``serve`` endpoint is the inference pass.

    ``model.export`` traces ``model.__call__`` without ``training=False``, and
    Keras' random preprocessing layers default to ``training=True``: the export
    would flip, rotate and jitter every image it serves. So the endpoint is
    declared here, with ``training=False``.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serve", fn=lambda images: model(images, training=False),
        input_signature=[keras.InputSpec(shape=(None, image_size, image_size, 3),
                                         dtype="float32")])
    archive.write_out(str(path), verbose=False)


def write_version(local_dir: Path, model, metrics: dict, serving: dict, exp, best: dict,
                   manifest: dict, result: documents.SearchResult | None,
                   published: dict | None, *, curves: dict, points: dict) -> None:
    """Every file of a version, in a local folder."""
    keras_file = local_dir / artifacts.MODEL
    model.save(keras_file)
    embed_serving(keras_file, serving)
    (local_dir / artifacts.SERVING).write_text(json.dumps(serving, indent=2) + "\n")
    export_saved_model(model, local_dir / artifacts.SAVED_MODEL, metrics["image_size"])
    (local_dir / artifacts.METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    plot_learning_curves(metrics["training"]["history"], metrics["training"]["published_epoch"],
                         local_dir / artifacts.LEARNING_CURVES_PNG)
    plot_roc(curves, points, local_dir / artifacts.ROC_PNG)
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["evaluated_on"],
                          metrics["threshold"], local_dir / artifacts.CONFUSION_PNG)
    plot_reliability(points, local_dir / artifacts.RELIABILITY_PNG)
    (local_dir / artifacts.MODEL_CARD).write_text(model_card(exp, metrics["version"], metrics, best,
                                                        manifest))
    render_report(result, local_dir, metrics, published)
