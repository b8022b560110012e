"""The experiment file and the environment, parsed and validated once.

:class:`Experiment`: the YAML experiment file (``apiVersion: skin/v1``,
``kind: Experiment``), with a few ``SKIN_*`` environment overrides. The per-process
settings that only the environment gives (role, oracle address, ports, scratch
directory) are :class:`skin.infra.runtime.Runtime`.

Nothing but these two modules reads ``os.environ`` for our settings. A bad
value fails here, before any work starts, with a :class:`ConfigError` that
names the key path, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skin.errors import ConfigError
from skin.infra import artifacts
from skin.model.space import parse_space

API_VERSION = "skin/v1"
KIND = "Experiment"
PACKAGE_EXPERIMENTS = Path(__file__).parents[1] / "experiments"  # skin/experiments
DEFAULT_EXPERIMENT_FILE = PACKAGE_EXPERIMENTS / "default.yaml"
QUICKSTART_EXPERIMENT_FILE = PACKAGE_EXPERIMENTS / "quickstart.yaml"

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


def _spec(default: Any, *, help: str, lo: float | None = None, hi: float | None = None,
          choices: tuple | None = None, lo_open: bool = False, hi_open: bool = False,
          pattern: re.Pattern | None = None, parser=None) -> Any:
    """A dataclass field with the range or choices that validation enforces (``parser``:
    a function (key path, value) -> value that validates a structured value itself)."""
    meta = dict(help=help, lo=lo, hi=hi, choices=choices, lo_open=lo_open,
                hi_open=hi_open, pattern=pattern, parser=parser)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class StorageConfig:
    bucket: str = _spec("skin-experiments", help="GCS bucket name", pattern=_BUCKET_RE)
    prefix: str = _spec("experiments", help="object prefix inside the bucket ('' for none)")


@dataclass(frozen=True)
class DataConfig:
    source: str = _spec(
        "synthetic",
        help="folder with benign/ and malignant/, a .zip of one, a gs:// prefix, or 'synthetic'")
    test_source: str = _spec("", help="optional separate labelled folder staged as the test split")
    test_fraction: float = _spec(0.0, lo=0.0, hi=0.5, hi_open=True,
                                 help="share of source held out as the test split (grouped)")
    validation_fraction: float = _spec(0.2, lo=0.0, hi=0.5, lo_open=True, hi_open=True,
                                       help="share of source used for validation (grouped)")
    image_size: int = _spec(128, lo=32, hi=512, help="side of the square image the model sees")
    seed: int = _spec(42, lo=0, help="seed of the split and of the search")
    shards: int = _spec(4, lo=1, hi=256, help="TFRecord shards per split")
    near_duplicate_correlation: float = _spec(
        0.97, lo=0.5, hi=1.0, help="thumbnail correlation at which two images count as one lesion")
    synthetic_images_per_class: int = _spec(
        120, lo=8, hi=5000, help="images per class when source is 'synthetic'")
    licence: str = _spec("", help="licence of the images for the model card: '' detects it "
                                  "(the ISIC set by its README), 'isic' the ISIC Archive's "
                                  "terms, any other text is quoted as given")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    rule: str = _spec("none", choices=("none", "median"),
                      help="'median': stop a trial whose best objective by epoch e is worse than "
                           "the median of the completed trials' running averages at e "
                           "(random and bayesian tuners)")
    start_epoch: int = _spec(4, lo=1, hi=1000, help="epochs a trial trains before it may be stopped")
    min_trials: int = _spec(3, lo=1, hi=100_000,
                            help="completed trials the median needs before it stops anything")


@dataclass(frozen=True)
class ConfirmConfig:
    top: int = _spec(0, lo=0, hi=100, help="after the search, train the top N distinct "
                                          "configurations again (0 = off)")
    seeds: int = _spec(2, lo=1, hi=100, help="more trainings of each, with other seeds; the "
                                            "configuration with the best mean is picked")
    folds: bool = _spec(True, help="each of those trainings also validates on another fold of "
                                   "the training part (staged, grouped by lesion), the same "
                                   "folds for every candidate; false: other seeds only")


@dataclass(frozen=True)
class SearchConfig:
    tuner: str = _spec("hyperband", choices=("hyperband", "bayesian", "random"),
                       help="keras-tuner algorithm")
    objective: str = _spec("val_auc", choices=tuple(artifacts.OBJECTIVE_DIRECTIONS),
                           help="metric the search optimises (val_loss is minimised)")
    max_trials: int = _spec(30, lo=1, hi=100_000, help="trial budget (bayesian, random)")
    max_epochs: int = _spec(20, lo=1, hi=1000, help="most epochs one trial trains")
    hyperband_factor: int = _spec(3, lo=2, hi=10, help="Hyperband reduction factor")
    hyperband_iterations: int = _spec(1, lo=1, hi=100, help="Hyperband iterations")
    executions_per_trial: int = _spec(1, lo=1, hi=10, help="models trained per trial")
    max_consecutive_failed_trials: int = _spec(
        3, lo=1, hi=1000, help="consecutive failed trials that stop the search")
    max_trial_retries: int = _spec(2, lo=0, hi=100, help="re-runs of a trial whose worker vanished")
    lease_seconds: float = _spec(300.0, lo=1.0, hi=86_400.0,
                                 help="a trial with no report for this long is reclaimed")
    watchdog_leases: float = _spec(5.0, lo=0.0, hi=1000.0,
                                   help="a worker whose trial finishes no batch for this many "
                                        "leases exits by itself (exit 81), freeing its GPU; "
                                        "0 = off")
    fixed: dict = _spec({}, help="hyperparameters pinned to one value, by name")
    space: dict = _spec({}, parser=parse_space,
                        help="hyperparameters by name: {type: choice|int|float|boolean|fixed, ...} "
                             "(skin.model.space); unnamed ones keep the model's default space")
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)

    @property
    def direction(self) -> str:
        """``"min"`` or ``"max"``: what "better" means for ``objective`` (skin.infra.artifacts)."""
        return artifacts.objective_direction(self.objective)


@dataclass(frozen=True)
class RetrainConfig:
    epochs: int = _spec(0, lo=0, hi=1000,
                        help="epochs of the final training; 0 = the best trial's epochs")
    target_sensitivity: float = _spec(0.90, lo=0.0, hi=1.0, lo_open=True,
                                      help="malignant recall the published threshold keeps")
    patience: int = _spec(5, lo=0, hi=1000,
                          help="early-stopping patience on validation (0 = off)")
    restore_best: bool = _spec(True, help="publish the weights of the best validation epoch "
                                          "(false: the last epoch's, and validation is then "
                                          "used for the threshold alone)")
    tta: bool = _spec(False, help="test-time augmentation: the published model averages "
                                  "P(malignant) over the 8 dihedral views of the image")
    ensemble: int = _spec(1, lo=1, hi=8,
                          help="publish the mean of the N best distinct trials, each retrained "
                               "(1 = the best trial alone)")
    reference_prevalence: float = _spec(
        0.062, lo=0.0, hi=1.0, lo_open=True, hi_open=True,
        help="share of malignant lesions the model card states PPV and NPV at (default: "
             "6.2 %, urgent suspected skin cancer referrals in England 2023 confirmed as "
             "cancer, BCC excluded; skin.serving.clinical.REFERENCE_PREVALENCE_SOURCE)")


_BACKBONES = ("none", "mobilenetv2", "efficientnetb0", "efficientnet_lite0")  # = skin.model.backbone.NAMES (no TF here)


@dataclass(frozen=True)
class BackboneConfig:
    name: str = _spec("none", choices=_BACKBONES,
                      help="a pretrainable network (keras.applications or skin.model.lite0) in place "
                           "of the searched CNN body")
    weights: str = _spec("", help="'' (random: from scratch), 'imagenet' (Keras downloads them), "
                                  "a gs:// URI or a local path of a weights file")
    trainable: bool = _spec(True, help="fine-tune the backbone (false: train the head alone)")


@dataclass(frozen=True)
class ChiefConfig:
    oracle_port: int = _spec(8000, lo=1, hi=65535, help="gRPC port of the oracle")
    metrics_port: int = _spec(9090, lo=0, hi=65535, help="Prometheus port (0 = off)")
    lock_seconds: float = _spec(
        30.0, lo=1.0, hi=3600.0,
        help="the chief's lock in the bucket (tuner/oracle/lock.json) expires this long after "
             "its last renewal (renewed every third of it); another chief takes over only then")
    on_lock_held: str = _spec(
        "auto", choices=("auto", "wait", "exit"),
        help="a chief that finds the lock held: wait until it is free, or exit 5; auto waits "
             "under Kubernetes (KUBERNETES_SERVICE_HOST set) and exits on a manual start")


@dataclass(frozen=True)
class Experiment:
    name: str = _spec("skin-cnn", pattern=_NAME_RE,
                      help="DNS-1123 label: lowercase letters, digits and '-'")
    workers: int = _spec(2, lo=1, hi=10_000, help="worker processes or pods")
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    chief: ChiefConfig = field(default_factory=ChiefConfig)
    source_file: str = field(default="", compare=False, metadata=dict(internal=True))

    @property
    def root_uri(self) -> str:
        """``gs://<bucket>/<prefix>/<name>``: everything of this experiment lives below."""
        parts = [p for p in (self.storage.prefix.strip("/"), self.name) if p]
        return f"gs://{self.storage.bucket}/" + "/".join(parts)

    @property
    def data_uri(self) -> str:
        return artifacts.data_uri(self.root_uri)

    @property
    def tuner_uri(self) -> str:
        return artifacts.tuner_uri(self.root_uri)

    @property
    def trials_uri(self) -> str:
        return artifacts.trials_uri(self.root_uri)

    @property
    def models_uri(self) -> str:
        return artifacts.models_uri(self.root_uri)

    def to_dict(self) -> dict:
        doc = {"apiVersion": API_VERSION, "kind": KIND}
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            value = getattr(self, f.name)
            doc[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return doc

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Experiment keys that the environment may override: variable -> key path.
ENV_OVERRIDES: dict[str, str] = {
    "SKIN_EXPERIMENT_NAME": "name",
    "SKIN_WORKERS": "workers",
    "SKIN_BUCKET": "storage.bucket",
    "SKIN_PREFIX": "storage.prefix",
    "SKIN_DATA_SOURCE": "data.source",
    "SKIN_TEST_SOURCE": "data.test_source",
    "SKIN_TEST_FRACTION": "data.test_fraction",
    "SKIN_IMAGE_SIZE": "data.image_size",
    "SKIN_SEED": "data.seed",
    "SKIN_TUNER": "search.tuner",
    "SKIN_MAX_TRIALS": "search.max_trials",
    "SKIN_MAX_EPOCHS": "search.max_epochs",
    "SKIN_LEASE_SECONDS": "search.lease_seconds",
    "SKIN_WATCHDOG_LEASES": "search.watchdog_leases",
    "SKIN_RETRAIN_EPOCHS": "retrain.epochs",
    "SKIN_RETRAIN_TTA": "retrain.tta",
    "SKIN_RETRAIN_RESTORE_BEST": "retrain.restore_best",
    "SKIN_RETRAIN_ENSEMBLE": "retrain.ensemble",
    "SKIN_BACKBONE": "backbone.name",
    "SKIN_BACKBONE_WEIGHTS": "backbone.weights",
    "SKIN_ORACLE_PORT": "chief.oracle_port",
    "SKIN_CHIEF_LOCK_SECONDS": "chief.lock_seconds",
    "SKIN_CHIEF_ON_LOCK_HELD": "chief.on_lock_held",
}


def _describe(f: dataclasses.Field, ftype: type) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    tname = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             dict: "a mapping"}.get(ftype, str(ftype))
    bounds = []
    if m.get("lo") is not None:
        bounds.append((">" if m.get("lo_open") else ">=") + f" {m['lo']}")
    if m.get("hi") is not None:
        bounds.append(("<" if m.get("hi_open") else "<=") + f" {m['hi']}")
    if m.get("pattern") is not None:
        bounds.append(m["help"])
    return tname + (" " + " and ".join(bounds) if bounds else "")


def _coerce(path: str, value: Any, f: dataclasses.Field, ftype: type, from_env: bool) -> Any:
    expected = _describe(f, ftype)

    def bad() -> ConfigError:
        return ConfigError(f"{path}: {value!r} is not valid; expected {expected}")

    if from_env and isinstance(value, str) and ftype is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise bad() from None
    if ftype is bool:
        if not isinstance(value, bool):
            raise bad()
    elif ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        value = float(value)
        if value != value:  # NaN
            raise bad()
    elif ftype is str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise bad()
    elif m_parser := f.metadata.get("parser"):
        return m_parser(path, value)
    elif ftype is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad()
        for k, v in value.items():
            if not isinstance(v, (int, float, str, bool)):
                raise ConfigError(f"{path}.{k}: {v!r} is not valid; expected a single value "
                                  "(number, string or boolean)")
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise bad()
    if m.get("lo") is not None and (value < m["lo"] or (m.get("lo_open") and value == m["lo"])):
        raise bad()
    if m.get("hi") is not None and (value > m["hi"] or (m.get("hi_open") and value == m["hi"])):
        raise bad()
    if m.get("pattern") is not None and not m["pattern"].match(value):
        raise bad()
    return value


def _build(cls: type, doc: Any, path: str, env_values: Mapping[str, Any]) -> Any:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path or '<document>'}: expected a mapping, got {doc!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    for key in doc:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key; expected one of {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, doc.get(name), key_path, env_values)
        elif key_path in env_values:
            env_name, raw = env_values[key_path]
            try:
                kwargs[name] = _coerce(key_path, raw, f, ftype, from_env=True)
            except ConfigError as e:
                raise ConfigError(f"{env_name} (overrides {e})") from None
        elif name in doc:
            kwargs[name] = _coerce(key_path, doc[name], f, ftype, from_env=False)
    return cls(**kwargs)


def parse_experiment(doc: Any, env: Mapping[str, str] | None = None, source_file: str = "") \
        -> Experiment:
    """Validate a parsed YAML document (plus env overrides) into an :class:`Experiment`."""
    env = os.environ if env is None else env
    if not isinstance(doc, dict):
        raise ConfigError(f"<document>: expected a mapping with apiVersion and kind, got {doc!r}")
    doc = dict(doc)
    api, kind = doc.pop("apiVersion", None), doc.pop("kind", None)
    if api != API_VERSION:
        raise ConfigError(f"apiVersion: {api!r} is not valid; expected {API_VERSION!r}")
    if kind != KIND:
        raise ConfigError(f"kind: {kind!r} is not valid; expected {KIND!r}")
    env_values = {path: (var, env[var]) for var, path in ENV_OVERRIDES.items()
                  if env.get(var, "") != ""}
    exp = _build(Experiment, doc, "", env_values)
    _check_cross_field(exp)
    return dataclasses.replace(exp, source_file=source_file)


def _check_cross_field(exp: Experiment) -> None:
    d = exp.data
    if d.test_source and d.test_fraction:
        raise ConfigError(
            f"data.test_fraction: {d.test_fraction!r} is not valid with data.test_source set; "
            "expected 0 (the test split comes from one place)")
    if d.test_fraction + d.validation_fraction >= 0.9:
        raise ConfigError(
            f"data.validation_fraction: {d.validation_fraction!r} is not valid with "
            f"data.test_fraction {d.test_fraction!r}; expected the two to leave >= 10% for training")
    b = exp.backbone
    weights = b.weights.strip()
    if weights and b.name == "none":
        raise ConfigError(f"backbone.weights: {b.weights!r} is not valid with backbone.name "
                          "'none'; expected '' (or name a backbone)")
    if not b.trainable and not weights:
        raise ConfigError("backbone.trainable: false is not valid without backbone.weights; "
                          "expected true (a frozen random backbone learns nothing)")
    if weights == "imagenet" and b.name == "efficientnet_lite0":
        raise ConfigError("backbone.weights: 'imagenet' is not valid with backbone.name "
                          "'efficientnet_lite0' (Keras has no such file); expected a gs:// URI or "
                          "a local path of a file written by `skin weights import`")
    if weights and weights != "imagenet" and "://" in weights and not weights.startswith("gs://"):
        raise ConfigError(f"backbone.weights: {b.weights!r} is not valid; expected '', 'imagenet', "
                          "a gs:// URI or a local path")
    es = exp.search.early_stopping
    if es.rule != "none" and exp.search.tuner == "hyperband":
        raise ConfigError(f"search.early_stopping.rule: {es.rule!r} is not valid with search.tuner "
                          "'hyperband' (it stops trials itself); expected 'none', or tuner "
                          "random or bayesian")
    if es.rule != "none" and es.start_epoch >= exp.search.max_epochs:
        raise ConfigError(f"search.early_stopping.start_epoch: {es.start_epoch!r} is not valid; "
                          f"expected < search.max_epochs ({exp.search.max_epochs})")
    if 0 < exp.search.watchdog_leases < 1:
        raise ConfigError(
            f"search.watchdog_leases: {exp.search.watchdog_leases!r} is not valid; expected 0 "
            "(off) or >= 1 (a worker must be given at least one lease to finish a batch)")
    if exp.search.tuner == "hyperband" and exp.search.max_epochs < exp.search.hyperband_factor:
        raise ConfigError(
            f"search.max_epochs: {exp.search.max_epochs!r} is not valid for hyperband; expected "
            f">= search.hyperband_factor ({exp.search.hyperband_factor})")


def _apply_overrides(doc: Any, overrides: Mapping[str, Any]) -> Any:
    """Set key paths (``data.source``) in a parsed document; validation happens after."""
    if not overrides or not isinstance(doc, dict):
        return doc
    doc = dict(doc)
    for key_path, value in overrides.items():
        node = doc
        *parents, leaf = key_path.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = value
    return doc


def load_experiment(path: str | os.PathLike | None = None,
                    env: Mapping[str, str] | None = None,
                    overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read and validate an experiment file (default: ``$SKIN_CONFIG`` or the shipped default).

    ``overrides`` maps key paths to values (command-line flags such as ``--data``); they are
    validated like the file's own values.
    """
    env = os.environ if env is None else env
    path = Path(path or env.get("SKIN_CONFIG") or DEFAULT_EXPERIMENT_FILE)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"experiment file {path}: cannot be read ({e.strerror or e})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"experiment file {path}: not valid YAML ({e})") from None
    try:
        return parse_experiment(_apply_overrides(doc, overrides or {}), env, source_file=str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
