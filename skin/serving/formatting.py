"""How every report writes numbers: one formatter.

:func:`fmt` writes any value (a figure, a score, a hyperparameter); :func:`figure_rows`
gives the figures of :func:`skin.serving.scoring.classification_metrics` as rows, with their
95 % intervals (:func:`interval_text`), for the text of ``skin evaluate``, the model
card, ``report.html`` and the summary of ``skin run``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

MISSING = "n/a"


def fmt(value: Any, digits: int = 3, *, style: str = "f") -> str:
    """``value`` as a report shows it. None: "n/a". A real number that is not an integer:
    ``digits`` decimals (``style="f"``), ``digits`` significant digits (``"g"``), or
    (``"auto"``) decimals unless it is non-zero and under ``10**(1 - digits)``, then in
    scientific notation with 3 significant digits: at least two significant digits always
    show (a learning rate of 1e-5 stays readable).
    Anything else (an int, a string, a bool): ``str(value)``."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or isinstance(value, numbers.Integral):
        return str(value)
    value = float(value)
    if style == "g":
        return f"{value:.{digits}g}"
    if style == "auto" and value != 0 and math.isfinite(value) and abs(value) < 10 ** (1 - digits):
        return f"{value:.2e}"
    if style not in ("f", "auto"):
        raise ValueError(f"style: {style!r}; expected 'f', 'g' or 'auto'")
    return f"{value:.{digits}f}"


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
    """The figures of :func:`skin.serving.scoring.classification_metrics` as rows for any report (the text of
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
        rows.append({"key": key, "name": name, "value": fmt(metrics[key], digits),
                     "interval": interval, "method": methods.get(key, "") if interval else "",
                     "note": note})
    pv = metrics.get("at_prevalence")
    if pv:
        for key, name in (("ppv", "PPV"), ("npv", "NPV")):
            interval = interval_text(pv, key, sep)
            rows.append({"key": key, "name": name, "value": fmt(pv.get(key), digits),
                         "interval": interval,
                         "method": "from the Wilson bounds" if interval else "",
                         "note": f"at a prevalence of {100 * pv['prevalence']:.3g} %"})
    return rows
