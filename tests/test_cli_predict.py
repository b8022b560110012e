"""`skin predict` and `skin evaluate` as a user or a script runs them: the installed
`skin` command in a subprocess. Exit codes (0 all scored, 1 some not, 3 none, 2 a bad
model), machine-readable output that parses and carries every field, paths on standard
input, a quiet standard error, and the warning for a model trained on synthetic images
(published by a real stage + retrain of synthetic images)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from skin.errors import EXIT_CONFIG, EXIT_DATA, EXIT_OK, EXIT_SOME_FAILED
from skin.serving import evaluate as ev

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import publish_tiny

pytestmark = pytest.mark.slow  # every test runs the skin CLI as a process (TensorFlow starts)

SKIN = shutil.which("skin", path=str(Path(sys.executable).parent)) or shutil.which("skin")


def skin(*args: str, stdin: str | None = None, env: dict | None = None):
    assert SKIN, "the skin command is not installed (make venv)"
    return subprocess.run([SKIN, *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return publish_tiny(tmp_path_factory.mktemp("cli") / "model", threshold=0.5,
                        version="20250102-030405")


@pytest.fixture(scope="module")
def images(real_or_synthetic_images) -> list[Path]:
    return sorted(real_or_synthetic_images.rglob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    return [folder / "text.jpg", folder / "empty.png", folder / "missing.jpg"]


def _rows(stdout: str, delimiter: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(stdout), delimiter=delimiter))


def test_all_scored_exit_0_tsv_with_a_header_and_a_quiet_stderr(model, images):
    out = skin("predict", "--model", model, *images)
    assert out.returncode == EXIT_OK, out.stderr
    assert out.stdout.splitlines()[0] == "\t".join(ev.PREDICTION_FIELDS)
    rows = _rows(out.stdout, "\t")
    assert [r["path"] for r in rows] == list(map(str, images))
    for r in rows:
        p = float(r["probability"])
        assert r["label"] == ("malignant" if p >= 0.5 else "benign")
        assert (r["threshold"], r["model_version"], r["error"]) == ("0.500000",
                                                                    "20250102-030405", "")
    # No TensorFlow start-up lines, no INFO logging: nothing failed, nothing to say.
    assert out.stderr == "", out.stderr


def test_verbose_lets_the_logging_through(model, images):
    out = skin("predict", "--verbose", "--model", model, images[0])
    assert out.returncode == EXIT_OK
    assert "loaded model" in out.stderr


def test_some_failed_exit_1_each_named_on_stderr_json_carries_every_field(model, images, bad):
    asked = [images[0], *bad, images[1]]
    out = skin("predict", "--format", "json", "--model", model, *asked)
    assert out.returncode == EXIT_SOME_FAILED, out.stderr
    doc = json.loads(out.stdout)
    assert [d["path"] for d in doc] == list(map(str, asked))
    for d in doc:
        assert set(d) == set(ev.PREDICTION_FIELDS)
        assert (d["threshold"], d["model_version"]) == (0.5, "20250102-030405")
    scored = [d for d in doc if d["error"] is None]
    assert len(scored) == 2 and all(0 <= d["probability"] <= 1 and d["label"] in
                                    ("benign", "malignant") for d in scored)
    failed = {d["path"]: d["error"] for d in doc if d["error"] is not None}
    assert failed[str(bad[2])] == "no such file"
    for path, reason in failed.items():
        assert f"skin predict: {path}: {reason}" in out.stderr
    assert "3 of 5 images could not be scored (exit 1)" in out.stderr


@pytest.mark.parametrize("how", ["unreadable", "missing", "stdin-missing"])
def test_nothing_scored_is_exit_3_never_0(model, bad, how):
    if how == "unreadable":
        out = skin("predict", "--model", model, *bad[:2])
    elif how == "missing":
        out = skin("predict", "--model", model, "/etc/nonexistent.jpg", "missing.jpg")
    else:
        out = skin("predict", "--model", model, "-", stdin="/nope/a.jpg\n/nope/b.jpg\n")
    assert out.returncode == EXIT_DATA, out.stderr
    assert "none of the 2 images could be scored (exit 3)" in out.stderr


def test_no_images_at_all_is_exit_3(model, tmp_path):
    (tmp_path / "empty").mkdir()
    out = skin("predict", "--model", model, tmp_path / "empty")
    assert out.returncode == EXIT_DATA
    assert "no images to predict" in out.stderr


def test_paths_from_stdin_and_csv_output(model, images):
    stdin = "".join(f"{p}\n" for p in images) + "\n"  # a blank line is not a path
    out = skin("predict", "--format", "csv", "--model", model, "-", stdin=stdin)
    assert out.returncode == EXIT_OK, out.stderr
    rows = _rows(out.stdout, ",")
    assert [r["path"] for r in rows] == list(map(str, images))
    assert all(set(r) == set(ev.PREDICTION_FIELDS) and r["model_version"] == "20250102-030405"
               for r in rows)


def test_a_missing_model_is_named_first(tmp_path):
    missing = tmp_path / "no-model"
    out = skin("predict", "--model", missing, tmp_path / "no-image.jpg")
    assert out.returncode == EXIT_CONFIG
    assert f"--model {missing}: no such file or folder" in out.stderr
    # evaluate: the model before the data, even when both are wrong.
    out = skin("evaluate", "--model", missing, "--data", tmp_path / "no-data")
    assert out.returncode == EXIT_CONFIG
    assert f"--model {missing}: no such file or folder" in out.stderr
    assert "no-data" not in out.stderr


def test_evaluate_json_with_prevalence(model, real_or_synthetic_images, tmp_path):
    out = skin("evaluate", "--model", model, "--data", real_or_synthetic_images,
               "--format", "json", "--prevalence", "0.05", "--out", tmp_path / "e.json")
    assert out.returncode == EXIT_OK, out.stderr
    doc = json.loads(out.stdout)
    assert doc == json.loads((tmp_path / "e.json").read_text())
    n = len(list(real_or_synthetic_images.rglob("*.jpg")))
    assert doc["n"] == n and doc["version"] == "20250102-030405"
    assert doc["interval_methods"]["roc_auc"] == "DeLong"
    lo, hi = doc["intervals_95"]["roc_auc"]
    assert lo <= doc["roc_auc"] <= hi
    assert 0 <= doc["brier"] <= 1 and 0 <= doc["ece"] <= 1
    assert doc["calibration"]["bins"] == 10
    pv = doc["at_prevalence"]
    assert pv["prevalence"] == 0.05
    from skin.serving.clinical import predictive_values

    assert pv["ppv"] == pytest.approx(predictive_values(doc, 0.05)["ppv"])
    text = skin("evaluate", "--model", model, "--data", real_or_synthetic_images,
                "--prevalence", "0.05")
    assert text.returncode == EXIT_OK
    for needle in ("ROC AUC", "(DeLong)", "Brier score", "ECE", "10 equal-width bins",
                   "PPV", "at a prevalence of 5 %"):
        assert needle in text.stdout, needle
    bad = skin("evaluate", "--model", model, "--data", real_or_synthetic_images,
               "--prevalence", "5")
    assert bad.returncode == EXIT_CONFIG and "--prevalence" in bad.stderr


# ---------------------------------------------------------------------------
# A model trained on synthetic images: stage `synthetic`, retrain (tiny stand-in model)


@pytest.fixture(scope="module")
def synthetic_model(emulator, tmp_path_factory):
    from skin.context import RoleContext
    from skin.infra.runtime import Runtime
    from skin.infra.storage import Storage
    from skin.publishing import retrain as rt
    from skin.staging.stage import stage
    from test_retrain import _stand_in_hypermodel, experiment

    bucket = f"syn-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    exp = experiment(bucket, "synthetic", epochs=1)
    exp = replace(exp, data=replace(exp.data, synthetic_images_per_class=24))
    storage = Storage()
    work = tmp_path_factory.mktemp("synwork")
    stage(exp, storage, work_dir=work / "stage")
    published = rt.retrain(RoleContext.with_hypermodel(exp, Runtime(work_dir=work), storage,
                                                       _stand_in_hypermodel()),
                           best={"trial_id": "0001", "score": 0.5, "objective": "val_auc",
                                 "epochs": 1, "hyperparameters": {"units": 4}})
    return published


def test_synthetic_model_card_serving_and_warnings(synthetic_model, images):
    card = (synthetic_model.local_dir / "model_card.md").read_text()
    assert "SYNTHETIC images" in card and "- source: synthetic images" in card
    assert "ISIC" not in card and "CC-BY-NC" not in card
    serving = json.loads((synthetic_model.local_dir / "serving.json").read_text())
    assert serving["data_source"]["kind"] == "synthetic"
    report = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "",
                    (synthetic_model.local_dir / "report.html").read_text())
    assert "Trained on SYNTHETIC images" in report and "ISIC" not in report

    out = skin("predict", "--model", synthetic_model.local_dir, *images)
    assert out.returncode == EXIT_OK, out.stderr
    assert out.stderr.count("trained on SYNTHETIC images") == 1, out.stderr
    folder = images[0].parent.parent
    out = skin("evaluate", "--model", synthetic_model.local_dir, "--data", folder)
    assert out.returncode == EXIT_OK, out.stderr
    assert out.stderr.count("trained on SYNTHETIC images") == 1, out.stderr
    assert "Trained on:   SYNTHETIC images" in out.stdout


def test_a_real_folder_model_does_not_warn(model, images):
    out = skin("predict", "--model", model, images[0])
    assert "SYNTHETIC" not in out.stderr
