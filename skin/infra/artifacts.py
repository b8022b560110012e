"""What an experiment keeps in the bucket: every object path under its root, in one place.

The roles share nothing but the bucket (ARCHITECTURE.md, "Bucket layout"); this module
names what they hand each other there. Every reader and writer builds its paths here::

    <root>/data/manifest.json                      manifest_uri(root)  (written last by stage)
    <root>/data/<split>-<i>-of-<n>.tfrecord        shards, listed in the manifest
    <root>/data/stage_report.json                  stage_report_uri(root)
    <root>/data/quarantine/<label>/<file>          quarantine_uri(root, rel)
    <root>/tuner/oracle/{header,trials/,journal/}  oracle_uri(root) (skin.tuning.journal)
    <root>/tuner/oracle/lock.json                  lock_uri(root)
    <root>/tuner/result.json                       result_uri(root)
    <root>/tuner/best_hyperparameters.json         best_uri(root)
    <root>/trials/<id>/attempt-<n>/<file>          attempt_uri(root, id, n, file)
    <root>/models/<version>/<file>                 model_file_uri(root, version, file)
    <root>/models/LATEST                           latest_uri(root) (written last by retrain)

``root`` is ``Experiment.root_uri`` or the experiment itself (anything with ``root_uri``).
The names are the on-bucket contract: change one and every stored experiment breaks.
The documents stored at these paths are :mod:`skin.infra.documents`. No TensorFlow, no config
import.
"""

from __future__ import annotations

from skin.infra.storage import join

# <root>/<folder>
DATA, TUNER, TRIALS, MODELS = "data", "tuner", "trials", "models"

# data/ (stage)
MANIFEST = "manifest.json"
STAGE_REPORT = "stage_report.json"
QUARANTINE = "quarantine"

# tuner/ (chief)
ORACLE = "oracle"
LOCK = "lock.json"
RESULT = "result.json"
BEST = "best_hyperparameters.json"

# trials/<id>/[attempt-<n>/] (workers)
ATTEMPT_PREFIX = "attempt-"
EPOCH_WEIGHTS, EPOCH_STATE = "epoch.weights.h5", "epoch.json"
BEST_WEIGHTS, BUILD_CONFIG = "checkpoint.weights.h5", "build_config.json"

# models/ (retrain)
LATEST = "LATEST"
MODEL = "model.keras"
SERVING = "serving.json"  # beside model.keras, and inside the .keras archive as:
SERVING_ARCHIVE_ENTRY = "skin_serving.json"
METRICS = "metrics.json"
MODEL_CARD = "model_card.md"
SAVED_MODEL = "saved_model"
REPORT_HTML = "report.html"
SEARCH_PNG = "search.png"
LEARNING_CURVES_PNG = "learning_curves.png"
ROC_PNG = "roc.png"
CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"

# What marks a folder as an experiment root (skin.experiments).
MARKERS = (f"{DATA}/{MANIFEST}", f"{TUNER}/{RESULT}", f"{MODELS}/{LATEST}", f"{TUNER}/{ORACLE}/")


def _root(root) -> str:
    return root if isinstance(root, str) else root.root_uri


def data_uri(root) -> str:
    return join(_root(root), DATA)


def tuner_uri(root) -> str:
    return join(_root(root), TUNER)


def trials_uri(root) -> str:
    return join(_root(root), TRIALS)


def models_uri(root) -> str:
    return join(_root(root), MODELS)


def manifest_uri(root) -> str:
    return join(data_uri(root), MANIFEST)


def stage_report_uri(root) -> str:
    return join(data_uri(root), STAGE_REPORT)


def quarantine_uri(root, rel: str) -> str:
    return join(data_uri(root), QUARANTINE, rel)


def oracle_uri(root) -> str:
    return join(tuner_uri(root), ORACLE)


def lock_uri(root) -> str:
    return join(oracle_uri(root), LOCK)


def result_uri(root) -> str:
    return join(tuner_uri(root), RESULT)


def best_uri(root) -> str:
    return join(tuner_uri(root), BEST)


def attempt_dir(attempt: int) -> str:
    return f"{ATTEMPT_PREFIX}{int(attempt)}"


def attempt_of(folder: str) -> int | None:
    """``n`` of an ``attempt-<n>`` folder name; None for any other name."""
    if folder.startswith(ATTEMPT_PREFIX) and folder[len(ATTEMPT_PREFIX):].isdigit():
        return int(folder[len(ATTEMPT_PREFIX):])
    return None


def trial_uri(trials: str, trial_id: str, name: str, attempt: int | None = None) -> str:
    """``<trials>/<id>/[attempt-<n>/]<name>``; ``trials`` is the trials folder (trials_uri)."""
    if attempt is None:
        return join(trials, trial_id, name)
    return join(trials, trial_id, attempt_dir(attempt), name)


def model_dir_uri(root, version: str) -> str:
    return join(models_uri(root), version)


def model_file_uri(root, version: str, name: str = MODEL) -> str:
    return join(models_uri(root), version, name)


def latest_uri(root) -> str:
    return join(models_uri(root), LATEST)


# ---------------------------------------------------------------------------
# The objective and its direction: one rule for every role

# The objectives an experiment may name (search.objective) and what "better" means for each,
# stated, not guessed from the name (keras-tuner's infer_metric_direction knows these three).
OBJECTIVE_DIRECTIONS = {"val_auc": "max", "val_accuracy": "max", "val_loss": "min"}
DIRECTIONS = ("min", "max")


def objective_direction(objective: str) -> str:
    """``"min"`` or ``"max"`` for an objective of OBJECTIVE_DIRECTIONS; ValueError otherwise."""
    try:
        return OBJECTIVE_DIRECTIONS[objective]
    except (KeyError, TypeError):
        raise ValueError(f"objective {objective!r} has no known direction; expected one of "
                         f"{', '.join(OBJECTIVE_DIRECTIONS)} or an explicit "
                         "'min'/'max'") from None


def direction_of(doc: dict | None, objective: str) -> str:
    """The direction a document states (``result.json``, ``best_hyperparameters.json``:
    ``"direction": "min"|"max"``), else that of ``objective``."""
    stated = (doc or {}).get("direction")
    if stated in DIRECTIONS:
        return stated
    if stated is not None:
        raise ValueError(f"direction {stated!r} is not valid; expected 'min' or 'max'")
    return objective_direction(objective)
