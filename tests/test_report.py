"""skin.publishing.report: the search picture (PNG) and the self-contained HTML page."""

from __future__ import annotations

import base64
import re

import pytest
from PIL import Image

from skin.infra.documents import SearchResult
from skin.publishing.report import render_search_report


def result(objective="val_auc", direction="max", **extra) -> SearchResult:
    """A result.json as the chief writes it (skin.tuning.results.build_result): trials in
    creation order, trials by status, read back the way every reader reads it."""
    scores = [0.62, 0.71, None, 0.69, 0.84, None, 0.77, 0.80, None]
    statuses = ["completed", "completed", "failed", "completed", "completed", "reclaimed",
                "completed", "completed", "invalid"]
    trials = [{"id": f"{i:02d}", "status": st, "score": sc,
               "hyperparameters": {"learning_rate": 10 ** -(2 + i % 3), "filters": 16 * (1 + i % 3)},
               "worker": f"tuner{i % 2}", "epochs": 2 if sc is not None else 1,
               "duration": 30.0 + i, "attempts": [], "message": None, "continues": None,
               "stopped_at": None, "confirms": None, "seed": None, "fold": None}
              for i, (st, sc) in enumerate(zip(statuses, scores))]
    by_status = {}
    for t in trials:
        by_status.setdefault(t["status"], []).append(t["id"])
    return SearchResult.from_json({
        "outcome": "completed", "reason": "", "tuner": "hyperband", "objective": objective,
        "direction": direction, "started_at": 0.0, "finished_at": 60.0, "best": None,
        "counts": {k: len(v) for k, v in by_status.items()}, "trials_by_status": by_status,
        "stopped_early": [], "confirmation": None, "attempts_by_status": {}, "trials": trials,
        **extra})


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
    assert "<title>Search report</title>" in page
    assert "best <b>0.8400</b> by trial 04" in page
    for status, count in (("completed", 6), ("failed", 1), ("invalid", 1), ("reclaimed", 1)):
        assert f"<td class=\"l\">{status}</td><td>{count}</td>" in page
    top = page.split("<h2>Top 5 trials</h2>")[1].split("</table>")[0]
    assert [r for r in re.findall(r'<tr><td class="l">(\d\d)</td>', top)] == \
        ["04", "07", "06", "01", "03"]
    assert "learning_rate" in top and "filters" in top
    every = page.split("<h2>Every trial</h2>")[1]
    assert every.count("<tr") == 1 + 9
    assert '<tr class="best"><td class="l">04</td>' in every


def test_a_minimised_objective_ranks_the_lowest_first(tmp_path):
    res = result(objective="val_loss", direction="min")
    assert [t.id for t in res.ranked()[:3]] == ["00", "03", "01"]
    _, html = render_search_report(res, tmp_path)
    assert "best <b>0.6200</b> by trial 00" in html.read_text()
    assert "minimised" in html.read_text()


FAILED_SEARCH = {"outcome": "failed", "reason": "no trial completed", "tuner": "random",
                 "objective": "val_auc", "direction": "max", "best": None, "counts": {},
                 "trials_by_status": {}, "trials": []}  # as the chief writes it


@pytest.mark.parametrize("res", [FAILED_SEARCH, dict(FAILED_SEARCH, trials=[
    {"id": "0", "status": "failed", "score": None, "hyperparameters": {}}])])
def test_no_completed_trials_still_renders(tmp_path, res):
    png, html = render_search_report(SearchResult.from_json(res), tmp_path)
    assert png.stat().st_size > 1000
    assert "Top 0 trials" in html.read_text()
    assert '<td class="l">failed</td><td>' in html.read_text()
