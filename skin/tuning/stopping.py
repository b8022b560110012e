"""Median early stopping (``search.early_stopping: {rule: median, ...}``) for random and Bayesian
searches, decided by the chief.

The rule is Katib's ``medianstop`` (Golovin et al., "Google Vizier", 2017): at epoch
``e >= start_epoch`` a running trial is stopped when its best objective by epoch ``e``
is strictly worse than the median, over the completed trials, of their running average
objective over epochs ``1..e``; it needs ``min_trials`` such completed trials first.
Completed trials are the ones that trained their whole length (a stopped trial's short
curve does not set the bar; confirmation trials are never stopped).

Every epoch report (``UpdateTrial``) feeds the trial's learning curve, kept in the trial's
record (``meta["curve"]``: the objective after each epoch, so a restarted chief still
has it). When the rule fires, the record notes ``meta["stopped"] = {"epoch", "best",
"median"}`` and the reply to that report (and to any later one) carries the trial with
status ``STOPPED``, the field keras-tuner's protocol has for it; the worker ends the trial
at once with the metrics it has, and the trial counts as completed with that partial score.

:class:`MedianStopping` only reads the oracle's trials; the oracle calls :meth:`observe`
from ``report`` with its lock held. ``bench/search_replay.py`` drives the same object.
"""

from __future__ import annotations

import logging
import statistics

log = logging.getLogger("skin.tuning")

CONFIRMS_KEY = "tuner/confirms"  # skin.tuning.confirm: the trial a confirmation trial repeats


def running_average(curve: list[float], epochs: int) -> float:
    return statistics.fmean(curve[:epochs])


class MedianStopping:
    """Katib's median stopping rule over the curves in the oracle's trial records."""

    def __init__(self, objective, start_epoch: int, min_trials: int):
        self.objective = objective  # keras_tuner.Objective: name and direction
        self.start_epoch = int(start_epoch)
        self.min_trials = int(min_trials)

    @classmethod
    def from_experiment(cls, exp, objective) -> MedianStopping | None:
        es = exp.search.early_stopping
        if es.rule == "none":
            return None
        return cls(objective, es.start_epoch, es.min_trials)

    # -- the rule ------------------------------------------------------------------------

    def median_at(self, curves: list[list[float]], epochs: int) -> float | None:
        """The median of the curves' running averages over ``epochs``; None with too few."""
        usable = [c for c in curves if len(c) >= epochs]
        if len(usable) < self.min_trials:
            return None
        return statistics.median(running_average(c, epochs) for c in usable)

    def best_by(self, curve: list[float], epochs: int) -> float:
        values = curve[:epochs]
        return max(values) if self.objective.direction == "max" else min(values)

    def decide(self, curve: list[float], completed: list[list[float]]) -> dict | None:
        """``{"epoch", "best", "median"}`` when a trial with ``curve`` (the objective after each
        epoch so far) must stop, given the completed trials' curves; else None."""
        epochs = len(curve)
        if epochs < self.start_epoch:
            return None
        median = self.median_at(completed, epochs)
        if median is None:
            return None
        best = self.best_by(curve, epochs)
        if best != median and self.objective.better_than(median, best):
            return {"epoch": epochs, "best": float(best), "median": float(median)}
        return None

    # -- the chief's hook ----------------------------------------------------------------

    def completed_curves(self, oracle) -> list[list[float]]:
        out = []
        for tid, trial in oracle.trials.items():
            meta = oracle.meta.get(tid, {})
            if trial.status == "COMPLETED" and not meta.get("stopped") and meta.get("curve") \
                    and CONFIRMS_KEY not in trial.hyperparameters.values:
                out.append(meta["curve"])
        return out

    def observe(self, oracle, trial_id: str, metrics: dict, step: int) -> bool:
        """Record epoch ``step + 1`` of a running trial; True when it must stop (lock held)."""
        meta = oracle.meta[trial_id]
        if meta.get("stopped"):
            return True
        name = self.objective.name
        if name not in metrics:
            return False
        curve = list(meta.get("curve") or [])[: int(step)]
        curve += [float("nan")] * (int(step) - len(curve))  # an epoch never reported (rare)
        curve.append(float(metrics[name]))
        meta["curve"] = curve
        trial = oracle.trials[trial_id]
        if CONFIRMS_KEY in trial.hyperparameters.values or any(v != v for v in curve):
            return False
        decision = self.decide(curve, self.completed_curves(oracle))
        if decision is None:
            return False
        meta["stopped"] = decision
        log.info("trial %s stopped early at epoch %d (median rule): best %s %.4f is worse than "
                 "the completed trials' median running average %.4f", trial_id,
                 decision["epoch"], name, decision["best"], decision["median"])
        oracle.listener.trial_stopped_early(trial_id)
        return True


def stopped_reply(trial):
    """A copy of ``trial`` for the UpdateTrial reply with status STOPPED (the oracle's own
    trial keeps running until the worker ends it)."""
    from keras_tuner.src.engine import trial as trial_module

    return trial_module.Trial(trial.hyperparameters, trial_id=trial.trial_id,
                              status=trial_module.TrialStatus.STOPPED)
