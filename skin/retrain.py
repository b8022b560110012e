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
``LATEST`` naming the other, says so and exits 7 (``PublishRaceLostError``).

No decision looks at the test split: early stopping, the restored epoch and
the threshold all use validation only.

Before anything is downloaded or trained, every configuration about to be
retrained is checked against the experiment's search space and ``search.fixed``
(:func:`check_members`): the bucket's ``best_hyperparameters.json`` is data, and
a value the search could not have issued exits 2 with nothing published.

``retrain.ensemble: N`` (> 1) retrains the N best completed trials of the search
with distinct hyperparameters (``top_trials`` over ``tuner/result.json``; the best
trial first; fewer when fewer exist) and publishes one model, the mean of their
outputs. ``retrain.tta`` makes the published model average P(malignant) over the 8
dihedral views of the image (``skin.model.inference_model``). Either way the
threshold is chosen on the published model's own validation outputs, and
``metrics.json``, the model card and the run report list the members with their
validation ROC AUC beside the published model's.

A published version holds ``model.keras`` (self-describing: the serving
description is inside the archive and in ``serving.json`` beside it),
``saved_model/`` (``model.export``), ``metrics.json``, ``learning_curves.png``,
``roc.png``, ``confusion_matrix.png``, ``reliability.png``, ``model_card.md`` and
``report.html``, the run report (:mod:`skin.report`: the model's figures, then the search).

The card, the run report and ``metrics.json`` carry the 95 % intervals (Wilson; DeLong for
the ROC AUC), the Brier score and calibration (:mod:`skin.clinical`), PPV and NPV at
``retrain.reference_prevalence``, the operating points for other target sensitivities,
and the data's provenance and licence as the stage found them (:mod:`skin.provenance`;
``serving.json`` carries the source kind, so predict/evaluate warn on a synthetic model).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

import skin
from skin import artifacts, clinical, documents, provenance
from skin.errors import (
    ConfigError,
    DataError,
    PreconditionFailedError,
    PublishRaceLostError,
    SearchFailedError,
)
from skin.evaluate import (
    CLASS_NAMES,
    choose_threshold,
    classification_metrics,
    embed_serving,
    figure_rows,
    interval_text,
    malignant_probability,
    roc_auc,
    roc_curve,
    serving_document,
)
from skin.storage import join

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 32
VERSION_FORMAT = "%Y%m%d-%H%M%S"
INTENDED_USE = (
    "Research and teaching on distributed hyperparameter search. Not a medical device: it must "
    "not be used to diagnose, screen or triage anyone.")


@dataclass(frozen=True)
class Published:
    version: str
    uri: str  # <root>/models/<version>
    metrics: dict
    local_dir: Path  # the same files on local disk (runtime.work_dir/published/<version>)


# ---------------------------------------------------------------------------
# Training

class Curves(keras.callbacks.Callback):
    """Records every epoch's logs and writes one log line per epoch."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.history: dict[str, list[float]] = {}
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        shown = []
        for key, value in sorted((logs or {}).items()):
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            self.history.setdefault(key, []).append(value)
            shown.append(f"{key}={value:.4f}")
        log.info("retrain epoch %d/%d (%.0f s): %s", epoch + 1, self.epochs,
                 time.monotonic() - self._started, " ".join(shown))


def _epochs(exp, best: dict) -> int:
    if exp.retrain.epochs:
        return exp.retrain.epochs
    values = best.get("hyperparameters") or {}
    for candidate in (best.get("epochs"), values.get("tuner/epochs")):
        if candidate:
            return int(candidate)
    return exp.search.max_epochs


def train(exp, hypermodel, best: dict, data_dir: Path, *, seed: int | None = None) \
        -> tuple[Any, dict]:
    """The final model, early-stopped on validation (``retrain.patience``), with the best
    validation epoch's weights restored (``retrain.restore_best``) or the last epoch's.

    ``seed``: the random seed of this training (default ``data.seed``).
    """
    keras.utils.set_random_seed(exp.data.seed if seed is None else seed)
    from skin.space import hyperparameters_from_values

    hp = hyperparameters_from_values(best.get("hyperparameters") or {})
    model = hypermodel.build(hp)
    epochs = _epochs(exp, best)
    monitor, mode = exp.search.objective, exp.search.direction
    curves = Curves(epochs)
    # patience 0 switches early stopping off. restore_best: the best validation epoch's
    # weights are published, else the last epoch's (chosen by no one: validation then
    # only picks the threshold, so its figures stay an unbiased estimate).
    restore = exp.retrain.restore_best
    stopper = keras.callbacks.EarlyStopping(
        monitor=monitor, mode=mode, restore_best_weights=restore,
        patience=exp.retrain.patience if exp.retrain.patience else epochs + 1)
    log.info("retraining trial %s's configuration for up to %d epochs (early stopping on %s, "
             "patience %s; publishing the %s epoch's weights)", best.get("trial_id", "?"), epochs,
             monitor, exp.retrain.patience or "off", "best" if restore else "last")
    started = time.monotonic()
    hypermodel.fit(hp, model, data_dir=data_dir, epochs=epochs, callbacks=[stopper, curves])
    values = curves.history.get(monitor, [])
    best_epoch = (int(np.argmin(values) if mode == "min" else np.argmax(values)) + 1
                  if values else None)
    trained = len(next(iter(curves.history.values()), []))
    training = {
        "epochs_budget": epochs,
        "epochs_trained": trained,
        "best_epoch": best_epoch,
        "restored_best": restore,
        "published_epoch": best_epoch if restore else (trained or None),
        "monitor": monitor,
        "patience": exp.retrain.patience,
        "seconds": round(time.monotonic() - started, 1),
        "history": curves.history,
    }
    return model, training


def split_predictions(model, data_dir: Path, split: str, image_size: int) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """``(labels, P(malignant))`` over a staged split, in the dataset's order."""
    from skin import data as skin_data

    labels, probabilities = [], []
    ds = skin_data.dataset(data_dir, split, image_size, EVAL_BATCH_SIZE, training=False)
    for images, y in ds:
        labels.append(np.asarray(y).reshape(-1))
        probabilities.append(malignant_probability(model, np.asarray(images)))
    if not labels:
        raise DataError(f"the {split} split is empty")
    return (np.rint(np.concatenate(labels)).astype(np.int64),
            np.concatenate(probabilities))


def _split_count(manifest: dict, split: str) -> int:
    try:
        return int(manifest["splits"][split]["count"])
    except (KeyError, TypeError, ValueError):
        return 0


# ---------------------------------------------------------------------------
# Plots (matplotlib, Agg)

def _pyplot():
    config_dir = os.environ.get("MPLCONFIGDIR") or str(Path.home() / ".config" / "matplotlib")
    try:
        Path(config_dir).mkdir(parents=True, exist_ok=True)
        writable = os.access(config_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # a read-only root filesystem in a pod
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="matplotlib-")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: dict[str, list[float]], published_epoch: int | None,
                         path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    names = [n for n in ("loss", "auc", "accuracy") if n in history or f"val_{n}" in history]
    names += [n for n in history if not n.startswith("val_") and n not in names
              and n != "learning_rate"][:max(0, 3 - len(names))]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.6),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, style in ((name, "-"), (f"val_{name}", "--")):
            if key in history:
                epochs = np.arange(1, len(history[key]) + 1)
                ax.plot(epochs, history[key], style, marker="o", ms=3,
                        label="validation" if key.startswith("val_") else "train")
        if published_epoch:
            ax.axvline(published_epoch, color="grey", lw=0.8, ls=":", label="published epoch")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# One look per split on every plot, so validation and test stay apart even where they
# overlap: colour, line style and marker all differ.
SPLIT_STYLE = {
    "validation": dict(color="#1f77b4", ls="-", lw=2.4, marker="o", alpha=0.75),
    "test": dict(color="#d62728", ls="--", lw=1.6, marker="s", alpha=1.0),
}


def _style(split: str) -> dict:
    return SPLIT_STYLE.get(split, dict(color="#2ca02c", ls=":", lw=1.6, marker="^", alpha=1.0))


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], points: dict[str, dict],
             path: Path) -> None:
    """ROC curves by split, with the operating point at the published threshold.

    Validation is a thick solid blue line, test a thin dashed red one with square markers
    drawn on top: one cannot hide the other."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    order = sorted(curves, key=lambda k: k != "validation")  # validation underneath
    for split in order:
        labels, scores = curves[split]
        try:
            fpr, tpr, _ = roc_curve(labels, scores)
        except ValueError:
            continue  # one class only: no curve
        st = _style(split)
        m = points[split]
        auc = m.get("roc_auc")
        ci = interval_text(m, "roc_auc")
        label = split + (f" (AUC {auc:.3f}" + (f", 95 % CI {ci}" if ci else "") + ")"
                         if auc is not None else "")
        ax.plot(fpr, tpr, color=st["color"], ls=st["ls"], lw=st["lw"], alpha=st["alpha"],
                marker=st["marker"], ms=3.5, markevery=max(1, len(fpr) // 12),
                label=label, zorder=2 if split == "validation" else 3)
        if m.get("sensitivity") is not None and m.get("specificity") is not None:
            ax.plot([1 - m["specificity"]], [m["sensitivity"]], marker=st["marker"], ms=10,
                    mfc="none" if split == "validation" else st["color"], mec=st["color"],
                    mew=2, ls="none", zorder=4,
                    label=f"{split} at threshold {m['threshold']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("1 - specificity (benign called malignant)")
    ax.set_ylabel("sensitivity (malignant found)")
    ax.set_title("ROC by split; big markers: the published threshold", fontsize=10)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right", fontsize=7.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrix(matrix: list[list[int]], split: str, threshold: float,
                          path: Path) -> None:
    """Counts with the row rates: specificity and false-positive rate on the benign row,
    false-negative rate (missed) and sensitivity on the malignant row."""
    plt = _pyplot()
    m = np.asarray(matrix)
    rows = m.sum(axis=1, keepdims=True)
    rates = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
    names = [["specificity", "false positives"], ["missed (FNR)", "sensitivity"]]
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, f"{count}\n{100 * rates[i, j]:.1f} %\n{names[i][j]}", ha="center",
                va="center", color="white" if rates[i, j] > 0.5 else "black", fontsize=10)
    ax.set_xticks([0, 1], [f"predicted\n{c}" for c in CLASS_NAMES])
    ax.set_yticks([0, 1], [f"{c}\n(n={int(rows[k, 0])})" for k, c in enumerate(CLASS_NAMES)])
    ax.set_title(f"{split}, threshold {threshold:.3f} (rates per true class)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(points: dict[str, dict], path: Path) -> None:
    """Reliability diagram: per probability bin, the share that was malignant against the
    mean predicted probability (on the diagonal: calibrated), and the images per bin."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.2, 5.6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.2]})
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfectly calibrated")
    splits = sorted(points.items(), key=lambda kv: kv[0] != "validation")
    for k, (split, m) in enumerate(splits):
        cal = (m.get("calibration") or {}).get("table") or []
        if not cal:
            continue
        st = _style(split)
        ece = m.get("ece")
        ax.plot([b["mean_probability"] for b in cal], [b["fraction_malignant"] for b in cal],
                color=st["color"], ls=st["ls"], lw=st["lw"] * 0.8, marker=st["marker"], ms=6,
                alpha=max(st["alpha"], 0.85),
                label=f"{split} (ECE {ece:.3f}, Brier {m.get('brier'):.3f})"
                if ece is not None and m.get("brier") is not None else split)
        width = 0.8 * (cal[0]["high"] - cal[0]["low"]) / len(splits)  # side by side in a bin
        centres = [(b["low"] + b["high"]) / 2 for b in cal]
        hist.bar([c + (k - (len(splits) - 1) / 2) * width for c in centres],
                 [b["n"] for b in cal], width=width, color=st["color"], alpha=0.8,
                 hatch="" if split == "validation" else "//", edgecolor="white", label=split)
    bins = next(((m.get("calibration") or {}).get("bins") for m in points.values()), 10)
    ax.set_ylabel("fraction malignant")
    ax.set_title(f"Reliability ({bins} equal-width bins of P(malignant))", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7.5)
    hist.set_xlabel("predicted P(malignant)")
    hist.set_ylabel("images per bin")
    hist.grid(alpha=0.3)
    hist.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Provenance

def code_version() -> str:
    """``skin.__version__`` plus the git commit (and ``-dirty``) when the code is a checkout."""
    here = Path(skin.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return skin.__version__
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        return f"{skin.__version__}+git.{commit.stdout.strip()}{suffix}"
    except (OSError, subprocess.SubprocessError):
        return skin.__version__


def manifest_hash(manifest: dict, data_dir: Path) -> str:
    if manifest.get("manifest_sha256"):
        return str(manifest["manifest_sha256"])
    path = data_dir / artifacts.MANIFEST
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _published_epoch(training: dict) -> str:
    """The model card's words for which epoch's weights were published."""
    best = training.get("best_epoch")
    if training.get("restored_best", True):
        return f"restored epoch {best} (best {training['monitor']})"
    return (f"published the last epoch's weights (epoch {training.get('published_epoch')}; "
            f"the best {training['monitor']} was at epoch {best})")


def model_card(exp, version: str, metrics: dict, best: dict, manifest: dict) -> str:
    splits = manifest.get("splits", {})
    split_rows = [f"| {name} | {s.get('count', '?')} | {s.get('benign', '?')} | "
                  f"{s.get('malignant', '?')} |" for name, s in splits.items() if s]
    hps = best.get("hyperparameters") or {}
    cm = metrics["confusion_matrix"]
    lines = [
        f"# Model card: {exp.name} {version}",
        "",
        f"{_what_model(exp)} that scores dermoscopic images of skin lesions as benign or "
        "malignant, found by a distributed keras-tuner search and retrained on its best "
        "configuration.",
        "",
        "## Intended use",
        "",
        INTENDED_USE,
        "",
        "## Data",
        "",
        *provenance.card_lines(metrics["data"].get("provenance") or {},
                               test=metrics["data"].get("test_provenance"),
                               manifest_sha256=metrics["data"]["manifest_sha256"],
                               data_uri=exp.data_uri),
        f"- source fingerprint: `{manifest.get('source_fingerprint', 'n/a')}`",
        "",
        "| split | images | benign | malignant |",
        "|---|---|---|---|",
        *split_rows,
        "",
        "## Using it",
        "",
        f"Input: float32 RGB pixels 0..255, {metrics['image_size']}x{metrics['image_size']} "
        "(resized like the training pipeline: `skin.data.load_images`). Output: the probability "
        f"of malignant. Decision: malignant when the probability is >= **{metrics['threshold']:.4f}**, "
        f"the highest threshold that kept validation sensitivity >= "
        f"{metrics['target_sensitivity']:.2f}.",
        "",
        "    skin evaluate --model <this folder> --data <folder with benign/ and malignant/>",
        "    skin predict --model <this folder> image.jpg ...",
        "",
        "## Metrics",
        "",
        f"Evaluated on the **{metrics['evaluated_on']}** split (n={metrics['n']}) at the "
        "published threshold"
        + ("" if metrics["evaluated_on"] == "test" else
           " (no test split was staged: these numbers are from the data that chose the "
           "threshold" + (" and the epoch" if metrics["training"].get("restored_best", True)
                          else "") + ", so they are optimistic)") + ".",
        "",
        *_metric_table(metrics),
        "",
        f"Confusion matrix on {metrics['evaluated_on']} (rows true, columns predicted; "
        f"benign, malignant): tn={cm[0][0]}, fp={cm[0][1]}, fn={cm[1][0]}, tp={cm[1][1]}.",
        "",
        *_prevalence_section(metrics),
        *_operating_points_section(metrics),
        *_calibration_section(metrics),
        "Near-duplicate photos of one lesion are kept on one side of each split, but the "
        "data set is small and from one source: expect lower figures on other clinics, "
        "cameras and skin types."
        if (metrics["data"].get("provenance") or {}).get("kind") != provenance.SYNTHETIC else
        "These figures are on synthetic images: they only show that the pipeline runs.",
        "",
        "## Training",
        "",
        f"- best trial: `{best.get('trial_id', 'n/a')}`, {best.get('objective', exp.search.objective)}"
        f" = {_fmt(best.get('score'))} in the search ({exp.search.tuner})",
        *([f"- confirmation (search.confirm): {best['confirmation']['text']}; mean ± std "
            "over seeds" + (" and validation folds" if len(best["confirmation"].get("folds")
                                                           or [0]) > 1 else "")
            + ": " + ", ".join(
                f"trial {c['trial_id']} {c['mean']:.4f} ± {c['std']:.4f} (n={c['n']})"
                for c in best["confirmation"]["candidates"])]
          if isinstance(best.get("confirmation"), dict) else []),
        f"- retrained for {metrics['training']['epochs_trained']} of "
        f"{metrics['training']['epochs_budget']} epochs; {_published_epoch(metrics['training'])}",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(hps.items())],
        "",
        *_composition(metrics),
        "## Provenance",
        "",
        f"- code version: `{metrics['code_version']}`",
        f"- created: {metrics['created']}",
        f"- published to: `{metrics['uri']}`",
        "",
        "Experiment:",
        "",
        "```yaml",
        exp.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _metric_table(metrics: dict) -> list[str]:
    """The card's figures: :func:`skin.evaluate.figure_rows` (the one formatter that
    ``skin evaluate`` and ``report.html`` use too), evaluated split and validation."""
    split = metrics["evaluated_on"]
    val = {r["key"]: r["value"] for r in figure_rows(metrics["validation"])}
    lines = [f"| metric | {split} | 95 % interval ({split}) | validation |", "|---|---|---|---|"]
    for r in figure_rows(metrics, sep=" – "):
        interval = f"{r['interval']} ({r['method']})" if r["interval"] else ""
        name = r["name"] + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"| {name} | {r['value']} | {interval} | {val.get(r['key'], '')} |")
    return lines + [
        "",
        "Intervals: Wilson score intervals for the proportions (accuracy, sensitivity, "
        "specificity), DeLong's method for the ROC AUC; PPV and NPV take theirs from the "
        "Wilson bounds of sensitivity and specificity (approximate). Each is the range the "
        "figure could take on another sample of the same size."]


def _p3(value) -> str:
    """A figure as the card's tables show it (3 decimals, like skin.evaluate.figure_rows)."""
    return "n/a" if value is None else f"{value:.3f}"


def _prevalence_section(metrics: dict) -> list[str]:
    pv = metrics.get("at_prevalence")
    ref = metrics.get("reference_prevalence") or {}
    if not pv or pv.get("ppv") is None:
        return []
    split = metrics["evaluated_on"]
    n_mal, n = metrics["n_malignant"], metrics["n"]
    return [
        "## At a clinic's prevalence",
        "",
        f"The {split} set is {100 * n_mal / n:.0f} % malignant; precision on it says little "
        "about a clinic where far fewer lesions are. At a prevalence of "
        f"**{100 * pv['prevalence']:.1f} %** ({ref.get('source', 'retrain.reference_prevalence')})"
        f", the {split} sensitivity and specificity give:",
        "",
        f"- PPV (a malignant call is right): **{_p3(pv['ppv'])}** "
        f"(95 % interval {interval_text(pv, 'ppv', ' – ') or 'n/a'})",
        f"- NPV (a benign call is right): **{_p3(pv['npv'])}** "
        f"(95 % interval {interval_text(pv, 'npv', ' – ') or 'n/a'})",
        "",
        "Set `retrain.reference_prevalence` for another population, or ask "
        "`skin evaluate --prevalence P`.",
        "",
    ]


def _operating_points_section(metrics: dict) -> list[str]:
    ops = metrics.get("operating_points") or []
    if not ops:
        return []
    split = metrics["evaluated_on"]
    pv = (metrics.get("reference_prevalence") or {}).get("value")
    lines = [
        "## Operating points",
        "",
        f"Thresholds chosen on validation for other target sensitivities, and what each "
        f"gives on {split} (the published one keeps {metrics['target_sensitivity']:.2f}).",
        "",
        f"| target sensitivity | threshold | validation sensitivity | validation specificity "
        f"| {split} sensitivity | {split} specificity |"
        + (f" PPV at {100 * pv:.1f} % | NPV at {100 * pv:.1f} % |" if pv else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if pv else ""),
    ]
    for r in ops:
        t = r["test"]
        mark = " (published)" if abs(r["target_sensitivity"] -
                                     metrics["target_sensitivity"]) < 1e-9 else ""
        lines.append(
            f"| {r['target_sensitivity']:.2f}{mark} | {r['threshold']:.4f} | "
            f"{_p3(r['validation']['sensitivity'])} | {_p3(r['validation']['specificity'])} | "
            f"{_p3(t['sensitivity'])} ({interval_text(t, 'sensitivity', ' – ')}) | "
            f"{_p3(t['specificity'])} ({interval_text(t, 'specificity', ' – ')}) |"
            + (f" {_p3(t.get('ppv'))} | {_p3(t.get('npv'))} |" if pv else ""))
    return lines + [""]


def _calibration_section(metrics: dict) -> list[str]:
    cal = metrics.get("calibration") or {}
    if not cal.get("table"):
        return []
    split = metrics["evaluated_on"]
    lines = [
        "## Calibration",
        "",
        f"Does P(malignant) mean what it says? On {split}: Brier score "
        f"**{_p3(metrics.get('brier'))}**, expected calibration error "
        f"**{_p3(metrics.get('ece'))}** over {cal['bins']} equal-width bins of the "
        "probability (validation: Brier "
        f"{_p3(metrics['validation'].get('brier'))}, ECE {_p3(metrics['validation'].get('ece'))})."
        " The reliability diagram is `reliability.png`.",
        "",
        "| P(malignant) bin | images | mean P(malignant) | fraction malignant |",
        "|---|---|---|---|",
    ]
    lines += [f"| {b['low']:.1f} – {b['high']:.1f} | {b['n']} | {b['mean_probability']:.3f} | "
              f"{b['fraction_malignant']:.3f} |" for b in cal["table"]]
    return lines + ["", "The decision uses the threshold above, not 0.5: a model can rank "
                    "well (high AUC) and still be miscalibrated.", ""]


def _what_model(exp) -> str:
    """The model card's first words: the from-scratch CNN or the backbone it is built on."""
    b = exp.backbone
    if b.name == "none":
        return "A from-scratch CNN"
    weights = b.weights.strip()
    if not weights:
        origin = "randomly initialised (trained from scratch)"
    elif weights == "imagenet":
        origin = "ImageNet weights from Keras"
    else:
        origin = f"weights from `{weights}`"
    mode = "fine-tuned" if b.trainable else "frozen, the head trained alone"
    return f"A CNN on a {b.name} backbone ({origin}; {mode})"


def _composition(metrics: dict) -> list[str]:
    """The model card's section on an ensemble and/or test-time augmentation (else nothing)."""
    ensemble, tta = metrics.get("ensemble") or {}, metrics.get("tta") or {}
    members = ensemble.get("members") or []
    if len(members) <= 1 and not tta.get("enabled"):
        return []
    views = tta.get("views", 1)
    lines = ["## Ensemble and test-time augmentation", ""]
    if len(members) > 1:
        lines.append(f"The published model is the mean of {len(members)} models, each retrained "
                     "like the one above from one of the best distinct configurations of the "
                     f"search (asked for {ensemble.get('requested')}).")
    if tta.get("enabled"):
        lines.append(f"It averages P(malignant) over {views} views of each image (identity, "
                     "flips and rotations by 90 degrees): a lesion has no orientation. The "
                     "threshold was chosen on these averaged validation outputs.")
    tta_col = tta.get("enabled")
    lines += ["", "| member | trial | search score | validation ROC AUC |"
              + (" with TTA |" if tta_col else ""),
              "|---|---|---|---|" + ("---|" if tta_col else "")]
    for i, m in enumerate(members):
        lines.append(f"| {i} | `{m.get('trial_id')}` | {_fmt(m.get('score'))} | "
                     f"{_fmt(m.get('validation_auc'))} |"
                     + (f" {_fmt(m.get('validation_auc_tta'))} |" if tta_col else ""))
    lines.append("| **published** | | | " + (f"| **{_fmt(ensemble.get('validation_auc'))}** |"
                                                if tta_col else
                                                f"**{_fmt(ensemble.get('validation_auc'))}** |"))
    if len(members) > 1:
        names = sorted({k for m in members for k in (m.get("hyperparameters") or {})})
        lines += ["", "| hyperparameter | " + " | ".join(f"`{m.get('trial_id')}`" for m in members)
                  + " |", "|---|" + "---|" * len(members)]
        lines += [f"| {k} | " + " | ".join(str((m.get("hyperparameters") or {}).get(k, "-"))
                                           for m in members) + " |" for k in names]
    return lines + [""]


# ---------------------------------------------------------------------------
# Publishing

def _new_version(storage, models_uri: str) -> str:
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


def _read_latest(storage, models_uri: str) -> tuple[str | None, int]:
    """(the version LATEST names, its generation); (None, 0) when nothing is published."""
    try:
        data, generation = storage.read_versioned(join(models_uri, artifacts.LATEST))
    except FileNotFoundError:
        return None, 0
    return data.decode("utf-8", errors="replace").strip() or None, generation


def _move_latest(storage, models_uri: str, version: str, seen: tuple[str | None, int]) -> None:
    """Point LATEST at ``version`` unless another retrain moved it since we read ``seen``."""
    latest = join(models_uri, artifacts.LATEST)
    try:
        storage.write_text(latest, version + "\n", if_generation_match=seen[1])
    except PreconditionFailedError:
        other, _ = _read_latest(storage, models_uri)
        raise PublishRaceLostError(
            f"another retrain published {other} while this one ran (LATEST named "
            f"{seen[0] or 'nothing'} when it started): LATEST stays on {other}. This retrain's "
            f"version {version} is complete at {join(models_uri, version)}; to serve it "
            f"instead, write {version!r} into {latest}") from None


def _render_report(result: documents.SearchResult | None, out_dir: Path,
                   metrics: dict | None = None, published: dict | None = None) -> None:
    """``report.html``: the published model's figures and plots (``metrics`` and the PNGs
    in ``out_dir``), then the search (``result``), when there is either."""
    if result is None and metrics is None:
        log.info("no search result in the bucket: no run report")
        return
    from skin.report import render_search_report  # matplotlib: loaded when a report is drawn

    try:
        render_search_report(result, out_dir, metrics=metrics, published=published)
    except Exception:  # the report is a by-product; the model is published anyway
        log.exception("the run report failed; publishing without it")


def _load_result(storage, exp) -> documents.SearchResult | None:
    try:
        return documents.read_result(storage, exp)
    except FileNotFoundError:
        return None
    except ValueError as e:  # not JSON, or a DocumentError: only the report needs it
        log.warning("search result unreadable, no run report: %s", e)
        return None


def top_trials(result: documents.SearchResult | None, n: int, *, best: dict | None = None,
               objective: str = "val_auc") -> list[dict]:
    """The ``n`` best completed trials of a search with distinct hyperparameters, best first.

    ``result``: ``tuner/result.json``; trials ranked by score in its ``direction`` (without
    a result, ``objective``'s: skin.artifacts.objective_direction), ties in its order. A
    configuration that several trials share (Hyperband continues one across rounds)
    counts once, with its best trial. ``best`` (``best_hyperparameters.json``), when given,
    comes first whatever the result says. Each entry is shaped like ``best``:
    ``{"trial_id", "score", "objective", "epochs", "hyperparameters"}``. Fewer than ``n``
    when fewer distinct configurations completed.
    """
    from skin.tuning.tuner import values_hash  # what makes two trials one configuration

    if result is not None:
        objective = result.objective
    else:
        artifacts.objective_direction(objective)  # a ValueError for an unknown objective
    scored = result.ranked() if result is not None else []
    picked: list[dict] = []
    seen: set[str] = set()
    if best is not None and n > 0:
        picked.append(dict(best))
        seen.add(values_hash(best.get("hyperparameters") or {}))
    for t in scored:
        if len(picked) >= n:
            break
        key = values_hash(t.hyperparameters)
        if key in seen:
            continue
        seen.add(key)
        picked.append({"trial_id": t.id, "score": t.score, "objective": objective,
                       "epochs": t.epochs or None, "hyperparameters": dict(t.hyperparameters)})
    return picked


def members_to_retrain(exp, best: dict, result: documents.SearchResult | None) -> list[dict]:
    """The trials to retrain: the best alone, or the top ``retrain.ensemble``."""
    wanted = exp.retrain.ensemble
    if wanted <= 1:
        return [best]
    members = top_trials(result, wanted, best=best, objective=exp.search.objective)
    if len(members) < wanted:
        log.warning("retrain.ensemble is %d but the search has %d distinct completed "
                    "configuration(s)%s: ensembling %d", wanted, len(members),
                    "" if result is not None else " (no tuner/result.json)", len(members))
    log.info("ensemble of %d: trials %s", len(members),
             ", ".join(str(m.get("trial_id")) for m in members))
    return members


def _auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    auc = roc_auc(labels, probabilities)
    return None if math.isnan(auc) else auc


def _load_best(storage, exp) -> dict:
    from skin.tuning import load_best

    try:
        return load_best(storage, exp).to_json()  # a member spec: the best's keys (top_trials)
    except FileNotFoundError as e:
        raise SearchFailedError(f"no best hyperparameters at {exp.tuner_uri}: the search has not "
                                f"finished ({e})") from None


def check_members(exp, hypermodel, specs: list[dict]) -> None:
    """Train only what the search could have issued: every configuration's values allowed by
    the experiment's search space and ``search.fixed``, nothing missing, nothing extra.

    The space is built the way the chief builds it (``populate_space``), from the code and
    the experiment file, not from anything in the bucket. A mismatch is a ConfigError
    (exit 2) naming the key and the value, raised before anything is trained or published.
    """
    from skin.tuning.checks import check_values
    from skin.tuning.chief import populate_space
    from skin.tuning.oracle import make_oracle

    oracle = make_oracle(exp, leased=False)
    populate_space(oracle, hypermodel)
    for spec in specs:
        values = {k: v for k, v in (spec.get("hyperparameters") or {}).items()
                  if not k.startswith("tuner/")}  # keras-tuner's bookkeeping, not the model's
        try:
            check_values(oracle.hyperparameters, values, exp.search.fixed)
        except ValueError as e:
            raise ConfigError(f"{artifacts.best_uri(exp)} (trial "
                              f"{spec.get('trial_id', '?')}): {e}; nothing was trained or "
                              "published") from None


def retrain(ctx, *, best: dict | None = None) -> Published:
    """Retrain the best configuration, choose the threshold, evaluate, publish. See module doc.
    ``ctx``: the role's skin.context.RoleContext."""
    from skin import data as skin_data

    exp, runtime, storage = ctx.exp, ctx.runtime, ctx.storage

    latest_seen = _read_latest(storage, exp.models_uri)  # LATEST moves only from here
    best = dict(best) if best is not None else _load_best(storage, exp)
    result = _load_result(storage, exp)
    hypermodel = ctx.hypermodel()
    specs = members_to_retrain(exp, best, result)
    check_members(exp, hypermodel, specs)  # before any download or training: exit 2 on a mismatch
    data_dir = Path(skin_data.sync_data(storage, exp.data_uri, Path(runtime.work_dir) / "data"))
    manifest = skin_data.load_manifest(data_dir)
    size = exp.data.image_size

    from skin.model import DIHEDRAL_VIEWS, inference_model

    tta = exp.retrain.tta
    trained, members = [], []
    for i, spec in enumerate(specs):
        if len(specs) > 1:
            log.info("ensemble member %d/%d: trial %s", i + 1, len(specs), spec.get("trial_id"))
        member, member_training = train(exp, hypermodel, spec, data_dir,
                                        seed=exp.data.seed + i)
        entry = {"trial_id": spec.get("trial_id"), "score": spec.get("score"),
                 "objective": spec.get("objective"), "epochs": spec.get("epochs"),
                 "hyperparameters": spec.get("hyperparameters") or {},
                 "validation_auc": None,
                 "training": {k: v for k, v in member_training.items() if k != "history"}}
        if len(specs) > 1 or tta:  # one plain member is the published model: no second pass
            labels, probs = split_predictions(member, data_dir, "validation", size)
            entry["validation_auc"] = _auc(labels, probs)
        if tta and len(specs) > 1:
            _, tta_probs = split_predictions(inference_model([member], tta=True), data_dir,
                                             "validation", size)
            entry["validation_auc_tta"] = _auc(labels, tta_probs)
        trained.append((member, member_training))
        members.append(entry)
    training = trained[0][1]
    # The published model: the member itself, or the mean over members (and views).
    model = inference_model([m for m, _ in trained], tta=tta)

    val_labels, val_probs = split_predictions(model, data_dir, "validation", size)
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
        log.info("validation ROC AUC: published %s; members %s", _fmt(validation["roc_auc"]),
                 ", ".join(f"{m['trial_id']} {_fmt(m['validation_auc'])}"
                           + (f" (TTA {_fmt(m['validation_auc_tta'])})" if tta else "")
                           for m in members))

    evaluated_on = "test" if _split_count(manifest, "test") > 0 else "validation"
    if evaluated_on == "test":
        eval_labels, eval_probs = split_predictions(model, data_dir, "test", size)
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

    version = _new_version(storage, exp.models_uri)
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
        "class_names": list(CLASS_NAMES),
        "serving": serving,
        "best_trial": {k: best.get(k) for k in ("trial_id", "score", "objective", "epochs")},
        "hyperparameters": best.get("hyperparameters") or {},
        "backbone": dataclasses.asdict(exp.backbone),
        "training": training,
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
            "manifest_sha256": manifest_hash(manifest, data_dir),
            "splits": {k: {f: v.get(f) for f in ("count", "benign", "malignant")}
                       for k, v in (manifest.get("splits") or {}).items() if v},
        },
        "code_version": code_version(),
        "experiment": exp.to_dict(),
    }
    curves = {evaluated_on: (eval_labels, eval_probs), "validation": (val_labels, val_probs)}
    _write_version(local_dir, model, metrics, serving, exp, best, manifest,
                   result, _published(result, metrics),
                   curves=curves, points={evaluated_on: evaluation, "validation": validation})

    storage.upload_dir(local_dir, uri)
    # LATEST last: a reader that sees it finds every file of the version already there.
    _move_latest(storage, exp.models_uri, version, latest_seen)
    log.info("published %s (%s: accuracy %.3f, ROC AUC %s, sensitivity %s, specificity %s)",
             uri, evaluated_on, evaluation["accuracy"] or 0.0, _fmt(evaluation["roc_auc"]),
             _fmt(evaluation["sensitivity"]), _fmt(evaluation["specificity"]))
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


def _write_version(local_dir: Path, model, metrics: dict, serving: dict, exp, best: dict,
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
    _render_report(result, local_dir, metrics, published)
