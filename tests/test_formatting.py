"""skin.serving.formatting.fmt: the one way every report writes a value (skin evaluate, the model
card, report.html, the summary of skin run)."""

from __future__ import annotations

import numpy as np
import pytest

from skin.serving.formatting import figure_rows, fmt, interval_text


@pytest.mark.parametrize("value, digits, style, expected", [
    (None, 3, "f", "n/a"),
    (0.87654, 3, "f", "0.877"),
    (np.float32(0.5), 3, "f", "0.500"),
    (1, 3, "f", "1"),                     # an int (epochs, filters) stays as it is
    (True, 3, "f", "True"),
    ("relu", 4, "g", "relu"),
    (0.812345, 4, "g", "0.8123"),
    (12.3456, 4, "g", "12.35"),
    (0.81234, 4, "auto", "0.8123"),
    (0.0, 4, "auto", "0.0000"),
    (0.001, 4, "auto", "0.0010"),
    (0.0003, 4, "auto", "3.00e-04"),      # a learning rate keeps its digits
    (-2e-05, 4, "auto", "-2.00e-05"),
])
def test_fmt(value, digits, style, expected):
    assert fmt(value, digits, style=style) == expected


def test_fmt_refuses_an_unknown_style():
    with pytest.raises(ValueError, match="style"):
        fmt(0.5, style="percent")


def test_figure_rows_and_intervals():
    metrics = {"accuracy": 0.9, "roc_auc": None, "intervals_95": {"accuracy": [0.8, 0.95]},
               "interval_methods": {"accuracy": "Wilson"},
               "at_prevalence": {"prevalence": 0.062, "ppv": 0.25, "npv": 0.99,
                                 "intervals_95": {"ppv": [0.1, 0.4]}}}
    assert interval_text(metrics, "accuracy", " – ") == "0.800 – 0.950"
    assert interval_text(metrics, "roc_auc") == ""
    rows = {r["key"]: r for r in figure_rows(metrics)}
    assert list(rows) == ["accuracy", "roc_auc", "ppv", "npv"]
    assert rows["accuracy"] == {"key": "accuracy", "name": "Accuracy", "value": "0.900",
                                "interval": "0.800-0.950", "method": "Wilson", "note": ""}
    assert rows["roc_auc"]["value"] == "n/a" and rows["roc_auc"]["method"] == ""
    assert rows["ppv"]["interval"] == "0.100-0.400" and rows["npv"]["interval"] == ""
    assert rows["ppv"]["note"] == "at a prevalence of 6.2 %"
