"""skin status: parse a live chief endpoint, print the table, watch, read the bucket's best."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry

from skin.errors import EXIT_OK, EXIT_RETRYABLE
from skin.infra.config import parse_experiment
from skin.infra.documents import SearchResult
from skin.metrics.chief import ChiefMetrics
from skin.metrics.server import serve
from skin.metrics.worker import WorkerMetrics
from skin.status import fetch, format_status, main_status


@pytest.fixture
def chief():
    """A chief's metrics served on a free loopback port, mid-search."""
    registry = CollectorRegistry()
    c = ChiefMetrics(registry, objective="val_auc", workers=3, lease_seconds=60,
                       experiment="demo", tuner="hyperband")
    for trial, (worker, status, score) in enumerate([
            ("tuner0", "completed", 0.71), ("tuner1", "completed", 0.83), ("tuner0", "failed", None),
            ("tuner1", "reclaimed", None), ("tuner0", "completed", 0.78),
            ("tuner1", "released", None)]):
        c.trial_started(worker)
        c.trial_ended(status, 30.0, score, worker, trial_id=f"{trial:04d}")
    c.trial_started("tuner0")
    c.worker_report("tuner0", epoch=2, epochs_budget=6)
    c.trial_started("tuner1")
    c.worker_report("tuner1", epoch=0, epochs_budget=2)
    c.set_search_progress(5, 20, 900.0)
    with serve(registry, "127.0.0.1", 0) as server:
        yield c, f"127.0.0.1:{server.port}"


def test_fetch_reads_counts_best_workers_and_time_left(chief):
    _, address = chief
    st = fetch(address)
    assert st.trials == {"running": 2, "completed": 3, "failed": 1, "invalid": 0, "reclaimed": 1,
                         "released": 1}
    assert st.started == 8
    assert st.best == pytest.approx(0.83)
    assert st.best_trial == "1"
    assert st.objective == "val_auc" and st.direction == "max"
    assert st.experiment == "demo" and st.tuner == "hyperband"
    assert [w.worker for w in st.workers] == ["tuner0", "tuner1", "tuner2"]
    w0, w1, w2 = st.workers
    assert (w0.running, w0.epoch, w0.epochs_budget) == (True, 2, 6)
    assert (w1.running, w1.epoch, w1.epochs_budget) == (True, 0, 2)
    assert w0.last_report_age < 30
    assert (w2.running, w2.last_report_age) == (False, None)  # expected, never reported
    assert (st.workers_connected, st.workers_expected) == (2, 3)
    assert (st.done, st.total_estimate) == (5, 20)
    assert 880 < st.time_left <= 900
    assert not st.finished


def test_format_status_prints_the_table(chief):
    _, address = chief
    text = format_status(fetch(address))
    lines = text.splitlines()
    assert lines[0] == f"search demo (hyperband, maximise val_auc) at {address}: running"
    assert lines[1] == ("trials     running 2  completed 3  failed 1  invalid 0  reclaimed 1  "
                        "released 1")
    assert re.fullmatch(r"progress   5 of ~20 trials done; time left 1[45]m\d\ds", lines[2])
    assert lines[3].startswith("best       val_auc 0.8300 (trial 1), improved ")
    assert lines[4] == "workers    2 connected of 3"
    rows = {line.split()[0]: line.split() for line in lines[6:]}
    assert rows["tuner0"][:3] == ["tuner0", "running", "2/6"]
    assert rows["tuner1"][:3] == ["tuner1", "running", "0/2"]
    assert rows["tuner2"] == ["tuner2", "idle", "-", "never"]


def test_a_finished_search_and_an_empty_one():
    registry = CollectorRegistry()
    c = ChiefMetrics(registry, objective="val_loss")
    with serve(registry, "127.0.0.1", 0) as server:
        st = fetch(f"http://127.0.0.1:{server.port}/metrics")
        assert st.best is None and st.best_trial is None and st.time_left is None
        text = format_status(st)
        assert "best       val_loss -" in text and "time left -" in text
        c.trial_started("tuner0")
        c.trial_ended("completed", 5.0, 0.4, "tuner0")  # no trial id given
        c.search_finished()
        st = fetch(f"127.0.0.1:{server.port}")
        assert st.finished and st.time_left == 0 and st.best == pytest.approx(0.4)
        assert st.best_trial is None
        assert format_status(st).splitlines()[0].endswith(": finished")


def test_main_status_once_and_when_the_chief_is_unreachable(chief, capsys):
    _, address = chief
    out = io.StringIO()
    assert main_status(address, watch=False, out=out) == EXIT_OK
    assert "completed 3" in out.getvalue()
    server_gone = "127.0.0.1:1"
    assert main_status(server_gone, watch=False, out=io.StringIO()) == EXIT_RETRYABLE
    assert "cannot read the chief's metrics at http://127.0.0.1:1/metrics" in capsys.readouterr().err


def test_a_worker_endpoint_is_not_a_chief(capsys):
    registry = CollectorRegistry()
    WorkerMetrics(registry, "tuner0")
    with serve(registry, "127.0.0.1", 0) as server:
        with pytest.raises(ValueError, match="not serve a skin chief"):
            fetch(f"127.0.0.1:{server.port}")
        assert main_status(f"127.0.0.1:{server.port}", out=io.StringIO()) == EXIT_RETRYABLE


def test_watch_refreshes_with_new_values(chief):
    c, address = chief
    out = io.StringIO()

    def between_refreshes(seconds):  # the search moves on while status sleeps
        assert seconds == 0.5
        c.trial_ended("completed", 40.0, 0.9, "tuner0", trial_id="0007")

    code = main_status(address, watch=True, interval=0.5, out=out, refreshes=2,
                       sleep=between_refreshes)
    assert code == EXIT_OK
    tables = out.getvalue().split("(refreshing every 0.5s; Ctrl-C to stop)")
    assert "completed 3" in tables[0] and "completed 4" in tables[1]
    assert "val_auc 0.9000 (trial 7)" in tables[1]
    assert "\033[H" not in out.getvalue()  # no screen clearing when not a terminal


def test_status_adds_the_best_hyperparameters_from_the_bucket(chief, storage, bucket):
    _, address = chief
    exp = parse_experiment({"apiVersion": "skin/v1", "kind": "Experiment", "name": "demo",
                            "storage": {"bucket": bucket}}, env={})
    out = io.StringIO()
    main_status(address, out=out, experiment=exp, storage=storage)  # nothing there yet
    assert "learning_rate" not in out.getvalue()
    storage.write_json(exp.tuner_uri + "/best_hyperparameters.json", {
        "trial_id": "0001", "score": 0.83, "objective": "val_auc", "direction": "max",
        "epochs": 6, "best_epoch": 4, "hyperparameters": {"learning_rate": 0.001, "filters": 32}})
    out = io.StringIO()
    assert main_status(address, out=out, experiment=exp, storage=storage) == EXIT_OK
    assert "filters=32, learning_rate=0.001" in out.getvalue()


def test_the_skin_status_command(chief):
    _, address = chief
    env = dict(os.environ, SKIN_LOG_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-m", "skin.cli", "status", "--address", address],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "trials     running 2  completed 3  failed 1  invalid 0  reclaimed 1" in out.stdout


# ---------------------------------------------------------------------------
# When the chief cannot be reached: how to reach it, and what the bucket says


def test_the_port_forward_hint_names_what_the_manifests_name():
    import shutil
    import subprocess

    import yaml

    from skin import status

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    service = yaml.safe_load((repo / "k8s/base/network/chief-service.yaml").read_text())
    namespace = yaml.safe_load((repo / "k8s/namespace.yaml").read_text())
    assert service["metadata"]["name"] == status.CHIEF_SERVICE
    assert namespace["metadata"]["name"] == status.K8S_NAMESPACE
    metrics_port = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert metrics_port["port"] == status.CHIEF_METRICS_PORT
    for overlay in ("tuning", "kind"):
        kustomization = yaml.safe_load((repo / f"k8s/{overlay}/kustomization.yaml").read_text())
        assert kustomization.get("namespace", status.K8S_NAMESPACE) == status.K8S_NAMESPACE
        if shutil.which("kubectl"):  # the chief's Service as the overlay names it
            docs = yaml.safe_load_all(subprocess.run(
                ["kubectl", "kustomize", str(repo / "k8s" / overlay)], check=True,
                capture_output=True, text=True).stdout)
            (chief,) = [d for d in docs if d["kind"] == "Service"
                        and d["spec"]["selector"].get("app.kubernetes.io/component") == "chief"]
            name = chief["metadata"]["labels"]["skin/experiment"]
            assert chief["metadata"]["name"] == status.chief_service(name)
    # The experiment known (--config): its Service; unknown: a placeholder and how to list them.
    hint = status.port_forward_hint("127.0.0.1:9191", "quickstart")
    assert "kubectl -n skin port-forward svc/skin-chief-quickstart 9191:9090" in hint
    hint = status.port_forward_hint("127.0.0.1:9191")
    assert "kubectl -n skin port-forward svc/skin-chief-EXPERIMENT 9191:9090" in hint
    assert "kubectl -n skin get svc -l app.kubernetes.io/component=chief" in hint


def _three_experiments(storage, bucket: str) -> dict[str, str]:
    """A published, a failed and a running experiment, written the way stage, the chief
    and the retrain write them (the running one through the chief's own journal store)."""
    from skin.tuning.journal import OracleStore

    base = f"gs://{bucket}/experiments"
    manifest = {"version": 1, "source": "synthetic", "synthetic": True,
                "splits": {"train": {"count": 40}, "validation": {"count": 10},
                           "test": {"count": 10}}}
    roots = {name: f"{base}/{name}" for name in ("done", "broken", "running")}
    for root in roots.values():
        storage.write_json(f"{root}/data/manifest.json", manifest)
    storage.write_json(f"{roots['done']}/tuner/result.json", SearchResult(
        outcome="completed", reason="", tuner="random", objective="val_auc", direction="max",
        best={"trial_id": "0003", "score": 0.8123}, counts={"completed": 5, "failed": 1}).to_json())
    storage.write_json(f"{roots['done']}/models/20260101-000000/metrics.json", {
        "evaluated_on": "test", "n": 10, "roc_auc": 0.75, "sensitivity": 0.8,
        "specificity": 0.6, "threshold": 0.4, "intervals_95": {"roc_auc": [0.6, 0.9]}})
    storage.write_text(f"{roots['done']}/models/LATEST", "20260101-000000\n")
    storage.write_json(f"{roots['broken']}/tuner/result.json", SearchResult(
        outcome="failed", reason="3 consecutive trials failed", tuner="random",
        objective="val_auc", direction="max", counts={"failed": 3}).to_json())
    store = OracleStore(storage, f"{roots['running']}/tuner/oracle")
    store.write_batch(0, {"version": 1}, {
        "0000": {"trial": {"trial_id": "0000", "status": "COMPLETED", "score": 0.7}, "meta": {}},
        "0001": {"trial": {"trial_id": "0001", "status": "RUNNING", "score": None}, "meta": {}}})
    store.write_batch(1, None, {
        "0002": {"trial": {"trial_id": "0002", "status": "RUNNING", "score": None}, "meta": {}}})
    return roots


def test_experiment_states_from_the_bucket(storage, bucket):
    from skin.experiments import experiment_state, format_table, list_experiments

    roots = _three_experiments(storage, bucket)
    states = {s["experiment"]: s for s in list_experiments(storage, f"gs://{bucket}")}
    assert {k: v["state"] for k, v in states.items()} == {
        "done": "published", "broken": "failed", "running": "searching"}
    assert states["done"]["published"] == "20260101-000000"
    assert states["done"]["best"] == {"trial_id": "0003", "score": 0.8123}
    assert states["done"]["test"]["roc_auc_interval_95"] == [0.6, 0.9]
    assert states["broken"]["reason"] == "3 consecutive trials failed"
    assert states["running"]["trials"] == {"completed": 1, "running": 2}
    assert states["running"]["images"] == {"train": 40, "validation": 10, "test": 10}
    assert experiment_state(storage, f"gs://{bucket}/nothing")["state"] == "empty"
    # A completed search without a published model is being retrained.
    storage.write_json(f"{roots['running']}/tuner/result.json", SearchResult(
        outcome="completed", reason="", tuner="random", objective="val_auc", direction="max",
        best={"trial_id": "0000", "score": 0.7}, counts={"completed": 3}).to_json())
    assert experiment_state(storage, roots["running"])["state"] == "retraining"
    table = format_table(list_experiments(storage, f"gs://{bucket}/experiments"))
    assert re.search(r"done\s+published\s+6\s+0\.8123\s+20260101-000000", table), table


def test_unreachable_chief_says_how_to_reach_it_and_falls_back_to_the_bucket(
        storage, bucket, capsys):
    roots = _three_experiments(storage, bucket)
    out = io.StringIO()
    assert main_status("127.0.0.1:1", out=out, bucket=roots["running"],
                       storage=storage) == EXIT_OK
    err = capsys.readouterr().err
    assert "cannot read the chief's metrics" in err
    assert "kubectl -n skin port-forward svc/skin-chief-EXPERIMENT 1:9090" in err
    text = out.getvalue()
    assert f"From the bucket ({roots['running']})" in text
    assert "experiment running" in text and ": searching" in text
    assert "trials     completed 1  running 2" in text
    # Without a bucket: the hint, and exit 75 as before.
    assert main_status("127.0.0.1:1", out=io.StringIO()) == EXIT_RETRYABLE
    assert "port-forward" in capsys.readouterr().err
    # With the experiment (--config): its own chief's Service, and its state in the bucket.
    from skin.infra.config import parse_experiment

    exp = parse_experiment({"apiVersion": "skin/v1", "kind": "Experiment", "name": "running",
                            "storage": {"bucket": bucket, "prefix": "experiments"}}, env={})
    assert exp.root_uri == roots["running"]
    assert main_status("127.0.0.1:1", out=io.StringIO(), experiment=exp,
                       storage=storage) == EXIT_OK
    assert "port-forward svc/skin-chief-running 1:9090" in capsys.readouterr().err


def test_the_skin_status_command_falls_back_to_the_bucket(storage, bucket):
    roots = _three_experiments(storage, bucket)
    env = dict(os.environ, SKIN_LOG_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-m", "skin.cli", "status", "--address",
                          "127.0.0.1:1", "--bucket", f"gs://{bucket}"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == EXIT_OK, out.stderr
    assert "port-forward svc/skin-chief" in out.stderr
    for name, state in (("done", "published"), ("broken", "failed"),
                        ("running", "searching")):
        assert f"experiment {name} at {roots[name]}: {state}" in out.stdout
    assert "published  20260101-000000 (test ROC AUC 0.750, 95 % CI 0.600-0.900)" in out.stdout


def test_skin_experiments_lists_them_with_their_state(storage, bucket):
    import json

    roots = _three_experiments(storage, bucket)
    env = dict(os.environ, SKIN_LOG_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-m", "skin.cli", "experiments", "--bucket",
                          f"gs://{bucket}", "--format", "json"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == EXIT_OK, out.stderr
    doc = {d["experiment"]: d for d in json.loads(out.stdout)}
    assert {k: (v["state"], v["root"]) for k, v in doc.items()} == {
        "done": ("published", roots["done"]), "broken": ("failed", roots["broken"]),
        "running": ("searching", roots["running"])}
    assert doc["done"]["best"]["score"] == 0.8123 and doc["done"]["published"] == "20260101-000000"
    text = subprocess.run([sys.executable, "-m", "skin.cli", "experiments", "--bucket",
                           f"gs://{bucket}/experiments"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert text.returncode == EXIT_OK, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:5] == ["EXPERIMENT", "STATE", "TRIALS", "BEST", "PUBLISHED"]
    assert len(lines) == 4 and any(re.match(r"running\s+searching\s+3\s", ln) for ln in lines)
