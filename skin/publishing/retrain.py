"""Retrain the best configuration and publish it.

``retrain(ctx)`` (a skin.context.RoleContext): the search's best hyperparameters →
a final model trained on the train split, early-stopped on validation →
the decision threshold chosen on validation (the highest one that keeps
malignant sensitivity >= ``retrain.target_sensitivity``) → evaluation on the
test split when one was staged, else on validation → publication to
``<root>/models/<version>/`` and, written last, ``<root>/models/LATEST``.

Two retrains may race (a retried Job beside a manual run): the version name is
claimed by creating its ``metrics.json`` only if absent (a placeholder until the
real one is uploaded), so no two retrains share a folder, and ``LATEST`` is
written with a precondition on the generation this retrain read when it
started. The one that loses keeps its complete version in the bucket, leaves
``LATEST`` naming the other, says so and exits 7 (``PublishRaceLostError``;
:mod:`skin.publishing.publish`).

No decision looks at the test split: early stopping, the restored epoch and
the threshold all use validation only.

Before anything is downloaded or trained, every configuration about to be
retrained is checked against the experiment's search space and ``search.fixed``
(:func:`skin.publishing.training.check_members`): the bucket's ``best_hyperparameters.json`` is data, and
a value the search could not have issued exits 2 with nothing published.

``retrain.ensemble: N`` (> 1) retrains the N best completed trials of the search
with distinct hyperparameters (:func:`skin.publishing.training.top_trials` over ``tuner/result.json``; the best
trial first; fewer when fewer exist) and publishes one model, the mean of their
outputs. ``retrain.tta`` makes the published model average P(malignant) over the 8
dihedral views of the image (``skin.model.inference.inference_model``). Either way the
threshold is chosen on the published model's own validation outputs, and
``metrics.json``, the model card and the run report list the members with their
validation ROC AUC beside the published model's.

A published version holds ``model.keras`` (self-describing: the serving
description is inside the archive and in ``serving.json`` beside it),
``saved_model/`` (``model.export``), ``metrics.json``, ``learning_curves.png``,
``roc.png``, ``confusion_matrix.png``, ``reliability.png``, ``model_card.md`` and
``report.html``, the run report (:mod:`skin.publishing.report`: the model's figures, then the search).

The card, the run report and ``metrics.json`` carry the 95 % intervals (Wilson; DeLong for
the ROC AUC), the Brier score and calibration (:mod:`skin.serving.clinical`), PPV and NPV at
``retrain.reference_prevalence``, the operating points for other target sensitivities,
and the data's provenance and licence as the stage found them (:mod:`skin.data.provenance`;
``serving.json`` carries the source kind, so predict/evaluate warn on a synthetic model).

This module is the role's orchestration; the work is done by :mod:`skin.publishing.training` (the
members), :mod:`skin.serving.scoring` (threshold and figures), :mod:`skin.publishing.publish` (the version
folder and ``LATEST``), :mod:`skin.publishing.plots` and :mod:`skin.publishing.model_card`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from skin.data import provenance
from skin.data.images import CLASSES
from skin.errors import SearchFailedError
from skin.infra import documents
from skin.infra.storage import join
from skin.publishing import publish, training
from skin.serving import clinical
from skin.serving.contract import serving_document
from skin.serving.formatting import fmt
from skin.serving.scoring import choose_threshold, classification_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    version: str
    uri: str  # <root>/models/<version>
    metrics: dict
    local_dir: Path  # the same files on local disk (runtime.work_dir/published/<version>)


def _split_count(manifest: dict, split: str) -> int:
    try:
        return int(manifest["splits"][split]["count"])
    except (KeyError, TypeError, ValueError):
        return 0


def _load_result(storage, exp) -> documents.SearchResult | None:
    try:
        return documents.read_result(storage, exp)
    except FileNotFoundError:
        return None
    except ValueError as e:  # not JSON, or a DocumentError: only the report needs it
        log.warning("search result unreadable, no run report: %s", e)
        return None


def _load_best(storage, exp) -> dict:
    from skin.tuning import load_best

    try:
        return load_best(storage, exp).to_json()  # a member spec: the best's keys (top_trials)
    except FileNotFoundError as e:
        raise SearchFailedError(f"no best hyperparameters at {exp.tuner_uri}: the search has not "
                                f"finished ({e})") from None


def retrain(ctx, *, best: dict | None = None) -> Published:
    """Retrain the best configuration, choose the threshold, evaluate, publish. See module doc.
    ``ctx``: the role's skin.context.RoleContext."""
    from skin.data import dataset as skin_data

    exp, runtime, storage = ctx.exp, ctx.runtime, ctx.storage
    latest_seen = publish.read_latest(storage, exp.models_uri)  # LATEST moves only from here
    best = dict(best) if best is not None else _load_best(storage, exp)
    result = _load_result(storage, exp)
    hypermodel = ctx.hypermodel()
    specs = training.members_to_retrain(exp, best, result)
    # Before any download or training: exit 2 on a mismatch.
    training.check_members(exp, hypermodel, specs)
    data_dir = Path(skin_data.sync_data(storage, exp.data_uri, Path(runtime.work_dir) / "data"))
    manifest = skin_data.load_manifest(data_dir)
    size = exp.data.image_size

    from skin.model.inference import DIHEDRAL_VIEWS, inference_model

    tta = exp.retrain.tta
    trained, members = [], []
    for i, spec in enumerate(specs):
        if len(specs) > 1:
            log.info("ensemble member %d/%d: trial %s", i + 1, len(specs), spec.get("trial_id"))
        member, member_training = training.train(exp, hypermodel, spec, data_dir,
                                        seed=exp.data.seed + i)
        entry = {"trial_id": spec.get("trial_id"), "score": spec.get("score"),
                 "objective": spec.get("objective"), "epochs": spec.get("epochs"),
                 "hyperparameters": spec.get("hyperparameters") or {},
                 "validation_auc": None,
                 "training": {k: v for k, v in member_training.items() if k != "history"}}
        if len(specs) > 1 or tta:  # one plain member is the published model: no second pass
            labels, probs = training.split_predictions(member, data_dir, "validation", size)
            entry["validation_auc"] = training.validation_auc(labels, probs)
        if tta and len(specs) > 1:
            _, tta_probs = training.split_predictions(inference_model([member], tta=True),
                                                      data_dir, "validation", size)
            entry["validation_auc_tta"] = training.validation_auc(labels, tta_probs)
        trained.append((member, member_training))
        members.append(entry)
    first_training = trained[0][1]  # the published member's (the first, the best)
    # The published model: the member itself, or the mean over members (and views).
    model = inference_model([m for m, _ in trained], tta=tta)

    val_labels, val_probs = training.split_predictions(model, data_dir, "validation", size)
    target = exp.retrain.target_sensitivity
    threshold = choose_threshold(val_labels, val_probs, target)
    if not val_labels.any():
        log.warning("no malignant image in validation: threshold %.2f", threshold)
    validation = classification_metrics(val_labels, val_probs, threshold)
    log.info("threshold %.4f keeps validation sensitivity %.3f (target %.2f)", threshold,
             validation["sensitivity"] or 0.0, target)
    if len(members) == 1:
        members[0]["validation_auc_tta" if tta else "validation_auc"] = validation["roc_auc"]
    if len(members) > 1 or tta:
        log.info("validation ROC AUC: published %s; members %s", fmt(validation["roc_auc"], 4, style='auto'),
                 ", ".join(f"{m['trial_id']} {fmt(m['validation_auc'], 4, style='auto')}"
                           + (f" (TTA {fmt(m['validation_auc_tta'], 4, style='auto')})" if tta else "")
                           for m in members))

    evaluated_on = "test" if _split_count(manifest, "test") > 0 else "validation"
    if evaluated_on == "test":
        eval_labels, eval_probs = training.split_predictions(model, data_dir, "test", size)
    else:
        log.warning("no test split was staged: evaluating on validation (optimistic)")
        eval_labels, eval_probs = val_labels, val_probs
    evaluation = classification_metrics(eval_labels, eval_probs, threshold)
    prevalence = exp.retrain.reference_prevalence
    evaluation["at_prevalence"] = clinical.predictive_values(evaluation, prevalence)
    operating = clinical.operating_points(val_labels, val_probs, eval_labels, eval_probs,
                                          prevalence=prevalence)
    source_doc = provenance.of_manifest(manifest, exp.data.licence) or {}
    test_doc = provenance.of_manifest(manifest, exp.data.licence, "test_source")
    if source_doc.get("kind") == provenance.SYNTHETIC:
        log.warning("trained on SYNTHETIC images: the published model says nothing about real "
                    "lesions (its serving.json says so, and predict/evaluate warn)")

    version = publish.new_version(storage, exp.models_uri)
    uri = join(exp.models_uri, version)
    local_dir = Path(runtime.work_dir) / "published" / version
    if local_dir.exists():
        shutil.rmtree(local_dir)
    local_dir.mkdir(parents=True)

    serving = serving_document(threshold, size, version,
                               data_source=provenance.serving_entry(source_doc))
    metrics = {
        **evaluation,
        "evaluated_on": evaluated_on,
        "target_sensitivity": target,
        "validation": validation,
        "version": version,
        "uri": uri,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "image_size": size,
        "class_names": list(CLASSES),
        "serving": serving,
        "best_trial": {k: best.get(k) for k in ("trial_id", "score", "objective", "epochs")},
        "hyperparameters": best.get("hyperparameters") or {},
        "backbone": dataclasses.asdict(exp.backbone),
        "training": first_training,
        "tta": {"enabled": tta, "views": DIHEDRAL_VIEWS if tta else 1},
        "ensemble": {"requested": exp.retrain.ensemble, "size": len(members),
                     "validation_auc": validation["roc_auc"], "members": members},
        "reference_prevalence": {
            "value": prevalence,
            "source": (clinical.REFERENCE_PREVALENCE_SOURCE
                       if prevalence == clinical.DEFAULT_REFERENCE_PREVALENCE
                       else "retrain.reference_prevalence in the experiment file")},
        "operating_points": operating,
        "data": {
            "uri": exp.data_uri,
            "provenance": source_doc,
            "test_provenance": test_doc,
            "manifest_sha256": provenance.manifest_hash(manifest, data_dir),
            "splits": {k: {f: v.get(f) for f in ("count", "benign", "malignant")}
                       for k, v in (manifest.get("splits") or {}).items() if v},
        },
        "code_version": provenance.code_version(),
        "experiment": exp.to_dict(),
    }
    curves = {evaluated_on: (eval_labels, eval_probs), "validation": (val_labels, val_probs)}
    publish.write_version(local_dir, model, metrics, serving, exp, best, manifest,
                   result, _published(result, metrics),
                   curves=curves, points={evaluated_on: evaluation, "validation": validation})

    storage.upload_dir(local_dir, uri)
    # LATEST last: a reader that sees it finds every file of the version already there.
    publish.move_latest(storage, exp.models_uri, version, latest_seen)
    log.info("published %s (%s: accuracy %.3f, ROC AUC %s, sensitivity %s, specificity %s)",
             uri, evaluated_on, evaluation["accuracy"] or 0.0, fmt(evaluation["roc_auc"], 4, style='auto'),
             fmt(evaluation["sensitivity"], 4, style='auto'), fmt(evaluation["specificity"], 4, style='auto'))
    return Published(version=version, uri=uri, metrics=metrics, local_dir=local_dir)


def _published(result: documents.SearchResult | None, metrics: dict) -> dict | None:
    """What the run report shows of the published model beside the search: with an
    ensemble or TTA, its members and their validation ROC AUC."""
    ensemble, tta = metrics["ensemble"], metrics["tta"]
    if result is None or (ensemble["size"] == 1 and not tta["enabled"]):
        return None
    return {
        "version": metrics["version"], "tta_views": tta["views"],
        "validation_auc": ensemble["validation_auc"],
        "members": [{k: m.get(k) for k in ("trial_id", "score", "validation_auc",
                                          "validation_auc_tta", "hyperparameters")}
                    for m in ensemble["members"]]}
