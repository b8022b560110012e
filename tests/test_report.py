"""skin.report: the search picture (PNG) and the self-contained HTML page."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from skin.report import render_search_report, top_trials, trials_of


def result(objective="val_auc", **extra) -> dict:
    """A result.json as the chief writes it: trials in creation order, trials by status."""
    scores = [0.62, 0.71, None, 0.69, 0.84, None, 0.77, 0.80, None]
    statuses = ["COMPLETED", "COMPLETED", "FAILED", "COMPLETED", "COMPLETED", "RECLAIMED",
                "COMPLETED", "COMPLETED", "INVALID"]
    trials = [{"id": f"{i:02d}", "status": st, "score": sc,
               "hyperparameters": {"learning_rate": 10 ** -(2 + i % 3), "filters": 16 * (1 + i % 3),
                                   "tuner/epochs": 2, "tuner/bracket": 1},
               "worker": f"tuner{i % 2}", "epochs": 2 if sc is not None else 1,
               "duration": 30.0 + i, "attempts": [], "continues": None}
              for i, (st, sc) in enumerate(zip(statuses, scores))]
    by_status = {}
    for t in trials:
        by_status.setdefault(t["status"].lower(), []).append(t["id"])
    return {"experiment": "demo <&>", "outcome": "completed", "tuner": "hyperband",
            "objective": objective, "direction": "max", "trials": trials,
            "counts": {k: len(v) for k, v in by_status.items()}, "trials_by_status": by_status,
            **extra}


def test_png_and_html_show_the_search(tmp_path):
    png, html = render_search_report(result(), tmp_path / "out")
    assert (png.name, html.name) == ("search.png", "report.html")
    image = Image.open(png)
    assert image.format == "PNG" and image.width > 600 and image.height > 400
    page = html.read_text()
    # Self-contained: the same PNG embedded, no other file referenced.
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1)
    assert base64.b64decode(embedded) == png.read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<title>Search report: demo &lt;&amp;&gt;</title>" in page
    assert "best <b>0.8400</b> by trial 04" in page
    for status, count in (("completed", 6), ("failed", 1), ("invalid", 1), ("reclaimed", 1)):
        assert f"<td class=\"l\">{status}</td><td>{count}</td>" in page
    top = page.split("<h2>Top 5 trials</h2>")[1].split("</table>")[0]
    assert [r for r in re.findall(r'<tr><td class="l">(\d\d)</td>', top)] == \
        ["04", "07", "06", "01", "03"]
    assert "learning_rate" in top and "filters" in top
    assert "tuner/" not in page  # Hyperband's bookkeeping is not a hyperparameter
    every = page.split("<h2>Every trial</h2>")[1]
    assert every.count("<tr") == 1 + 9
    assert '<tr class="best"><td class="l">04</td>' in every


def test_a_minimised_objective_ranks_the_lowest_first(tmp_path):
    res = result(objective={"name": "val_loss", "direction": "min"}, direction=None)
    trials = trials_of(res)
    assert [t.trial_id for t in top_trials(trials, "min", 3)] == ["00", "03", "01"]
    _, html = render_search_report(res, tmp_path)
    assert "best <b>0.6200</b> by trial 00" in html.read_text()
    assert "minimised" in html.read_text()


def test_lenient_input_shapes(tmp_path):
    # A mapping of trials, `id`, `duration`, keras-tuner's HyperParameters config, no counts.
    res = {"objective": "val_accuracy", "trials": {
        "b": {"status": "completed", "score": 0.5, "duration": 12,
              "hyperparameters": {"space": [], "values": {"dropout": 0.3}}},
        "a": {"status": "failed", "score": None}}}
    trials = trials_of(res)
    assert [(t.trial_id, t.status, t.duration_s) for t in trials] == \
        [("b", "completed", 12.0), ("a", "failed", None)]
    assert trials[0].hyperparameters == {"dropout": 0.3}
    png, html = render_search_report(res, tmp_path)
    page = html.read_text()
    assert '<td class="l">completed</td><td>1</td>' in page
    assert '<td class="l">failed</td><td>1</td>' in page
    assert Image.open(io.BytesIO(png.read_bytes())).format == "PNG"


FAILED_SEARCH = {"outcome": "failed", "reason": "no trial completed", "tuner": "random",
                 "objective": "val_auc", "direction": "max", "best": None, "counts": {},
                 "trials_by_status": {}, "trials": []}  # as the chief writes it


@pytest.mark.parametrize("res", [FAILED_SEARCH, dict(FAILED_SEARCH, trials=[
    {"id": "0", "status": "failed", "score": None, "hyperparameters": {}}])])
def test_no_completed_trials_still_renders(tmp_path, res):
    png, html = render_search_report(res, tmp_path)
    assert png.stat().st_size > 1000
    assert "Top 0 trials" in html.read_text()


def test_counts_from_trial_id_lists(tmp_path):
    res = result()
    del res["counts"]
    _, html = render_search_report(res, tmp_path)
    page = html.read_text()
    assert '<td class="l">completed</td><td>6</td>' in page
    assert '<td class="l">reclaimed</td><td>1</td>' in page
