"""The model card (``model_card.md``) of a published version, from its ``metrics.json``.

What the model is and is for, the data and its provenance, how to use it, the figures
with their 95 % intervals (the rows of :func:`skin.serving.formatting.figure_rows`), PPV and NPV
at a clinic's prevalence, the operating points, calibration, the training, an ensemble's
members and the experiment file.
"""

from __future__ import annotations

from skin.data import provenance
from skin.serving.formatting import figure_rows, fmt, interval_text

INTENDED_USE = (
    "Research and teaching on distributed hyperparameter search. Not a medical device: it must "
    "not be used to diagnose, screen or triage anyone.")


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
        "(resized like the training pipeline: `skin.data.dataset.load_images`). Output: the probability "
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
        f" = {fmt(best.get('score'), 4, style='auto')} in the search ({exp.search.tuner})",
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
    """The card's figures: :func:`skin.serving.formatting.figure_rows` (the one formatter that
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
        f"- PPV (a malignant call is right): **{fmt(pv['ppv'])}** "
        f"(95 % interval {interval_text(pv, 'ppv', ' – ') or 'n/a'})",
        f"- NPV (a benign call is right): **{fmt(pv['npv'])}** "
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
            f"{fmt(r['validation']['sensitivity'])} | {fmt(r['validation']['specificity'])} | "
            f"{fmt(t['sensitivity'])} ({interval_text(t, 'sensitivity', ' – ')}) | "
            f"{fmt(t['specificity'])} ({interval_text(t, 'specificity', ' – ')}) |"
            + (f" {fmt(t.get('ppv'))} | {fmt(t.get('npv'))} |" if pv else ""))
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
        f"**{fmt(metrics.get('brier'))}**, expected calibration error "
        f"**{fmt(metrics.get('ece'))}** over {cal['bins']} equal-width bins of the "
        "probability (validation: Brier "
        f"{fmt(metrics['validation'].get('brier'))}, ECE {fmt(metrics['validation'].get('ece'))})."
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
        lines.append(f"| {i} | `{m.get('trial_id')}` | {fmt(m.get('score'), 4, style='auto')} | "
                     f"{fmt(m.get('validation_auc'), 4, style='auto')} |"
                     + (f" {fmt(m.get('validation_auc_tta'), 4, style='auto')} |" if tta_col else ""))
    lines.append("| **published** | | | " + (f"| **{fmt(ensemble.get('validation_auc'), 4, style='auto')}** |"
                                                if tta_col else
                                                f"**{fmt(ensemble.get('validation_auc'), 4, style='auto')}** |"))
    if len(members) > 1:
        names = sorted({k for m in members for k in (m.get("hyperparameters") or {})})
        lines += ["", "| hyperparameter | " + " | ".join(f"`{m.get('trial_id')}`" for m in members)
                  + " |", "|---|" + "---|" * len(members)]
        lines += [f"| {k} | " + " | ".join(str((m.get("hyperparameters") or {}).get(k, "-"))
                                           for m in members) + " |" for k in names]
    return lines + [""]
