"""A real Prometheus scrapes real metrics endpoints; the rules pass promtool.

The live part starts Debian's ``prometheus`` on a free loopback port with a
1 s scrape interval and our alert rules loaded. It scrapes a chief and two
workers served by skin.metrics from this process, driven through the hooks
by a simulated search (two worker threads calling the chief's hooks the way
skin.tuning does), then checks through the HTTP API that what Prometheus
stored matches the search, that every dashboard and rule expression runs,
that the main panels have data and that the search-finished alert fires.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from conftest import free_port
from skin.metrics import TRIAL_END_STATUSES
from skin.metrics.chief import ChiefMetrics
from skin.metrics.server import serve
from skin.metrics.worker import WorkerMetrics
from skin.status import fetch, format_status

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "k8s/monitoring"
RULE_FILE = MONITORING / "prometheusrule.yaml"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.test.yaml"))
DASHBOARD = MONITORING / "dashboards/skin-search.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

# Grafana's variables, as Grafana would expand them for a short range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m",
                     "$namespace": ".*", "${namespace}": ".*",
                     "$experiment": ".*", "${experiment}": ".*"}
# Panels that must show numbers (not just run) after a search with completed trials.
MAIN_PANELS = ("Trials completed", "Best objective", "Trials over time by status",
               "Best objective over time", "Per-worker epoch progress", "Training throughput",
               "Trial durations", "Failures and reclaims", "Time left", "Worker last report age",
               "Loss after last epoch", "Search progress", "Workers connected")


def _need(tool: str | None, name: str) -> str:
    if tool is None:
        pytest.fail(f"{name} is not installed: `make system-deps` (Debian package prometheus)")
    return tool


def write_rule_file(directory: Path) -> Path:
    """The PrometheusRule's ``spec`` as a plain rule file (what promtool and Prometheus read)."""
    spec = yaml.safe_load(RULE_FILE.read_text())["spec"]
    path = directory / "skin-rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables expanded) for every panel and annotation."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    out += [(f"annotation {a['name']}", a["expr"]) for a in dash["annotations"]["list"]
            if a.get("expr")]
    expanded = []
    for title, expr in out:
        for var, repl in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, repl)
        assert "$" not in expr, f"{title}: unexpanded variable in {expr}"
        expanded.append((title, expr))
    return expanded


def rule_expressions() -> list[tuple[str, str]]:
    spec = yaml.safe_load(RULE_FILE.read_text())["spec"]
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in spec["groups"]
            for r in g["rules"]]


# ---------------------------------------------------------------------------
# promtool


def test_promtool_checks_the_rules(tmp_path):
    rules = write_rule_file(tmp_path)
    out = subprocess.run([_need(PROMTOOL, "promtool"), "check", "rules", str(rules)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in out.stdout


def test_promtool_unit_tests_cover_every_alert(tmp_path):
    write_rule_file(tmp_path)
    alerts = {name for name, _ in rule_expressions()}
    tested = set()
    copies = []
    for test_file in RULE_TESTS:
        doc = yaml.safe_load(test_file.read_text())
        assert doc["rule_files"] == ["skin-rules.yaml"], test_file
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):  # a test where it fires, not only where it stays quiet
                    tested.add(check["alertname"])
        copies.append(shutil.copy(test_file, tmp_path))
    assert alerts - tested == set(), "alerts without a promtool test where they fire"
    out = subprocess.run([_need(PROMTOOL, "promtool"), "test", "rules", *copies],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------
# A real Prometheus


class Prometheus:
    """``prometheus`` on a loopback port, scraping the given targets every second."""

    def __init__(self, workdir: Path, scrape: dict[str, list[tuple[str, dict]]],
                 rule_file: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "900ms"},
            "rule_files": [str(rule_file)] if rule_file else [],
            "scrape_configs": [
                {"job_name": job,
                 "static_configs": [{"targets": [addr], "labels": labels}
                                    for addr, labels in targets]}
                for job, targets in scrape.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [_need(PROMETHEUS, "prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.workdir = workdir
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not become ready in 60 s")
            time.sleep(0.2)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str, **labels) -> float | None:
        """The single sample of ``expr`` (matching ``labels``), or None when there is none."""
        rows = [r for r in self.query(expr)
                if all(r["metric"].get(k) == v for k, v in labels.items())]
        assert len(rows) <= 1, f"{expr} {labels}: {len(rows)} series"
        return float(rows[0]["value"][1]) if rows else None

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict]:
        """Poll until ``expr`` returns something."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.query(expr)
            if rows:
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"no result for {expr} after {timeout} s")
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------
# A simulated search through the hooks (until a test drives a real skin.tuning run)


@dataclass
class SearchTruth:
    ended: dict[str, int] = field(default_factory=lambda: {s: 0 for s in TRIAL_END_STATUSES})
    best: float | None = None
    best_trial: str | None = None
    epochs: dict[str, int] = field(default_factory=dict)
    images: dict[str, float] = field(default_factory=dict)
    last_val_loss: dict[str, float] = field(default_factory=dict)


# (status, score): one plan entry per trial; workers take the next one when free.
PLAN = [("completed", 0.61), ("completed", 0.72), ("failed", None), ("completed", 0.69),
        ("completed", 0.80), ("reclaimed", None), ("completed", 0.75), ("invalid", None)]
EPOCHS = 3
EPOCH_SECONDS = 0.25


def simulate_search(chief: ChiefMetrics, workers: dict[str, WorkerMetrics]) -> SearchTruth:
    truth = SearchTruth()
    lock = threading.Lock()
    plan = list(enumerate(PLAN))
    rng = random.Random(7)

    def work(name: str, w: WorkerMetrics) -> None:
        w.data_synced(3_000_000, 0.2)
        while True:
            with lock:
                if not plan:
                    return
                number, (status, score) = plan.pop(0)
                trial_id = f"{number:02d}"
            chief.oracle_call("CreateTrial", rng.uniform(0.001, 0.01))
            chief.trial_started(name)
            w.trial_started(EPOCHS)
            t0 = time.monotonic()
            epochs = EPOCHS if status == "completed" else 1
            for e in range(epochs):
                time.sleep(EPOCH_SECONDS)
                logs = {"loss": 0.7 - 0.1 * e, "val_loss": 0.75 - 0.1 * e,
                        "val_auc": (score or 0.5) - 0.05 * (epochs - 1 - e)}
                w.epoch_ended(e, EPOCH_SECONDS, 400.0, logs)
                chief.oracle_call("UpdateTrial", rng.uniform(0.001, 0.005))
                chief.worker_report(name, epoch=e + 1, epochs_budget=EPOCHS)
                with lock:
                    truth.epochs[name] = truth.epochs.get(name, 0) + 1
                    truth.images[name] = truth.images.get(name, 0) + 400.0 * EPOCH_SECONDS
                    truth.last_val_loss[name] = logs["val_loss"]
            chief.oracle_call("EndTrial", rng.uniform(0.001, 0.01))
            chief.trial_ended(status, time.monotonic() - t0, score, name, trial_id=trial_id)
            w.trial_finished("failed" if status == "reclaimed" else status)
            with lock:
                truth.ended[status] += 1
                if status == "completed" and (truth.best is None or score > truth.best):
                    truth.best, truth.best_trial = score, trial_id
                done = sum(truth.ended.values())
            chief.set_search_progress(done, len(PLAN), None)

    threads = [threading.Thread(target=work, args=(n, w)) for n, w in workers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    chief.search_finished()
    return truth


@dataclass
class Live:
    prom: Prometheus
    truth: SearchTruth
    chief_address: str
    workers: list[str]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    rules = write_rule_file(workdir)
    chief_registry = CollectorRegistry()
    chief = ChiefMetrics(chief_registry, objective="val_auc", workers=2, lease_seconds=30,
                           experiment="simulated", tuner="random")
    names = ["tuner0", "tuner1"]
    worker_metrics = {}
    servers = [serve(chief_registry, "127.0.0.1", 0)]
    for name in names:
        registry = CollectorRegistry()
        worker_metrics[name] = WorkerMetrics(registry, name, objective="val_auc")
        servers.append(serve(registry, "127.0.0.1", 0))
    address = lambda s: f"127.0.0.1:{s.port}"  # noqa: E731
    prom = Prometheus(workdir, {
        "skin-chief": [(address(servers[0]), {"role": "chief"})],
        "skin-worker": [(address(s), {"role": "worker"}) for s in servers[1:]],
    }, rules)
    try:
        # Start the search once every target has been scraped, so Prometheus sees it all.
        deadline = time.monotonic() + 30
        while prom.value("count(up == 1)") != 3:
            assert time.monotonic() < deadline, "targets not up after 30 s"
            time.sleep(0.25)
        truth = simulate_search(chief, worker_metrics)
        for server in servers:  # the final values have been scraped
            assert server.wait_for_scrape(10), "no scrape after the search ended"
        prom.wait_for("skin_chief_search_finished == 1")
        yield Live(prom, truth, address(servers[0]), names)
    finally:
        prom.stop()
        for server in servers:
            server.close()


@pytest.mark.slow
def test_stored_values_match_the_search(live):
    prom, truth = live.prom, live.truth
    for status, count in truth.ended.items():
        assert prom.value(f'skin_chief_trials_ended_total{{status="{status}"}}') == count, status
    completed = prom.value('sum(skin_chief_trials_ended_total{status="completed"})')
    assert completed == sum(1 for s, _ in PLAN if s == "completed")
    assert prom.value("skin_chief_trials_started_total") == len(PLAN)
    assert prom.value("skin_chief_trials_running") == 0
    assert prom.value("skin_chief_best_objective") == pytest.approx(truth.best)
    assert prom.value("skin_chief_best_trial_number") == int(truth.best_trial)
    assert prom.value("skin_chief_search_finished") == 1
    assert prom.value("skin_chief_trial_duration_seconds_count", status="completed") == completed
    # Per-worker series exist for both workers, on the chief and on each worker.
    for name in live.workers:
        assert prom.value("skin_chief_worker_last_report_timestamp_seconds", worker=name) > 0
        assert prom.value("skin_worker_epochs_total", worker=name) == truth.epochs[name]
        assert prom.value("skin_worker_train_images_total", worker=name) == \
            pytest.approx(truth.images[name])
        assert prom.value("skin_worker_epoch_loss", worker=name, split="validation") == \
            pytest.approx(truth.last_val_loss[name])
        assert prom.value("skin_worker_trial_epochs_budget", worker=name) == EPOCHS
        assert prom.value("skin_worker_data_synced_bytes_total", worker=name) == 3_000_000
    assert prom.value('sum(skin_worker_trials_ended_total{status="completed"})') == completed
    assert prom.value("skin_chief_workers_connected") == 2
    build = prom.query("skin_build_info")
    assert sorted(r["metric"]["role"] for r in build) == ["chief", "worker", "worker"]
    # The epochs went through the chief too: more than one sample of progress while running.
    assert prom.value("changes(skin_chief_last_progress_timestamp_seconds[1m])") >= 2


@pytest.mark.slow
def test_every_dashboard_expression_runs_and_the_main_panels_have_data(live):
    targets = dashboard_targets()
    titles = {t for t, _ in targets}
    assert set(MAIN_PANELS) <= titles, set(MAIN_PANELS) - titles
    empty = []
    for title, expr in targets:
        rows = live.prom.query(expr)  # raises on a PromQL error
        if title in MAIN_PANELS:
            numbers = [float(r["value"][1]) for r in rows]
            if not any(v == v for v in numbers):  # no series, or only NaN
                empty.append(f"{title}: {expr}")
    assert not empty, "main panels without data:\n" + "\n".join(empty)
    # Spot checks: what the panels show is the search's truth.
    exprs = dict((t, e) for t, e in reversed(targets))
    assert live.prom.value(exprs["Trials completed"]) == live.truth.ended["completed"]
    assert live.prom.value(exprs["Best objective"]) == pytest.approx(live.truth.best)
    assert live.prom.value(exprs["Time left"]) == 0  # the search has finished
    progress = live.prom.query(exprs["Per-worker epoch progress"])
    assert sorted(r["metric"]["worker"] for r in progress) == live.workers


@pytest.mark.slow
def test_every_rule_expression_runs_and_prometheus_evaluates_the_rules(live):
    for _name, expr in rule_expressions():
        live.prom.query(expr)  # raises on a PromQL error
    deadline = time.monotonic() + 20
    while True:
        groups = live.prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("2") and
                         not r["lastEvaluation"].startswith("0001") for r in rules):
            break
        assert time.monotonic() < deadline, "rules not evaluated"
        time.sleep(0.5)
    assert {r["name"] for r in rules} == {n for n, _ in rule_expressions()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                     for r in rules]
    firing = {a["labels"]["alertname"]: a for a in live.prom.api("alerts")["alerts"]
              if a["state"] == "firing"}
    assert "SkinSearchFinished" in firing
    assert firing["SkinSearchFinished"]["labels"]["severity"] == "info"
    # Nothing is wrong with this search: no warning or critical alert.
    assert set(firing) == {"SkinSearchFinished"}, firing


@pytest.mark.slow
def test_skin_status_reads_the_running_chief(live):
    status = fetch(live.chief_address)
    truth = live.truth
    assert status.trials == {"running": 0, **truth.ended}
    assert status.best == pytest.approx(truth.best)
    assert status.best_trial == str(int(truth.best_trial))
    assert [w.worker for w in status.workers] == live.workers
    text = format_status(status)
    assert f"completed {truth.ended['completed']}" in text
    assert f"failed {truth.ended['failed']}" in text
    assert f"best       val_auc {truth.best:.4f} (trial {int(truth.best_trial)})" in text


# ---------------------------------------------------------------------------
# A real distributed run: chief and two workers through skin.tuning


# Each role as the pods run it, plus what a role should do before it exits: wait for one
# more scrape so Prometheus stores the final values; the chief then keeps serving until
# the test has read it with `skin status` (the file RELEASE appears), bounded.
ROLE = """
import os, sys, time
from prometheus_client import CollectorRegistry
from skin.metrics import server as metrics
from skin import tuning
from skin.context import RoleContext
from skin.infra.config import load_experiment
from skin.infra.runtime import runtime_from_env
from skin.infra.storage import Storage

exp, runtime = load_experiment(sys.argv[1]), runtime_from_env()
registry = CollectorRegistry()
hooks = metrics.role_metrics(registry, exp, runtime.tuner_id)
server = metrics.serve(registry, "127.0.0.1", runtime.metrics_port)
run = tuning.run_chief if runtime.role == "chief" else tuning.run_worker
code = run(RoleContext(exp, runtime, Storage(), metrics=hooks))
server.wait_for_scrape(20)
if runtime.role == "chief":
    deadline = time.monotonic() + 60
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
        time.sleep(0.2)
sys.exit(code)
"""


def _run_env(emulator, **extra) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKIN_", "KERASTUNER_"))}
    env.update(emulator.environ(), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               SKIN_LOG_LEVEL="INFO", **extra)
    return env


@pytest.mark.slow
def test_prometheus_scrapes_a_local_distributed_run(tmp_path, emulator, storage, bucket,
                                                     real_or_synthetic_images):
    import sys

    from skin.infra.config import load_experiment

    pytest.importorskip("skin.tuning.worker", reason="skin.tuning has not landed")
    from skin.tuning import load_result

    doc = {"apiVersion": "skin/v1", "kind": "Experiment", "name": "observed", "workers": 2,
           "storage": {"bucket": bucket, "prefix": "obs"},
           "data": {"source": str(real_or_synthetic_images), "validation_fraction": 0.25,
                    "image_size": 32, "seed": 3, "shards": 1},
           # A tiny model: the search varies only what costs nothing.
           "search": {"tuner": "random", "max_trials": 4, "max_epochs": 2, "lease_seconds": 60,
                      "fixed": {"blocks": 3, "filters": 16, "block_type": "plain",
                                "dense_units": 0, "batch_size": 16, "augment": 0.0}}}
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(doc))
    exp = load_experiment(config, env={})
    logs = tmp_path / "logs"
    logs.mkdir()
    stage = subprocess.run([sys.executable, "-m", "skin.cli", "stage", "--config", str(config)],
                           env=_run_env(emulator), capture_output=True, text=True, timeout=300)
    assert stage.returncode == 0, stage.stderr[-3000:]

    roles = ["chief", "tuner0", "tuner1"]
    ports = {role: free_port() for role in roles}
    oracle_port = free_port()
    prom = Prometheus(tmp_path, {
        "skin-chief": [(f"127.0.0.1:{ports['chief']}", {"role": "chief"})],
        "skin-worker": [(f"127.0.0.1:{ports[w]}", {"role": "worker"}) for w in roles[1:]],
    }, write_rule_file(tmp_path))
    release = tmp_path / "release"
    procs = {}
    started = time.time()
    try:
        for role in roles:
            env = _run_env(emulator, KERASTUNER_TUNER_ID=role, KERASTUNER_ORACLE_IP="127.0.0.1",
                           KERASTUNER_ORACLE_PORT=str(oracle_port),
                           SKIN_METRICS_PORT=str(ports[role]),
                           SKIN_WORK_DIR=str(tmp_path / "work" / role))
            procs[role] = subprocess.Popen(
                [sys.executable, "-c", ROLE, str(config), str(release)], env=env, cwd=tmp_path,
                stdout=open(logs / f"{role}.log", "w"), stderr=subprocess.STDOUT)

        def log_tail() -> str:
            return "\n".join(f"--- {r}\n" + (logs / f"{r}.log").read_text()[-2500:] for r in roles)

        deadline = time.monotonic() + 300
        for role in ("tuner0", "tuner1"):
            while procs[role].poll() is None:
                assert time.monotonic() < deadline, "the search did not end in 300 s\n" + log_tail()
                time.sleep(0.5)
            assert procs[role].returncode == 0, log_tail()
        result = load_result(storage, exp).to_json()
        while not prom.query("last_over_time(skin_chief_search_finished[10m]) == 1"):
            assert procs["chief"].poll() is None or time.monotonic() < deadline, log_tail()
            assert time.monotonic() < deadline, "search_finished never scraped\n" + log_tail()
            time.sleep(0.5)

        # skin status against the chief, which still serves its final metrics.
        status = subprocess.run([sys.executable, "-m", "skin.cli", "status", "--address",
                                 f"127.0.0.1:{ports['chief']}"],
                                env=_run_env(emulator), capture_output=True, text=True, timeout=120)
        release.touch()
        assert procs["chief"].wait(timeout=120) == 0, log_tail()
    finally:
        release.touch()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        try:
            stored = _stored_values(prom)
            panels = _panels_over(prom, started, time.time())
        finally:
            prom.stop()

    counts = result["counts"]
    completed = counts.get("completed", 0)
    assert completed >= 1, result
    assert status.returncode == 0, status.stderr
    assert f"completed {completed}  failed {counts.get('failed', 0)}" in status.stdout, \
        status.stdout
    assert ": finished" in status.stdout.splitlines()[0]

    # Completed trials equal the trials the run reports.
    assert stored["completed"] == completed
    assert stored["started"] >= len(result["trials"])
    # Per-worker series exist for both workers (on the chief and on each worker).
    assert stored["chief_workers"] == {"tuner0", "tuner1"}
    assert stored["worker_epochs"].keys() == {"tuner0", "tuner1"}
    assert sum(stored["worker_completed"].values()) == completed
    # The best objective equals the best trial's score.
    assert stored["best"] == pytest.approx(result["best"]["score"], rel=1e-6)
    assert stored["finished"] == 1
    # The dashboard over the run, as Grafana would draw it: every expression runs, the main
    # panels have points.
    empty = [title for title in MAIN_PANELS if not panels.get(title)]
    assert not empty, f"main panels without data over the run: {empty}"


def _panels_over(prom: Prometheus, start: float, end: float) -> dict[str, int]:
    """Finite points per panel of the dashboard over [start, end] (a range query, as Grafana)."""
    points: dict[str, int] = {}
    for title, expr in dashboard_targets():
        data = prom.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step="1s")
        finite = sum(1 for series in data["result"] for _, v in series["values"]
                     if v.lower() not in ("nan", "+inf", "-inf"))
        points[title] = points.get(title, 0) + finite
    return points


def _stored_values(prom: Prometheus) -> dict:
    """What Prometheus kept of the run (last values: the roles have exited)."""
    def last(expr: str) -> list[dict]:
        return prom.query(f"last_over_time({expr}[10m])")

    def one(expr: str) -> float:
        [row] = last(expr)
        return float(row["value"][1])

    return {
        "completed": one('skin_chief_trials_ended_total{status="completed"}'),
        "started": one("skin_chief_trials_started_total"),
        "best": one("skin_chief_best_objective"),
        "finished": one("skin_chief_search_finished"),
        "chief_workers": {r["metric"]["worker"]
                          for r in last("skin_chief_worker_last_report_timestamp_seconds")},
        "worker_epochs": {r["metric"]["worker"]: float(r["value"][1])
                          for r in last("skin_worker_epochs_total")},
        "worker_completed": {r["metric"]["worker"]: float(r["value"][1])
                             for r in last('skin_worker_trials_ended_total{status="completed"}')},
    }
