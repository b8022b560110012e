"""The whole pipeline through the `skin` command: stage → chief + 2 workers → retrain → publish.

Real parts only: the GCS emulator, real chief and worker processes on loopback
gRPC, real TensorFlow training (tiny images, a couple of epochs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from skin.infra.config import load_experiment
from skin.infra.emulator import Emulator
from skin.infra.storage import Storage, join

pytestmark = pytest.mark.slow


def _experiment(tmp_path: Path, source: Path, bucket: str, **search) -> Path:
    doc = {
        "apiVersion": "skin/v1", "kind": "Experiment", "name": "e2e", "workers": 2,
        "storage": {"bucket": bucket, "prefix": "it"},
        "data": {"source": str(source), "validation_fraction": 0.25, "test_fraction": 0.2,
                 "image_size": 32, "seed": 1, "shards": 2},
        "search": {"tuner": "random", "max_trials": 4, "max_epochs": 2, "lease_seconds": 60,
                   **search},
        "retrain": {"epochs": 2, "patience": 0},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _skin_env(emulator) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKIN_", "KERASTUNER_"))}
    env.update(emulator.environ(), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return env


def test_skin_run_end_to_end(tmp_path, monkeypatch, emulator, bucket,
                             real_or_synthetic_images):
    """`skin run` on its embedded fake-gcs-server; the bucket stays under OUT/gcs/."""
    config = _experiment(tmp_path, real_or_synthetic_images, bucket)
    out = tmp_path / "out"
    env = {k: v for k, v in _skin_env(emulator).items() if k != "STORAGE_EMULATOR_HOST"}
    proc = subprocess.run(
        [sys.executable, "-m", "skin.cli", "run", "--config", str(config), "--out", str(out),
         "--metrics-port", "0"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "published model" in proc.stdout
    assert (out / "gcs" / bucket).is_dir()

    # The run is over and its emulator gone; the same folder served again has the whole bucket.
    reopened = Emulator(data_dir=out / "gcs").start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", reopened.endpoint)
    storage = Storage()
    exp = load_experiment(config, env={})
    try:
        _check_run(exp, storage, out)
    finally:
        reopened.stop()
    _check_published_copy(tmp_path, env, out, real_or_synthetic_images)


def _check_run(exp, storage, out: Path) -> None:
    assert storage.exists(join(exp.data_uri, "manifest.json"))
    result = storage.read_json(join(exp.tuner_uri, "result.json"))
    trials = result["trials"]
    assert len(trials) == 4
    assert len({t["id"] for t in trials}) == 4  # every trial ended exactly once
    assert all(t["status"] in ("completed", "failed") for t in trials)
    assert {t["worker"] for t in trials} == {"tuner0", "tuner1"}  # both workers ran trials
    best = storage.read_json(join(exp.tuner_uri, "best_hyperparameters.json"))
    completed = [t for t in trials if t["status"] == "completed"]
    assert best["score"] == pytest.approx(max(t["score"] for t in completed))

    version = storage.read_text(join(exp.models_uri, "LATEST")).strip()
    assert storage.exists(join(exp.models_uri, version, "model.keras"))
    assert _metrics_version(out) == version


def _metrics_version(out: Path) -> str:
    return json.loads((out / "model" / "metrics.json").read_text())["version"]


def _check_published_copy(tmp_path, env, out: Path, real_or_synthetic_images) -> None:
    model_dir = out / "model"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "test"
    assert 0.0 <= metrics["roc_auc"] <= 1.0

    # The published copy works with the emulator gone: evaluate and predict on real images.
    report = tmp_path / "eval.json"
    ev = subprocess.run([sys.executable, "-m", "skin.cli", "evaluate", "--model", str(model_dir),
                         "--data", str(real_or_synthetic_images), "--out", str(report)],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(report.read_text())
    n_images = sum(1 for _ in real_or_synthetic_images.rglob("*.jpg"))
    assert result["n"] == n_images
    (tn, fp), (fn, tp) = result["confusion_matrix"]
    assert tn + fp + fn + tp == n_images
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["roc_auc"] <= 1.0

    images = sorted(real_or_synthetic_images.rglob("*.jpg"))[:3]
    pr = subprocess.run([sys.executable, "-m", "skin.cli", "predict", "--model", str(model_dir),
                         *map(str, images)], env=env, capture_output=True, text=True, timeout=300)
    assert pr.returncode == 0, pr.stderr[-3000:]
    lines = [line for line in pr.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("path\tprobability\tlabel") and len(lines) == 4  # header + 3
    for image, line in zip(images, lines[1:]):
        assert str(image) in line and ("malignant" in line or "benign" in line)


def test_skin_run_sigterm_leaves_no_orphans(tmp_path, emulator, bucket, real_or_synthetic_images):
    config = _experiment(tmp_path, real_or_synthetic_images, bucket, max_trials=50, max_epochs=20)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "skin.cli", "run", "--config", str(config), "--out", str(out),
         "--metrics-port", "0"],
        env=_skin_env(emulator), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "logs" / "tuner1.log").exists():  # the workers are up
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        children = _descendants(proc.pid)
        assert len(children) >= 3  # chief and two workers at least
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    alive = [pid for pid in children if _alive(pid)]
    assert not alive, f"orphans left: {alive}"


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    parent = {}
    for line in out.split("\n"):
        if line.strip():
            p, pp = map(int, line.split())
            parent[p] = pp
    found, frontier = [], [pid]
    while frontier:
        cur = frontier.pop()
        kids = [p for p, pp in parent.items() if pp == cur]
        found += kids
        frontier += kids
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()
