"""What the chief and the retrain accept as data: metrics in range, values in the search space.

A report is data from another process: a broken worker or a hostile caller can
send ``val_auc = 2.0`` or a configuration outside the space. The oracle checks
every report with :func:`check_metrics` and every ending's hyperparameters
with :func:`changed_values` (:func:`check_ending`, :func:`check_space` raise
:class:`~skin.tuning.protocol.Refused` for the oracle); the retrain checks what it is about to train with
:func:`check_values`. Each raises ``ValueError`` naming the key and the value.

Nothing here imports TensorFlow; the space is a keras-tuner ``HyperParameters``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from skin.model.space import hyperparameters_from_values
from skin.tuning.protocol import Refused

# Metrics bounded to [0, 1] (a name contains one of these); losses are >= 0.
UNIT_INTERVAL = ("auc", "accuracy", "precision", "recall", "sensitivity", "specificity")
_EPS = 1e-9


def check_metric(name: str, value: Any) -> float:
    """``value`` as a float, or ValueError: not a number, not finite, out of its range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"metric {name}: {number!r} is not finite")
    base = name.lower()
    if any(word in base for word in UNIT_INTERVAL) and not 0.0 <= number <= 1.0:
        raise ValueError(f"metric {name}: {number!r} is out of range; expected a value in [0, 1]")
    if base.endswith("loss") and number < 0.0:
        raise ValueError(f"metric {name}: {number!r} is out of range; a loss is >= 0")
    return number


def check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Every value checked (:func:`check_metric`); the metrics as floats."""
    return {str(name): check_metric(str(name), value) for name, value in metrics.items()}


def tracker_values(tracker) -> Iterable[tuple[str, Any]]:
    """Every observed value in a keras-tuner ``MetricsTracker`` (all steps, all executions)."""
    for name, history in tracker.metrics.items():
        for observation in history.get_history():
            for value in observation.value:
                yield name, value


def check_tracker(tracker, objective: str) -> None:
    """A completed trial's metrics: every value in range and the objective present."""
    for name, value in tracker_values(tracker):
        check_metric(name, value)
    if not tracker.exists(objective) or tracker.get_best_value(objective) is None:
        raise ValueError(f"the objective {objective!r} was not reported")


def _hp_by_name(space) -> dict[str, list]:
    by_name: dict[str, list] = {}
    for hp in space.space:
        by_name.setdefault(hp.name, []).append(hp)
    return by_name


def changed_values(issued: Mapping[str, Any], sent: Mapping[str, Any], space) -> list[str]:
    """Where a caller's values differ from the ones the chief issued: ``["units=9999", ...]``.

    A value the chief issued must come back unchanged; a name the chief's space
    does not have is foreign. (A name in the space that was not issued, an
    inactive conditional one a build registered, is left out: the chief keeps
    its own values whatever the caller sends.)
    """
    known = _hp_by_name(space)
    bad = []
    for name, value in sent.items():
        if name in issued:
            if issued[name] != value or isinstance(issued[name], bool) != isinstance(value, bool):
                bad.append(f"{name}={value!r} (issued {issued[name]!r})")
        elif name not in known and not name.startswith("tuner/"):
            bad.append(f"{name}={value!r} (not in the search space)")
    for name in issued:
        if name not in sent:
            bad.append(f"{name} missing (issued {issued[name]!r})")
    return bad


def value_allowed(hp, value: Any) -> bool:
    """Whether ``value`` is one ``hp`` (a keras-tuner hyperparameter) can take."""
    kind = type(hp).__name__
    if kind == "Fixed":
        return value == hp.value and isinstance(value, bool) == isinstance(hp.value, bool)
    if kind == "Boolean":
        return isinstance(value, bool)
    if kind == "Choice":
        return any(v == value and isinstance(v, bool) == isinstance(value, bool)
                   for v in hp.values)
    if kind in ("Int", "Float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if kind == "Int" and not (isinstance(value, int) or float(value).is_integer()):
            return False
        if not math.isfinite(value):
            return False
        lo, hi = hp.min_value, hp.max_value
        if not lo - _EPS * max(1.0, abs(lo)) <= value <= hi + _EPS * max(1.0, abs(hi)):
            return False
        step = hp.step
        if not step:
            return True
        if hp.sampling == "log":
            if value <= 0 or lo <= 0 or step <= 1:
                return True  # keras-tuner rejects such a space itself
            k = math.log(value / lo) / math.log(step)
        else:
            k = (value - lo) / step
        return abs(k - round(k)) < 1e-6
    return True  # an unknown kind: keras-tuner's own build decides


def check_values(space, values: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
    """Every value allowed by the space and ``search.fixed``, nothing missing, nothing extra.

    ``space`` is the experiment's search space (keras-tuner ``HyperParameters``
    populated like the chief's); ``values`` a trial's hyperparameters without
    keras-tuner's ``tuner/`` bookkeeping. ValueError names the first problem.
    """
    for name, value in fixed.items():
        if name not in values:
            raise ValueError(f"{name}: missing; search.fixed pins it to {value!r}")
        if values[name] != value or isinstance(values[name], bool) != isinstance(value, bool):
            raise ValueError(f"{name}: {values[name]!r} is not valid; search.fixed pins it to "
                             f"{value!r}")
    known = _hp_by_name(space)
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"{name}: {value!r} is not valid; the search space has no "
                             f"hyperparameter {name!r}")
    # Which hyperparameters are active follows from the values themselves (conditions).
    probe = hyperparameters_from_values(values)
    for name, hps in known.items():
        active = [hp for hp in hps if probe._conditions_are_active(hp.conditions)]
        if not active:
            if name in values:
                raise ValueError(f"{name}: {values[name]!r} is not valid; the hyperparameter is "
                                 "inactive for the other values (a condition excludes it)")
            continue
        if name not in values:
            raise ValueError(f"{name}: missing; the search space needs a value for it")
        if not any(value_allowed(hp, values[name]) for hp in active):
            raise ValueError(f"{name}: {values[name]!r} is not valid; the search space allows "
                             f"{_describe(active[0])}")


def _describe(hp) -> str:
    kind = type(hp).__name__
    if kind == "Fixed":
        return f"only {hp.value!r}"
    if kind == "Boolean":
        return "true or false"
    if kind == "Choice":
        return "one of " + ", ".join(repr(v) for v in hp.values)
    if kind in ("Int", "Float"):
        step = f" in steps of {hp.step}" if hp.step else ""
        return f"{kind.lower()}s from {hp.min_value} to {hp.max_value}{step}" + \
            (f" ({hp.sampling} sampling)" if hp.sampling not in (None, "linear") else "")
    return kind


# keras-tuner's TrialStatus values an ending may carry (the strings, without importing it)
ENDING_STATUSES = ("COMPLETED", "INVALID", "FAILED")


def check_ending(trial, current, objective: str, space) -> None:
    """Refused unless a worker's ending ``trial`` is one the chief can take as it is:
    an ending status, the hyperparameters of ``current`` (the chief's trial), and for a
    completed trial the objective, sent now or reported (checked) before."""
    if trial.status not in ENDING_STATUSES:
        raise Refused("report", f"trial {trial.trial_id}: status {trial.status!r} is not an "
                                f"ending; expected one of {', '.join(ENDING_STATUSES)}")
    changed = changed_values(current.hyperparameters.values, trial.hyperparameters.values,
                             space)
    if changed:
        raise Refused("hyperparameters", f"trial {trial.trial_id}: the hyperparameters are "
                      f"the ones the chief issued; the call changed {', '.join(changed[:5])}")
    if trial.status == "COMPLETED":
        sent = trial.metrics.exists(objective)
        try:
            check_tracker(trial.metrics if sent else current.metrics, objective)
            if not sent:
                for name, value in tracker_values(trial.metrics):
                    check_metric(name, value)
        except ValueError as e:
            raise Refused("report", f"trial {trial.trial_id}: {e}") from None


def check_space(ours, sent) -> None:
    """A worker's UpdateSpace ``sent`` may only confirm the chief's space ``ours`` (both
    keras-tuner HyperParameters): anything new or different is Refused, never merged."""
    from keras_tuner.src.engine import hyperparameters as hp_module

    # Compare after the same proto round trip the caller's space went through.
    known: dict[str, list[dict]] = {}
    for hp in hp_module.HyperParameters.from_proto(ours.to_proto()).space:
        known.setdefault(hp.name, []).append(hp.get_config())
    for hp in sent.space:
        if hp.get_config() not in known.get(hp.name, []):
            what = "a new hyperparameter" if hp.name not in known else "a different definition of"
            raise Refused("space", f"UpdateSpace: {what} {hp.name!r}; the search space is the "
                          "chief's (workers may only confirm it)", denied=True)
