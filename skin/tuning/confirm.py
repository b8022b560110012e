"""Confirmation of the pick (``search.confirm: {top: K, seeds: S}``): a best that noise did
not decide.

When the search itself is over (the tuner creates no more trials and none of its trials
runs), the chief takes the top ``K`` distinct configurations among the search's completed
trials that trained the whole trial length (not stopped early) and hands out ``S`` more
trials of each, as ordinary trials any worker runs. A confirmation trial carries its
configuration plus two bookkeeping values (keras-tuner's ``tuner/`` prefix, which the
results and the retrain leave out): ``tuner/confirms`` (the trial it repeats) and
``tuner/seed`` (1..S: the hypermodel seeds its initial weights, augmentation and data
order with it, ``skin.model.hypermodel.trial_seed``); under Hyperband also ``tuner/epochs`` = the
trial length, from scratch.

**Folds** (``confirm.folds``, on by default): a seed alone removes training noise but not the
luck of a few hundred validation images. When the staged data hold F > 1 validation folds
of the training part (skin.staging.stage: fold 0 is the validation split the search scored on,
1..F-1 parts of the train split, grouped by lesion), confirmation seed ``s`` of every
candidate also carries ``tuner/fold`` = 1 + (s-1) % (F-1): the hypermodel then trains on
the rest of the training part and validates on that fold (``skin.data.dataset.dataset(fold=...)``).
Every candidate is scored on the same folds, so their means compare. The chief reads F from
the staged manifest once, when confirmation starts (``folds_source``); data staged without
folds, or too few images, leave seeds only (logged). A restarted chief keeps what its
confirmation trials already say: folds only if every one made so far carries one.

When every confirmation trial has ended, the pick is the configuration with the best
**mean** objective over its original trial and its confirmations, not the best single
score. :func:`summary` records every candidate's scores, mean and standard deviation and
the margin of the pick over the runner-up with its standard error ("chosen over trial
03 by 0.004 ± 0.006: within noise"; within noise when the margin is under two standard
errors) for ``result.json``, ``best_hyperparameters.json``, the run report and the
model card.

Everything is derived from the oracle's trials (a restarted chief needs no extra state);
the oracle calls :meth:`Confirmation.next_trial` from ``assign`` and :meth:`done` from
``exhausted`` with its lock held. With ``confirm.top: 0`` the chief has no Confirmation
and nothing changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics

from skin.tuning.stopping import CONFIRMS_KEY

log = logging.getLogger("skin.tuning")

SEED_KEY = "tuner/seed"  # skin.model.hypermodel.SEED_KEY
FOLD_KEY = "tuner/fold"  # skin.model.hypermodel.FOLD_KEY


def public_values(values: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()
            if not k.startswith("tuner/")}


def config_key(values: dict) -> str:
    return hashlib.sha256(json.dumps(public_values(values), sort_keys=True, default=str)
                          .encode()).hexdigest()[:16]


def mean_std(scores: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(scores)
    return mean, (statistics.stdev(scores) if len(scores) > 1 else 0.0)


def fold_of_seed(seed: int, folds: int) -> int | None:
    """The validation fold of confirmation seed ``seed`` (1, 2, ...) with ``folds`` staged
    folds: 1..folds-1 in turn; None without folds."""
    return 1 + (int(seed) - 1) % (folds - 1) if folds > 1 else None


class Confirmation:
    def __init__(self, top: int, seeds: int, max_epochs: int, hyperband: bool = False,
                 folds_source=None):
        self.top, self.seeds = int(top), int(seeds)
        self.max_epochs, self.hyperband = int(max_epochs), bool(hyperband)
        # () -> validation folds staged (skin.data.dataset.staged_folds); None: seeds only
        self.folds_source = folds_source
        self._folds: int | None = None

    @classmethod
    def from_experiment(cls, exp) -> Confirmation | None:
        c = exp.search.confirm
        if not c.top:
            return None
        return cls(c.top, c.seeds, exp.search.max_epochs, exp.search.tuner == "hyperband")

    # -- which trials ---------------------------------------------------------------------

    @staticmethod
    def is_confirmation(trial) -> bool:
        return CONFIRMS_KEY in trial.hyperparameters.values

    def full_length(self, oracle, trial) -> bool:
        values = trial.hyperparameters.values
        meta = oracle.meta.get(trial.trial_id, {})
        return int(values.get("tuner/epochs", self.max_epochs)) >= self.max_epochs and \
            not meta.get("stopped")

    def candidates(self, oracle) -> list:
        """The top ``K`` distinct configurations: their best original trials, best first."""
        done = [t for t in oracle.trials.values()
                if t.status == "COMPLETED" and t.score is not None and not self.is_confirmation(t)
                and self.full_length(oracle, t)]
        better = oracle.objective.direction == "max"
        done.sort(key=lambda t: (-t.score if better else t.score, len(t.trial_id), t.trial_id))
        out, seen = [], set()
        for t in done:
            key = config_key(t.hyperparameters.values)
            if key not in seen:
                seen.add(key)
                out.append(t)
            if len(out) == self.top:
                break
        return out

    def confirmations(self, oracle) -> dict[tuple[str, int], object]:
        """(trial id confirmed, seed) -> the confirmation trial."""
        out = {}
        for t in oracle.trials.values():
            values = t.hyperparameters.values
            if CONFIRMS_KEY in values:
                out[(str(values[CONFIRMS_KEY]), int(values.get(SEED_KEY, 0)))] = t
        return out

    def plan(self, oracle) -> list[tuple[str, int]]:
        return [(c.trial_id, n) for c in self.candidates(oracle) for n in range(1, self.seeds + 1)]

    def done(self, oracle) -> bool:
        """Every confirmation trial was handed out (called when nothing runs)."""
        made = self.confirmations(oracle)
        return all(key in made for key in self.plan(oracle))

    def folds(self, oracle) -> int:
        """Validation folds the confirmation uses (1: none, seeds only); decided once."""
        if self._folds is None:
            made = [t.hyperparameters.values for t in self.confirmations(oracle).values()]
            if self.folds_source is None:
                self._folds, why = 1, "confirm.folds is off"
            elif made and not all(FOLD_KEY in v for v in made):
                self._folds, why = 1, "its first confirmation trials had none"
            else:
                self._folds, why = int(self.folds_source()), (
                    "no validation folds staged (data staged before folds existed, or too "
                    "few images for them)")
            if self._folds > 1:
                log.info("confirmation trials validate on folds 1..%d of the training part "
                         "(fold 0: the validation split of the search)", self._folds - 1)
            else:
                log.info("confirmation trials vary the seed only, on the validation split: %s",
                         why)
        return self._folds

    # -- handing them out ------------------------------------------------------------------

    def next_trial(self, oracle, tuner_id: str):
        """The next confirmation trial for ``tuner_id`` (registered as running), an IDLE trial
        while the search's own trials still run, or None when there is nothing to hand out."""
        from keras_tuner.src.engine import trial as trial_module

        if any(not self.is_confirmation(t) for t in oracle.ongoing_trials.values()) or \
                any(not self.is_confirmation(oracle.trials[tid]) for tid in oracle._retry_queue):
            return trial_module.Trial(oracle.get_space(), trial_id="",
                                      status=trial_module.TrialStatus.IDLE)
        made = self.confirmations(oracle)
        todo = [key for key in self.plan(oracle) if key not in made]
        if not todo:
            return None
        source_id, seed = todo[0]
        source = oracle.trials[source_id]
        values = public_values(source.hyperparameters.values)
        values.update({CONFIRMS_KEY: source_id, SEED_KEY: seed})
        fold = fold_of_seed(seed, self.folds(oracle))
        if fold is not None:
            values[FOLD_KEY] = fold
        if self.hyperband:
            values.update({"tuner/epochs": self.max_epochs, "tuner/initial_epoch": 0})
        hps = oracle.hyperparameters.copy()
        hps.values = values
        trial_id = f"{{:0{len(str(oracle.max_trials))}d}}".format(len(oracle.trials))
        trial = trial_module.Trial(hyperparameters=hps, trial_id=trial_id,
                                   status=trial_module.TrialStatus.RUNNING)
        oracle.ongoing_trials[tuner_id] = trial
        oracle.trials[trial_id] = trial
        oracle.start_order.append(trial_id)
        oracle._save_trial(trial)
        if len(made) == 0:
            log.info("search over; confirming the top %d configurations with %d more seed(s) "
                     "each: trials %s", self.top, self.seeds,
                     ", ".join(c.trial_id for c in self.candidates(oracle)))
        log.info("trial %s confirms trial %s with seed %d%s", trial_id, source_id, seed,
                 f" on fold {fold}" if fold is not None else "")
        oracle.listener.confirmation_started(trial_id)
        return trial

    # -- the pick --------------------------------------------------------------------------

    def summary(self, oracle) -> dict | None:
        """The candidates with their scores, the pick and its margin; None before any
        candidate exists."""
        candidates = self.candidates(oracle)
        if not candidates:
            return None
        made = self.confirmations(oracle)
        better = oracle.objective.direction == "max"
        rows = []
        for c in candidates:
            extra = [made[(c.trial_id, n)] for n in range(1, self.seeds + 1)
                     if (c.trial_id, n) in made]
            scored = [t for t in extra if t.status == "COMPLETED" and t.score is not None]
            scores = [float(c.score)] + [float(t.score) for t in scored]
            folds = [0] + [int(t.hyperparameters.values.get(FOLD_KEY, 0)) for t in scored]
            mean, std = mean_std(scores)
            rows.append({"trial_id": c.trial_id, "hyperparameters": public_values(
                c.hyperparameters.values), "scores": scores, "folds": folds, "n": len(scores),
                "mean": mean, "std": std, "confirmations": [t.trial_id for t in extra]})
        order = sorted(range(len(rows)), key=lambda i: (-rows[i]["mean"] if better
                                                        else rows[i]["mean"], i))
        chosen = rows[order[0]]
        folds = sorted({f for row in rows for f in row["folds"]})
        on = f", validated on folds {', '.join(map(str, folds))}" if len(folds) > 1 else ""
        out = {"top": self.top, "seeds": self.seeds, "folds": folds, "candidates": rows,
               "chosen": chosen["trial_id"], "best_single": candidates[0].trial_id,
               "runner_up": None, "margin": None, "margin_se": None, "verdict": None,
               "text": f"trial {chosen['trial_id']}: the only candidate"}
        if len(rows) > 1:
            second = rows[order[1]]
            margin = abs(chosen["mean"] - second["mean"])
            se = math.sqrt(chosen["std"] ** 2 / chosen["n"] + second["std"] ** 2 / second["n"])
            verdict = "within noise" if margin < 2 * se else "beyond noise"
            out.update(runner_up=second["trial_id"], margin=margin, margin_se=se,
                       verdict=verdict,
                       text=f"trial {chosen['trial_id']} chosen over trial {second['trial_id']} "
                            f"by {margin:.4f} ± {se:.4f} (mean of {chosen['n']} and "
                            f"{second['n']} trainings{on}): {verdict}")
        return out
