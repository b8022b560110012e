"""The search space as data: ``search.space`` (and ``search.fixed``) of the experiment file.

Each hyperparameter of the space is one of keras-tuner's types::

    search:
      space:
        blocks:        {type: choice, values: [3, 4, 5], default: 4}
        filters:       {type: int, min: 16, max: 48, step: 8}
        learning_rate: {type: float, min: 1.0e-4, max: 1.0e-2, sampling: log}
        dropout:       {type: float, min: 0.0, max: 0.5, step: 0.1}
        batch_norm:    {type: boolean, default: true}
        pooling:       {type: fixed, value: avg}
      fixed:           # a shortcut for {type: fixed, value: ...}
        optimizer: adamw

:func:`parse_space` checks the structure (types, keys, non-empty ranges) for any
hypermodel, when the experiment is read (skin.infra.config). :func:`check_model_space`
checks the names and values against the skin CNN (``MODEL_HYPERPARAMETERS``: a name it
does not know, a value it cannot build); the CLI runs it right after reading the
experiment and :class:`skin.model.hypermodel.SkinHyperModel` again, so a bad space exits 2
before any work, naming the key.

:func:`effective_space` is the space a search really uses: every hyperparameter of the
model in its canonical order (the order keras-tuner samples in), from ``search.fixed``,
else ``search.space``, else ``DEFAULT_SPACE`` (the space the model had in Python
before the experiment file could say it; the shipped experiments state it). The body's
hyperparameters drop out with a backbone; pretrained weights search lower learning rates
unless the space says otherwise. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from skin.errors import ConfigError

TYPES = ("choice", "int", "float", "boolean", "fixed")
_KEYS = {
    "choice": ({"values"}, {"default"}),
    "int": ({"min", "max"}, {"step", "sampling", "default"}),
    "float": ({"min", "max"}, {"step", "sampling", "default"}),
    "boolean": (set(), {"default"}),
    "fixed": ({"value"}, set()),
}
SAMPLINGS = ("linear", "log", "reverse_log")


def _fail(path: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{path}: {value!r} is not valid; expected {expected}")


def _scalar(value) -> bool:
    return isinstance(value, (bool, int, float, str)) and not (
        isinstance(value, float) and not math.isfinite(value))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_space(path: str, doc: Any) -> dict[str, dict]:
    """Validate ``search.space`` (any hypermodel): {name: normalised spec}; ConfigError
    naming the key otherwise."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise _fail(path, doc, "a mapping of hyperparameter name to {type: ...}")
    out: dict[str, dict] = {}
    for name, spec in doc.items():
        out[str(name)] = parse_spec(f"{path}.{name}", spec)
    return out


def parse_spec(path: str, spec: Any) -> dict:
    """One hyperparameter's spec, normalised (numbers as given, ``step``/``sampling`` set)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise _fail(path, spec, "a mapping with type: " + " | ".join(TYPES))
    kind = spec["type"]
    if kind not in TYPES:
        raise _fail(f"{path}.type", kind, "one of " + ", ".join(TYPES))
    required, optional = _KEYS[kind]
    for key in spec:
        if key != "type" and key not in required | optional:
            raise ConfigError(f"{path}.{key}: unknown key for type {kind}; expected "
                              + ", ".join(sorted(required | optional)))
    for key in sorted(required):
        if key not in spec:
            raise ConfigError(f"{path}.{key}: missing; a {kind} needs "
                              + " and ".join(sorted(required)))
    out: dict[str, Any] = {"type": kind}
    if kind == "fixed":
        if not _scalar(spec["value"]):
            raise _fail(f"{path}.value", spec["value"], "a single value (number, string or "
                                                        "boolean)")
        out["value"] = spec["value"]
    elif kind == "boolean":
        default = spec.get("default", False)
        if not isinstance(default, bool):
            raise _fail(f"{path}.default", default, "true or false")
        out["default"] = default
    elif kind == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise _fail(f"{path}.values", values, "a non-empty list of values")
        for i, v in enumerate(values):
            if not _scalar(v):
                raise _fail(f"{path}.values[{i}]", v, "a number, string or boolean")
        kinds = {("number" if _number(v) else type(v).__name__) for v in values}
        if len(kinds) > 1:
            raise _fail(f"{path}.values", values, "values of one type")
        if len(set(map(repr, values))) != len(values):
            raise _fail(f"{path}.values", values, "distinct values")
        out["values"] = list(values)
        if "default" in spec:
            if spec["default"] not in values:
                raise _fail(f"{path}.default", spec["default"], "one of the values")
            out["default"] = spec["default"]
    else:  # int, float
        check = _is_int if kind == "int" else _number
        what = "an integer" if kind == "int" else "a number"
        for key in ("min", "max"):
            if not check(spec[key]):
                raise _fail(f"{path}.{key}", spec[key], what)
        lo, hi = spec["min"], spec["max"]
        if lo > hi:
            raise _fail(f"{path}.max", hi, f">= min ({lo}): the range is empty")
        if kind == "float" and lo == hi:
            raise _fail(f"{path}.max", hi, f"> min ({lo}): the range is empty (use type: fixed)")
        sampling = spec.get("sampling", "linear")
        if sampling not in SAMPLINGS:
            raise _fail(f"{path}.sampling", sampling, "one of " + ", ".join(SAMPLINGS))
        if sampling != "linear" and lo <= 0:
            raise _fail(f"{path}.min", lo, f"> 0 with sampling: {sampling}")
        step = spec.get("step")
        if step is not None:
            if not check(step) or step <= 0:
                raise _fail(f"{path}.step", step, f"{what} > 0")
            if sampling != "linear" and step <= 1:
                raise _fail(f"{path}.step", step, f"> 1 with sampling: {sampling} (a factor)")
        if kind == "int" and step is None and sampling == "linear":
            step = 1
        out.update(min=lo, max=hi, step=step, sampling=sampling)
        if "default" in spec:
            d = spec["default"]
            if not check(d) or not lo <= d <= hi:
                raise _fail(f"{path}.default", d, f"{what} from min to max")
            out["default"] = d
    return out


def candidate_values(spec: dict) -> list:
    """Values the spec can produce that matter for validation: all of a choice, both ends
    (and every step of a small int range) otherwise."""
    kind = spec["type"]
    if kind == "fixed":
        return [spec["value"]]
    if kind == "boolean":
        return [False, True]
    if kind == "choice":
        return list(spec["values"])
    lo, hi, step = spec["min"], spec["max"], spec.get("step")
    if kind == "int" and spec["sampling"] == "linear" and (hi - lo) // (step or 1) <= 64:
        return list(range(lo, hi + 1, step or 1))
    return [lo, hi]


# -- the skin CNN's hyperparameters (skin.model.hypermodel) ---------------------------------------------

def _one_of(*allowed) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed and type(v) is type(allowed[0]) else \
        "one of " + ", ".join(repr(a) for a in allowed)


def _int_range(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if _is_int(v) and lo <= v <= hi else f"an integer from {lo} to {hi}"


def _float_range(lo: float, hi: float, lo_open=False, hi_open=False) -> Callable[[Any], str | None]:
    def check(v):
        ok = _number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else (f"a number {'>' if lo_open else '>='} {lo} and "
                                f"{'<' if hi_open else '<='} {hi}")
    return check


def _boolean(v) -> str | None:
    return None if isinstance(v, bool) else "true or false"


# name -> (value kind, check): what skin.model.hypermodel.build_model can build, in the canonical order.
MODEL_HYPERPARAMETERS: dict[str, tuple[str, Callable[[Any], str | None]]] = {
    "stem": ("int", _one_of(2, 4)),
    "blocks": ("int", _int_range(1, 8)),
    "filters": ("int", _int_range(1, 256)),
    "kernel_size": ("int", _int_range(1, 15)),
    "block_type": ("str", _one_of("plain", "residual", "separable")),
    "batch_norm": ("bool", _boolean),
    "pooling": ("str", _one_of("avg", "max", "flatten")),
    "dense_units": ("int", _int_range(0, 4096)),
    "dropout": ("float", _float_range(0.0, 1.0, hi_open=True)),
    "optimizer": ("str", _one_of("adam", "adamw", "sgd")),
    "learning_rate": ("float", _float_range(0.0, 1.0, lo_open=True)),
    "weight_decay": ("float", _float_range(0.0, 1.0, hi_open=True)),
    "lr_schedule": ("str", _one_of("constant", "cosine")),
    "label_smoothing": ("float", _float_range(0.0, 1.0, hi_open=True)),
    "augment": ("float", _float_range(0.0, 1.0)),
    "mixup": ("float", _float_range(0.0, 4.0)),
    "class_weight": ("bool", _boolean),
    "batch_size": ("int", _int_range(1, 4096)),
}
NAMES: tuple[str, ...] = tuple(MODEL_HYPERPARAMETERS)
BODY: tuple[str, ...] = ("stem", "blocks", "filters", "kernel_size", "block_type", "batch_norm")

# The space skin.model.hypermodel declared in Python before the experiment file could say it.
DEFAULT_SPACE: dict[str, dict] = {
    "stem": {"type": "choice", "values": [2, 4], "default": 2},
    "blocks": {"type": "choice", "values": [3, 4, 5], "default": 4},
    "filters": {"type": "choice", "values": [16, 24, 32], "default": 16},
    "kernel_size": {"type": "choice", "values": [3, 5], "default": 3},
    "block_type": {"type": "choice", "values": ["plain", "residual", "separable"],
                   "default": "residual"},
    "batch_norm": {"type": "boolean", "default": True},
    "pooling": {"type": "choice", "values": ["avg", "max", "flatten"], "default": "avg"},
    "dense_units": {"type": "choice", "values": [0, 64, 128, 256], "default": 128},
    "dropout": {"type": "choice", "values": [0.0, 0.2, 0.3, 0.5], "default": 0.3},
    "optimizer": {"type": "choice", "values": ["adam", "adamw", "sgd"], "default": "adamw"},
    "learning_rate": {"type": "choice", "values": [3e-4, 1e-3, 3e-3, 1e-2], "default": 3e-3},
    "weight_decay": {"type": "choice", "values": [0.0, 1e-4, 1e-3, 1e-2, 5e-2], "default": 1e-2},
    "lr_schedule": {"type": "choice", "values": ["constant", "cosine"], "default": "cosine"},
    "label_smoothing": {"type": "choice", "values": [0.0, 0.05, 0.1], "default": 0.05},
    "augment": {"type": "choice", "values": [0.0, 0.25, 0.5, 0.75, 1.0], "default": 0.5},
    "mixup": {"type": "choice", "values": [0.0, 0.2], "default": 0.0},
    "class_weight": {"type": "boolean", "default": False},
    "batch_size": {"type": "choice", "values": [16, 32, 64], "default": 32},
}
# Learning rates searched when a pretrained backbone is fine-tuned (skin.model.backbone).
FINE_TUNE_LEARNING_RATES = [3e-5, 1e-4, 3e-4, 1e-3]
FINE_TUNE_LEARNING_RATE = {"type": "choice", "values": FINE_TUNE_LEARNING_RATES, "default": 1e-4}


def _kind_ok(kind: str, spec: dict) -> bool:
    t = spec["type"]
    if t in ("int", "float"):
        return kind in ("int", "float") and (kind == "float" or t == "int")
    if t == "boolean":
        return kind == "bool"
    return True  # choice and fixed: each value is checked


def check_model_space(search, where: str = "search") -> None:
    """ConfigError naming the key when ``search.space``/``search.fixed`` name a hyperparameter
    the skin CNN does not know or a value it cannot build."""
    both = set(search.fixed) & set(search.space)
    if both:
        name = sorted(both)[0]
        raise ConfigError(f"{where}.fixed.{name}: also in {where}.space; expected it in one "
                          "of the two")
    entries = [(f"{where}.fixed.{n}", n, {"type": "fixed", "value": v})
               for n, v in search.fixed.items()]
    entries += [(f"{where}.space.{n}", n, spec) for n, spec in search.space.items()]
    for path, name, spec in entries:
        if name not in MODEL_HYPERPARAMETERS:
            raise ConfigError(f"{path}: unknown hyperparameter; expected one of "
                              + ", ".join(NAMES))
        kind, check = MODEL_HYPERPARAMETERS[name]
        if not _kind_ok(kind, spec):
            raise ConfigError(f"{path}.type: {spec['type']!r} is not valid for {name}; it takes "
                              + {"int": "integers", "float": "numbers", "str": "strings",
                                 "bool": "true or false"}[kind])
        for value in candidate_values(spec):
            problem = check(value)
            if problem is not None:
                key = {"fixed": "" if path.startswith(f"{where}.fixed") else ".value",
                       "choice": ".values"}.get(spec["type"], "")
                if spec["type"] in ("int", "float"):
                    key = ".min" if value == spec["min"] else ".max"
                raise ConfigError(f"{path}{key}: {value!r} is not valid for {name}; expected "
                                  f"{problem}")


def effective_space(search, backbone_name: str = "none", pretrained: bool = False) \
        -> dict[str, dict]:
    """{name: spec} in the canonical order: what the search over the skin CNN declares."""
    out: dict[str, dict] = {}
    for name in NAMES:
        if backbone_name != "none" and name in BODY:
            continue
        if name in search.fixed:
            out[name] = {"type": "fixed", "value": search.fixed[name]}
        elif name in search.space:
            out[name] = search.space[name]
        elif name == "learning_rate" and pretrained:
            out[name] = FINE_TUNE_LEARNING_RATE
        else:
            out[name] = DEFAULT_SPACE[name]
    return out


def space_of(exp) -> dict[str, dict]:
    b = exp.backbone
    return effective_space(exp.search, b.name, pretrained=bool(b.weights.strip()))


def hyperparameters_from_values(values: dict[str, Any]):
    """A keras-tuner ``HyperParameters`` holding ``values`` (a best trial's, for retraining it;
    a probe of which conditions they activate): the one way this project turns recorded
    values back into keras-tuner's object.

    A registered hyperparameter keeps a value that is already there (keras-tuner's
    ``_register``), so ``build()`` sees these values, conditional ones included, and declares
    a name the values lack (recorded before it existed) with its default.
    """
    import keras_tuner  # loads TensorFlow: only where a model is built or values are checked
    import numpy as np

    hp = keras_tuner.HyperParameters()
    hp.values.update({k: (v.item() if isinstance(v, np.generic) else v) for k, v in values.items()})
    return hp


def declare(hp, name: str, spec: dict):
    """Declare one hyperparameter on a keras-tuner ``HyperParameters``; its value now."""
    kind = spec["type"]
    if kind == "fixed":
        return hp.Fixed(name, spec["value"])
    if kind == "boolean":
        return hp.Boolean(name, default=spec.get("default", False))
    if kind == "choice":
        return hp.Choice(name, spec["values"], default=spec.get("default"))
    if kind == "int":
        return hp.Int(name, spec["min"], spec["max"], step=spec.get("step"),
                      sampling=spec.get("sampling", "linear"), default=spec.get("default"))
    return hp.Float(name, float(spec["min"]), float(spec["max"]), step=spec.get("step"),
                    sampling=spec.get("sampling", "linear"), default=spec.get("default"))
