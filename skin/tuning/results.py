"""What a search leaves in the bucket: ``tuner/result.json`` and ``tuner/best_hyperparameters.json``.

``best_hyperparameters.json`` (the retrain reads it; ``skin.infra.documents.BestTrial``)::

    {"trial_id", "score", "objective", "direction", "hyperparameters": {name: value},
     "epochs", "best_epoch", "confirmation"?}

``hyperparameters`` leaves out keras-tuner's bookkeeping (``tuner/epochs`` …);
``epochs`` is how many epochs the best trial trained in all (Hyperband counts
the epochs of the trials it continued), ``best_epoch`` the epoch of its score.

``result.json`` (the run report reads it; ``skin.infra.documents.SearchResult``)::

    {"outcome": "completed" | "failed", "reason", "tuner", "objective", "direction",
     "started_at", "finished_at", "best": {"trial_id", "score"} | null,
     "counts": {status: n}, "trials_by_status": {status: [trial ids]},
     "attempts_by_status": {"completed", "released", "reclaimed", "failed": n},
     "trials": [{"id", "status", "score", "hyperparameters", "worker", "epochs",
                 "duration", "attempts": [{"n", "worker", "status", "reason",
                                           "started", "ended", "epochs"}],
                 "message", "continues", "stopped_at", "confirms", "seed", "fold"}],
     "stopped_early": [trial ids],
     "confirmation": null | {"top", "seeds", "folds", "candidates": [{"trial_id",
                     "hyperparameters", "scores", "folds", "n", "mean", "std", "confirmations"}],
                     "chosen", "best_single", "runner_up", "margin", "margin_se", "verdict",
                     "text"}}

A trial's status is ``completed`` or ``failed`` once it ended; when a search
fails, trials that were still running are ``cancelled``. ``duration`` adds up
the seconds of every attempt. An attempt ends ``completed``, ``released`` (its
worker was preempted and handed it back: not a failure), ``reclaimed`` (its
worker went silent for a lease) or ``failed``; ``first_epoch`` is the epoch
index it resumed at (absent if it finished none). ``continues`` names the trial whose weights a
Hyperband trial started from; ``stopped_at`` the epoch at which the early-stopping rule
ended a trial (null otherwise; such a trial is completed with its partial score);
``confirms``/``seed`` mark a confirmation trial (skin.tuning.confirm), ``fold`` the validation
fold it was scored on (null: the validation split, fold 0). With ``search.confirm``
the best is the candidate with the best mean (``confirmation.chosen``), not the best single
score.

Neither module-level function here imports TensorFlow.
"""

from __future__ import annotations

import time
from typing import Any

from skin.infra.documents import BestTrial, SearchResult, TrialSummary, read_best, read_result

COMPLETED, FAILED_STATUS, CANCELLED = "completed", "failed", "cancelled"
ATTEMPT_STATUSES = ("completed", "released", "reclaimed", "failed")


def load_best(storage, exp) -> BestTrial:
    """The best trial (skin.infra.documents.BestTrial); FileNotFoundError until a search completed,
    DocumentError when the file is not one this version reads."""
    return read_best(storage, exp)


def load_result(storage, exp) -> SearchResult:
    """The search summary (skin.infra.documents.SearchResult); FileNotFoundError until a search
    ended, DocumentError when the file is not one this version reads."""
    return read_result(storage, exp)


def read_outcome(storage, exp) -> dict | None:
    """``{"outcome", "reason"}`` when this experiment's search has ended, else None."""
    try:
        result = load_result(storage, exp)
    except FileNotFoundError:
        return None
    return {"outcome": result.outcome, "reason": result.reason}


def _public_values(values: dict) -> dict:
    return {k: _plain(v) for k, v in values.items() if not k.startswith("tuner/")}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _status(trial, search_failed: bool) -> str:
    status = (trial.status or "").lower()
    if status in (COMPLETED, FAILED_STATUS):
        return status
    return CANCELLED if search_failed else status or "unknown"


def build_result(oracle, exp) -> SearchResult:
    """result.json from the chief's oracle (takes the oracle's lock)."""
    from skin.tuning.oracle_state import FAILED  # keras-tuner and TensorFlow: only the chief

    with oracle.lock:
        failed = oracle.state == FAILED
        trials = []
        by_status: dict[str, list[str]] = {}
        attempts_by: dict[str, int] = {k: 0 for k in ATTEMPT_STATUSES}
        for tid in sorted(oracle.trials, key=lambda t: (len(t), t)):
            trial, meta = oracle.trials[tid], oracle.meta.get(tid, {})
            attempts = meta.get("attempts", [])
            status = _status(trial, failed)
            by_status.setdefault(status, []).append(tid)
            for a in attempts:
                if a.get("status"):
                    attempts_by[a["status"]] = attempts_by.get(a["status"], 0) + 1
            duration = sum((a["ended"] or time.time()) - a["started"] for a in attempts)
            trials.append(TrialSummary(
                id=tid,
                status=status,
                score=_plain(trial.score) if trial.score is not None else None,
                hyperparameters=_public_values(trial.hyperparameters.values),
                worker=attempts[-1]["worker"] if attempts else None,
                epochs=int(meta.get("epochs") or 0),
                duration=round(duration, 3),
                attempts=attempts,
                message=(attempts[-1].get("reason") if attempts else None),
                continues=trial.hyperparameters.values.get("tuner/trial_id"),
                stopped_at=(meta.get("stopped") or {}).get("epoch"),  # search.early_stopping
                confirms=trial.hyperparameters.values.get("tuner/confirms"),  # search.confirm
                seed=trial.hyperparameters.values.get("tuner/seed"),
                fold=trial.hyperparameters.values.get("tuner/fold"),
            ))
        best = build_best(oracle, exp)
        return SearchResult(
            outcome=FAILED_STATUS if failed else COMPLETED,
            reason=oracle.reason,
            tuner=exp.search.tuner,
            objective=oracle.objective.name,
            direction=oracle.objective.direction,
            started_at=oracle.started_at,
            finished_at=time.time(),
            best={"trial_id": best.trial_id, "score": best.score} if best else None,
            counts={k: len(v) for k, v in sorted(by_status.items())},
            trials_by_status=by_status,
            stopped_early=[t.id for t in trials if t.stopped_at],
            confirmation=oracle.confirm.summary(oracle) if oracle.confirm else None,
            attempts_by_status=attempts_by,
            trials=trials,
        )


def build_best(oracle, exp) -> BestTrial | None:
    """best_hyperparameters.json from the chief's oracle; None if no trial completed."""
    with oracle.lock:
        completed = [t for t in oracle.trials.values() if t.status == "COMPLETED"
                     and t.score is not None]
        if not completed:
            return None
        best = oracle.get_best_trials(1)[0]
        confirmation = oracle.confirm.summary(oracle) if oracle.confirm else None
        if confirmation is not None:  # the best mean over seeds, not the best single score
            best = oracle.trials[confirmation["chosen"]]
        meta = oracle.meta.get(best.trial_id, {})
        return BestTrial(
            trial_id=best.trial_id,
            score=_plain(best.score),
            objective=oracle.objective.name,
            direction=oracle.objective.direction,
            hyperparameters=_public_values(best.hyperparameters.values),
            epochs=int(meta.get("epochs") or best.hyperparameters.values.get(
                "tuner/epochs", exp.search.max_epochs)),
            best_epoch=int(best.best_step or 0) + 1,
            confirmation=confirmation,
        )
