"""The figures a clinical reader asks for beyond accuracy: how sure the AUC is, whether the
probabilities mean what they say, and what a positive call means at a realistic prevalence.

Plain numpy, label 1 (malignant) is the positive class, like the metric functions of
:mod:`skin.serving.scoring` (which this module extends; ``classification_metrics`` there adds
these figures to every evaluation):

- :func:`auc_interval`: the 95 % interval of the ROC AUC by **DeLong's method**
  (DeLong, DeLong & Clarke-Pearson 1988; the placement-value form of Sun & Xu 2014),
  a normal interval around the AUC, clipped to [0, 1].
- :func:`brier_score`: mean squared difference between P(malignant) and the label.
- :func:`calibration_bins` and :func:`expected_calibration_error`: the reliability diagram's
  bins, :data:`CALIBRATION_BINS` equal-width bins over [0, 1] (the binning of
  scikit-learn's ``calibration_curve(strategy="uniform")``), and their weighted mean gap.
- :func:`predictive_values`: PPV and NPV at a stated prevalence, from sensitivity and
  specificity (Bayes' rule), with an interval carried over from their Wilson intervals.
- :func:`operating_points`: thresholds chosen on validation for several target
  sensitivities (:func:`skin.serving.scoring.choose_threshold`) and what each gives on test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CALIBRATION_BINS = 10
OPERATING_SENSITIVITIES = (0.85, 0.90, 0.95, 0.98)
Z_95 = 1.959963984540054  # two-sided 95 %

# The prevalence the model card states PPV and NPV at, unless retrain.reference_prevalence
# says otherwise: urgent suspected-skin-cancer referrals in England, 2023, confirmed as skin
# cancer (basal cell carcinoma excluded): 6.2 %.
DEFAULT_REFERENCE_PREVALENCE = 0.062
REFERENCE_PREVALENCE_SOURCE = (
    "urgent suspected skin cancer referrals in England in 2023 that were confirmed as a skin "
    "cancer other than basal cell carcinoma (conversion rate 6.2 %; Mitra, van Bodegraven & "
    "Venables, Br J Dermatol 2025, doi:10.1093/bjd/ljag086.233)")


def _arrays(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    from skin.serving.scoring import _as_arrays

    return _as_arrays(labels, scores)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_x))[0] + 1]
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def delong(labels: Sequence, scores: Sequence) -> tuple[float, float]:
    """``(auc, variance)`` by DeLong's method; NaNs when a class is missing.

    The placement value of a malignant image is the share of benign images it outscores
    (ties half), and of a benign image the share of malignant images that outscore it;
    the AUC is their mean and its variance ``var(V10)/m + var(V01)/n``.
    """
    y, s = _arrays(labels, scores)
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    if not m or not n:
        return float("nan"), float("nan")
    all_ranks = _midranks(np.r_[pos, neg])
    v10 = (all_ranks[:m] - _midranks(pos)) / n  # benign outscored by each malignant
    v01 = 1.0 - (all_ranks[m:] - _midranks(neg)) / m  # malignant outscoring each benign
    auc = float(v10.mean())
    s10 = float(np.var(v10, ddof=1)) if m > 1 else 0.0
    s01 = float(np.var(v01, ddof=1)) if n > 1 else 0.0
    return auc, s10 / m + s01 / n


def auc_interval(labels: Sequence, scores: Sequence, z: float = Z_95) -> list[float] | None:
    """DeLong 95 % interval of the ROC AUC, clipped to [0, 1]; None without both classes."""
    auc, var = delong(labels, scores)
    if math.isnan(auc):
        return None
    half = z * math.sqrt(max(var, 0.0))
    return [max(0.0, auc - half), min(1.0, auc + half)]


def brier_score(labels: Sequence, scores: Sequence) -> float | None:
    """Mean of (P(malignant) - label)^2: 0 is perfect, 0.25 is a constant 0.5."""
    y, s = _arrays(labels, scores)
    return float(np.mean((s - y) ** 2)) if y.size else None


def calibration_bins(labels: Sequence, scores: Sequence, bins: int = CALIBRATION_BINS) \
        -> list[dict]:
    """The non-empty bins of ``bins`` equal-width bins over [0, 1], lowest first:
    ``{"low", "high", "n", "mean_probability", "fraction_malignant"}``.

    A probability on an inner edge belongs to the lower bin, as in scikit-learn's
    ``calibration_curve``.
    """
    y, s = _arrays(labels, scores)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], s)
    out = []
    for b in range(bins):
        inside = ids == b
        n = int(inside.sum())
        if n:
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": n,
                        "mean_probability": float(s[inside].mean()),
                        "fraction_malignant": float(y[inside].mean())})
    return out


def expected_calibration_error(labels: Sequence, scores: Sequence,
                               bins: int = CALIBRATION_BINS) -> float | None:
    """Σ over bins of (share of images in the bin) x |fraction malignant - mean probability|."""
    y, _ = _arrays(labels, scores)
    if not y.size:
        return None
    return float(sum(b["n"] / y.size * abs(b["fraction_malignant"] - b["mean_probability"])
                     for b in calibration_bins(labels, scores, bins)))


def _ppv(sens: float, spec: float, prevalence: float) -> float | None:
    den = sens * prevalence + (1 - spec) * (1 - prevalence)
    return sens * prevalence / den if den else None


def _npv(sens: float, spec: float, prevalence: float) -> float | None:
    den = spec * (1 - prevalence) + (1 - sens) * prevalence
    return spec * (1 - prevalence) / den if den else None


def check_prevalence(prevalence: float, where: str = "prevalence") -> float:
    from skin.errors import ConfigError

    try:
        p = float(prevalence)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {prevalence!r} is not a number") from None
    if not 0.0 < p < 1.0:
        raise ConfigError(f"{where}: {prevalence!r} is not valid; expected a share in (0, 1), "
                          "e.g. 0.06 for 6 % malignant")
    return p


def predictive_values(metrics: dict, prevalence: float) -> dict:
    """PPV and NPV at ``prevalence`` from ``metrics``' sensitivity and specificity.

    The interval of each comes from the Wilson intervals of sensitivity and specificity
    (both predictive values grow with both), so it is approximate and on the wide side.
    """
    prevalence = check_prevalence(prevalence)
    sens, spec = metrics.get("sensitivity"), metrics.get("specificity")
    out: dict = {"prevalence": prevalence, "ppv": None, "npv": None,
                 "intervals_95": {"ppv": None, "npv": None}}
    if sens is None or spec is None:
        return out
    out["ppv"], out["npv"] = _ppv(sens, spec, prevalence), _npv(sens, spec, prevalence)
    ci = metrics.get("intervals_95") or {}
    if ci.get("sensitivity") and ci.get("specificity"):
        (s_lo, s_hi), (c_lo, c_hi) = ci["sensitivity"], ci["specificity"]
        for key, f in (("ppv", _ppv), ("npv", _npv)):
            lo, hi = f(s_lo, c_lo, prevalence), f(s_hi, c_hi, prevalence)
            if lo is not None and hi is not None:
                out["intervals_95"][key] = [lo, hi]
    return out


def operating_points(val_labels: Sequence, val_scores: Sequence, test_labels: Sequence,
                     test_scores: Sequence, targets: Sequence[float] = OPERATING_SENSITIVITIES,
                     prevalence: float | None = None) -> list[dict]:
    """For each target sensitivity: the threshold validation chooses for it, the
    validation sensitivity and specificity there, and what it gives on test (sensitivity,
    specificity with Wilson intervals; PPV and NPV at ``prevalence`` when given)."""
    from skin.serving.scoring import choose_threshold, classification_metrics

    rows = []
    for target in targets:
        t = choose_threshold(val_labels, val_scores, target)
        val = classification_metrics(val_labels, val_scores, t, extended=False)
        test = classification_metrics(test_labels, test_scores, t, extended=False)
        row = {"target_sensitivity": float(target), "threshold": t,
               "validation": {k: val[k] for k in ("sensitivity", "specificity")},
               "test": {k: test[k] for k in ("sensitivity", "specificity", "confusion_matrix")},
               }
        row["test"]["intervals_95"] = {k: test["intervals_95"][k]
                                       for k in ("sensitivity", "specificity")}
        if prevalence is not None:
            pv = predictive_values(test, prevalence)
            row["test"].update(ppv=pv["ppv"], npv=pv["npv"])
        rows.append(row)
    return rows


def extended_metrics(labels: Sequence, scores: Sequence) -> dict:
    """The figures :func:`skin.serving.scoring.classification_metrics` adds: the Brier score, the
    expected calibration error and the calibration bins (the AUC interval goes with the
    other intervals, in ``intervals_95``)."""
    return {
        "brier": brier_score(labels, scores),
        "ece": expected_calibration_error(labels, scores),
        "calibration": {"bins": CALIBRATION_BINS, "binning": "equal-width over [0, 1]",
                        "table": calibration_bins(labels, scores)},
    }
