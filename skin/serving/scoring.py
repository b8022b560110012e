"""Scoring maths: plain numpy, checked exactly against hand-computed values.

Label 1 (malignant) is the positive class; a sample is predicted positive when its
probability is >= the threshold. ROC curve and AUC, the confusion matrix, the choice of
the decision threshold, Wilson intervals and :func:`classification_metrics` (the
published figures; :mod:`skin.serving.clinical` adds calibration, DeLong and PPV/NPV). Retrain,
``skin evaluate`` and the benchmarks all use these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.5

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
    (:mod:`skin.serving.clinical`).
    """
    from skin.serving import clinical

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
