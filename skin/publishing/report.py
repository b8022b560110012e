"""The run report: a small self-contained HTML page (``report.html``) and the search's PNG.

With the published model's ``metrics.json`` the page starts with the model
(:mod:`skin.publishing.run_report`: test figures with intervals, ROC, confusion matrix, reliability
diagram, operating points), then shows the search.

:func:`render_search_report` takes the chief's ``<root>/tuner/result.json``
(every trial's id, status, score, hyperparameters, worker, epochs, duration;
trials by status) and draws the objective of every trial in order with the
best-so-far line, and the top trials' hyperparameters as a table. The HTML
page embeds the PNG (base64) and adds the counts by status and every trial,
so it can be mailed or opened from the bucket without anything beside it.

The result is a :class:`skin.infra.documents.SearchResult` (read, and its shape checked, by
``skin.tuning.load_result``); the retrain renders the report under a try: a report that
fails never stops a model from being published.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skin.infra.artifacts import REPORT_HTML, SEARCH_PNG
from skin.infra.documents import SearchResult
from skin.metrics import TRIAL_END_STATUSES
from skin.publishing.plots import pyplot
from skin.serving.formatting import fmt

TOP_TRIALS = 5


@dataclass
class TrialRow:
    trial_id: str
    status: str
    score: float | None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    worker: str = ""
    epochs: int | None = None
    duration_s: float | None = None
    stopped_at: int | None = None  # the epoch the early-stopping rule ended it at


def trials_of(result: SearchResult) -> list[TrialRow]:
    """The result's trials in the order they were created (numeric ids), else as written."""
    rows = [TrialRow(trial_id=t.id, status=t.status,
                     score=t.score if t.score is not None and math.isfinite(t.score) else None,
                     hyperparameters=t.hyperparameters,
                     worker=t.worker or "", epochs=t.epochs, duration_s=t.duration,
                     stopped_at=t.stopped_at)
            for t in result.trials]
    if rows and all(r.trial_id.isdigit() for r in rows):
        rows.sort(key=lambda r: int(r.trial_id))
    return rows


def counts_of(result: SearchResult, trials: list[TrialRow]) -> dict[str, int]:
    """Trials by status: the result's own ``counts`` if it has any, else counted here (a
    search that failed before any trial writes none)."""
    if result.counts:
        return dict(result.counts)
    counts = {s: 0 for s in TRIAL_END_STATUSES}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    return counts




def _draw(trials: list[TrialRow], objective: str, direction: str, top: list[TrialRow]) -> bytes:
    names = sorted({k for t in top for k in t.hyperparameters})
    table_rows = 2 + len(names)
    plt = pyplot()
    from matplotlib import transforms

    fig = plt.figure(figsize=(10, 4.2 + 0.28 * table_rows), dpi=110)
    grid = fig.add_gridspec(2, 1, height_ratios=[4.2, 0.3 + 0.28 * table_rows], hspace=0.35)
    ax = fig.add_subplot(grid[0])
    # keras-tuner's ids count trials from 0 in creation order; other ids are numbered here.
    numeric = bool(trials) and all(t.trial_id.isdigit() for t in trials)
    xs = [int(t.trial_id) for t in trials] if numeric else list(range(len(trials)))
    best_x, best_y, best = [], [], None
    for x, t in zip(xs, trials):
        if t.status == "completed" and t.score is not None:
            if best is None or (t.score > best if direction == "max" else t.score < best):
                best = t.score
            best_x.append(x)
            best_y.append(best)
    done = [(x, t.score) for x, t in zip(xs, trials) if t.score is not None and t.status == "completed"]
    if done:
        ax.scatter([x for x, _ in done], [y for _, y in done], s=22, color="#1f77b4", zorder=3,
                   label="completed trial")
        ax.step(best_x + [xs[-1]], best_y + [best_y[-1]], where="post", color="#d62728",
                linewidth=1.8, label="best so far")
        best_trial = top[0] if top else None
        if best_trial is not None:
            bx = next(x for x, t in zip(xs, trials) if t is best_trial)
            ax.annotate(f"trial {best_trial.trial_id}: {best_trial.score:.4f}", (bx, best_trial.score),
                        textcoords="offset points", xytext=(6, -12 if direction == "max" else 6),
                        fontsize=8)
    others = [(x, t.status) for x, t in zip(xs, trials)
              if not (t.status == "completed" and t.score is not None)]
    if others:
        # No score to place them by: ticks along the bottom, coloured by status.
        bottom = transforms.blended_transform_factory(ax.transData, ax.transAxes)
        colors = {"failed": "#d62728", "invalid": "#ff7f0e", "reclaimed": "#9467bd"}
        for status in sorted({s for _, s in others}):
            px = [x for x, s in others if s == status]
            ax.scatter(px, [0.03] * len(px), marker="x", s=30, transform=bottom,
                       color=colors.get(status, "#7f7f7f"), label=status, zorder=3)
    ax.set_xlabel("trial" if numeric else "trial (in order)")
    ax.margins(y=0.1)
    ax.set_ylabel(objective)
    arrow = "higher" if direction == "max" else "lower"
    ax.set_title(f"Search: {objective} of {len(trials)} trials ({arrow} is better)")
    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if done or others:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes)

    tab = fig.add_subplot(grid[1])
    tab.axis("off")
    if top:
        cells = [[fmt(t.score, 4, style="g") for t in top],
                 [str(t.epochs if t.epochs is not None else "-") for t in top]]
        cells += [[fmt(t.hyperparameters.get(n, "-"), 4, style="g") for t in top] for n in names]
        table = tab.table(cellText=cells, rowLabels=[objective, "epochs"] + names,
                          colLabels=[f"trial {t.trial_id}" for t in top], loc="upper center",
                          cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.15)
        tab.set_title(f"Top {len(top)} trials", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right;font-size:13px}th{background:#f3f3f3}td.l,th.l{text-align:left}
img{max-width:100%}.best{background:#fff4d6}"""


def html_table(header: list[str], rows: list[list[Any]], classes: list[str] | None = None,
               left: int = 1, *, markup: bool = False) -> str:
    """An HTML table, the first ``left`` columns aligned left; ``classes``: a CSS class per
    row. Cells are values, written with :func:`skin.serving.formatting.fmt` and escaped, or with
    ``markup`` HTML already (:mod:`skin.publishing.run_report`'s). The header is always escaped."""
    def cell(tag: str, i: int, v, as_markup: bool) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{v if as_markup else html.escape(fmt(v, 4, style='g'))}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", i, h, False) for i, h in enumerate(header))
           + "</tr>"]
    for j, row in enumerate(rows):
        cls = f' class="{classes[j]}"' if classes and classes[j] else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", i, v, markup) for i, v in enumerate(row))
                   + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _search_sections(result: SearchResult, published: dict | None, trials: list[TrialRow],
                     top: list[TrialRow], counts: dict[str, int], png: bytes) -> list[str]:
    objective, direction = result.objective, result.direction
    best = top[0] if top else None
    summary = (f"{len(trials)} trials; objective <b>{html.escape(objective)}</b> "
               f"({'maximised' if direction == 'max' else 'minimised'})")
    if best is not None:
        summary += (f"; best <b>{best.score:.4f}</b> by trial {html.escape(best.trial_id)}")
    names = sorted({k for t in top for k in t.hyperparameters})
    top_rows = [[t.trial_id, t.score, t.epochs if t.epochs is not None else "-",
                 *[t.hyperparameters.get(n, "-") for n in names]] for t in top]
    stopped = sum(1 for t in trials if t.stopped_at)
    if stopped:
        summary += f"; {stopped} stopped early by the median rule (partial scores)"
    all_rows = [[t.trial_id, t.status + (f" (stopped at epoch {t.stopped_at})" if t.stopped_at
                                         else ""), "-" if t.score is None else t.score,
                 "-" if t.epochs is None else t.epochs,
                 "-" if t.duration_s is None else round(t.duration_s, 1), t.worker or "-"]
                for t in trials]
    best_id = best.trial_id if best else None
    image = base64.b64encode(png).decode("ascii")
    published = _published_section(published, objective)
    return [
        "<h2>The search</h2>", f"<p>{summary}</p>",
        "<h2>Trials by status</h2>",
        html_table(["status", "trials"], [[k, v] for k, v in counts.items()]),
        f'<img alt="objective of every trial with the best so far" '
        f'src="data:image/png;base64,{image}">',
        *published,
        *_confirmation_section(result.confirmation, objective),
        f"<h2>Top {len(top)} trials</h2>",
        html_table(["trial", objective, "epochs", *names], top_rows),
        "<h2>Every trial</h2>",
        html_table(["trial", "status", objective, "epochs", "seconds", "worker"], all_rows,
                    classes=["best" if r[0] == best_id else "" for r in all_rows], left=2)]


def _page(title: str, sections: list[str]) -> str:
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>", *sections, "</body></html>", ""])


def _published_section(published, objective: str) -> list[str]:
    """The published model's members (an ensemble and/or test-time augmentation), when the
    retrain passes ``published``: ``{"version", "tta_views", "validation_auc",
    "members": [{"trial_id", "score", "validation_auc", "validation_auc_tta",
    "hyperparameters"}]}``."""
    if not isinstance(published, dict) or not published.get("members"):
        return []
    members = [m for m in published["members"] if isinstance(m, dict)]
    views = published.get("tta_views") or 1
    what = (f"the mean of {len(members)} retrained trials" if len(members) > 1
            else "one retrained trial")
    if views > 1:
        what += f", averaged over {views} views of each image (test-time augmentation)"
    names = sorted({k for m in members for k in (m.get("hyperparameters") or {})})
    tta = views > 1
    rows = [[m.get("trial_id"), m.get("score"), m.get("validation_auc"),
             *([m.get("validation_auc_tta")] if tta else []),
             *[(m.get("hyperparameters") or {}).get(n, "-") for n in names]] for m in members]
    rows.append(["published", "-", "-" if tta else published.get("validation_auc"),
                 *([published.get("validation_auc")] if tta else []), *["" for _ in names]])
    version = html.escape(str(published.get("version") or ""))
    return [f"<h2>Published model {version}: its members</h2>", f"<p>{html.escape(what)}.</p>",
            html_table(["trial", objective, "validation ROC AUC",
                         *(["with TTA"] if tta else []), *names], rows,
                        classes=[""] * len(members) + ["best"])]


def _confirmation_section(confirmation, objective: str) -> list[str]:
    """The confirmation of the pick (search.confirm; skin.tuning.confirm.summary): every
    candidate's scores over seeds (each with its validation fold when there are folds),
    mean and standard deviation, and the margin."""
    if not isinstance(confirmation, dict) or not confirmation.get("candidates"):
        return []
    candidates = [c for c in confirmation["candidates"] if isinstance(c, dict)]
    on_folds = any(any(c.get("folds") or []) for c in candidates)

    def scores(c: dict) -> str:
        values = [fmt(float(v), 4, style="g") for v in c.get("scores") or []]
        if on_folds and len(c.get("folds") or []) == len(values):
            values = [f"{v} (fold {f})" for v, f in zip(values, c["folds"])]
        return ", ".join(values)

    rows = [[c.get("trial_id"), c.get("n"), c.get("mean"), c.get("std"), scores(c)]
            for c in candidates]
    chosen = confirmation.get("chosen")
    return ["<h2>Confirmation of the pick</h2>",
            f"<p>{html.escape(str(confirmation.get('text') or ''))}.</p>",
            html_table(["trial", "trainings", f"mean {objective}", "std",
                         "scores (validation fold)" if on_folds else "scores"], rows,
                        classes=["best" if r[0] == chosen else "" for r in rows])]


def render_search_report(result: SearchResult | None, out_dir, metrics: dict | None = None,
                         published: dict | None = None) -> tuple[Path | None, Path]:
    """Write ``report.html`` (and ``search.png`` when there is a search ``result``) into
    ``out_dir``; their paths. With ``metrics`` (the published version's ``metrics.json``)
    the page is the run report: the model's figures and the plots beside it in
    ``out_dir`` (:mod:`skin.publishing.run_report`) first, then the search; ``published``: the
    published model's members (skin.publishing.retrain), shown with the search."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    name = ((metrics or {}).get("experiment") or {}).get("name")
    if metrics is not None:
        from skin.publishing.run_report import model_sections

        sections += model_sections(metrics, out)
    png_path = None
    if result is not None:
        trials = trials_of(result)
        rows = {t.trial_id: t for t in trials}
        top = [rows[t.id] for t in result.ranked()[:TOP_TRIALS]]
        counts = counts_of(result, trials)
        png = _draw(trials, result.objective, result.direction, top)
        png_path = out / SEARCH_PNG
        png_path.write_bytes(png)
        sections += _search_sections(result, published, trials, top, counts, png)
    else:
        sections.append("<h2>The search</h2><p>No search result was found in the bucket.</p>")
    title = ("Run report" if metrics is not None else "Search report") + (
        f": {name}" if name else "")
    html_path = out / REPORT_HTML
    html_path.write_text(_page(title, sections), encoding="utf-8")
    return png_path, html_path
