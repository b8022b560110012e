"""What the bucket says about experiments, read from the bucket alone (no chief, no cluster).

An experiment root ``gs://<bucket>/<prefix>/<name>/`` holds ``data/manifest.json`` once
staged, ``tuner/oracle/…`` while the chief searches (its journal and trial records,
:mod:`skin.tuning.journal`), ``tuner/result.json`` when the search ended and
``models/LATEST`` once a model was published. :func:`experiment_state` reads them into one
summary with a state:

- ``published``: ``models/LATEST`` names a version (its test figures are read too);
- ``failed``: the search ended with outcome ``failed`` (and nothing was published);
- ``retraining``: the search completed and no model is published yet;
- ``searching``: the chief's state is there but no result yet;
- ``staged``: only the data;
- ``empty``: nothing of an experiment.

``skin status`` falls back to it when it cannot reach the chief; :func:`list_experiments`
finds every experiment root below a bucket or prefix.
"""

from __future__ import annotations

import logging
from typing import Any

from skin.errors import DocumentError
from skin.infra import artifacts, documents
from skin.tuning.journal import OracleStore

log = logging.getLogger(__name__)

STATES = ("staged", "searching", "retraining", "published", "failed", "empty")


def _read_json(storage, uri: str) -> Any | None:
    try:
        return storage.read_json(uri)
    except FileNotFoundError:
        return None
    except ValueError as e:
        log.warning("%s is not valid JSON: %s", uri, e)
        return None


def _read_document(read, storage, where: str):
    """``read(storage, where)`` (skin.infra.documents.read_*); None when absent or, said, when of
    another shape."""
    try:
        return read(storage, where)
    except FileNotFoundError:
        return None
    except DocumentError as e:  # not one this version reads: said, and left out
        log.warning("%s", e)
        return None


def _read_text(storage, uri: str) -> str | None:
    try:
        return storage.read_text(uri)
    except FileNotFoundError:
        return None


def _oracle_counts(storage, root: str) -> dict[str, int] | None:
    """Trials by status from the chief's journal and trial records (None when absent)."""
    prefix = artifacts.oracle_uri(root)
    if not storage.list(prefix + "/"):
        return None
    try:
        loaded = OracleStore(storage, prefix).load()
    except (ValueError, KeyError, TypeError) as e:
        log.warning("cannot read the search state under %s: %s", prefix, e)
        return {}
    counts: dict[str, int] = {}
    for record in loaded.records.values():
        status = str((record.get("trial") or {}).get("status") or "unknown").lower()
        counts[status] = counts.get(status, 0) + 1
    return counts


def experiment_state(storage, root: str) -> dict:
    """The summary of the experiment at ``root`` (``gs://bucket/prefix/name``)."""
    root = root.rstrip("/")
    out: dict[str, Any] = {"experiment": root.rsplit("/", 1)[-1], "root": root,
                           "state": "empty", "staged": False, "images": None,
                           "synthetic": None, "trials": {}, "outcome": None, "reason": "",
                           "best": None, "objective": None, "published": None,
                           "test": None}
    manifest = _read_document(documents.read_manifest, storage, artifacts.data_uri(root))
    if manifest is not None:
        out["staged"] = True
        out["images"] = {k: manifest.count(k) for k in manifest.splits}
        out["synthetic"] = bool(manifest.synthetic)
        out["state"] = "staged"
    counts = _oracle_counts(storage, root)
    if counts is not None:
        out["trials"] = counts
        out["state"] = "searching"
    result = _read_document(documents.read_result, storage, root)
    if result is not None:
        out["outcome"], out["reason"], out["objective"] = (result.outcome, result.reason,
                                                          result.objective)
        if result.counts:
            out["trials"] = dict(result.counts)
        if result.best is not None:
            out["best"] = {"trial_id": result.best["trial_id"], "score": result.best["score"]}
        out["state"] = "failed" if out["outcome"] == "failed" else "retraining"
    latest = _read_text(storage, artifacts.latest_uri(root))
    if latest and latest.strip():
        version = latest.strip()
        out["published"] = version
        out["state"] = "published"
        metrics = _read_json(storage, artifacts.model_file_uri(root, version, artifacts.METRICS))
        if isinstance(metrics, dict):
            out["test"] = {k: metrics.get(k) for k in (
                "evaluated_on", "n", "roc_auc", "sensitivity", "specificity", "threshold")}
            out["test"]["roc_auc_interval_95"] = (metrics.get("intervals_95") or {}).get(
                "roc_auc")
    return out


def list_experiments(storage, base: str) -> list[dict]:
    """:func:`experiment_state` of every experiment root below ``base`` (a bucket, a
    prefix, or one experiment root), sorted by root."""
    base = base.rstrip("/")
    roots: set[str] = set()
    for uri in storage.list(base + "/"):
        rest = uri[len(base) + 1:]
        for marker in artifacts.MARKERS:
            at = rest.find(marker)
            if at == 0 or (at > 0 and rest[at - 1] == "/"):
                roots.add((base + "/" + rest[:at]).rstrip("/"))
                break
    return [experiment_state(storage, r) for r in sorted(roots)]


def _score(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.4f}"


def format_state(st: dict) -> str:
    """A few lines about one experiment, for ``skin status``'s fallback."""
    lines = [f"experiment {st['experiment']} at {st['root']}: {st['state']}"]
    if st["staged"]:
        images = ", ".join(f"{k} {v}" for k, v in (st["images"] or {}).items())
        lines.append(f"data       staged ({images})" + (" [SYNTHETIC]" if st["synthetic"]
                                                          else ""))
    if st["trials"]:
        lines.append("trials     " + "  ".join(f"{k} {v}" for k, v in sorted(st["trials"].items())))
    if st["outcome"]:
        lines.append(f"search     {st['outcome']}" + (f": {st['reason']}" if st["reason"] else ""))
    if st["best"]:
        lines.append(f"best       {st['objective'] or 'objective'} {_score(st['best']['score'])} "
                     f"(trial {st['best']['trial_id']})")
    if st["published"]:
        line = f"published  {st['published']}"
        t = st.get("test") or {}
        if t.get("roc_auc") is not None:
            ci = t.get("roc_auc_interval_95")
            line += (f" ({t.get('evaluated_on')} ROC AUC {t['roc_auc']:.3f}"
                     + (f", 95 % CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else "") + ")")
        lines.append(line)
    return "\n".join(lines)


def format_table(states: list[dict]) -> str:
    """One line per experiment, for ``skin experiments``."""
    header = f"{'EXPERIMENT':<24} {'STATE':<11} {'TRIALS':>7} {'BEST':>8} {'PUBLISHED':<16} ROOT"
    rows = [header]
    for st in states:
        trials = sum(st["trials"].values()) if st["trials"] else 0
        best = _score((st["best"] or {}).get("score"))
        rows.append(f"{st['experiment']:<24} {st['state']:<11} {trials:>7} {best:>8} "
                    f"{st['published'] or '-':<16} {st['root']}")
    return "\n".join(rows)
