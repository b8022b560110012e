"""skin.metrics: names and labels by the conventions, hook semantics, serving, Pushgateway."""

from __future__ import annotations

import http.server
import math
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from skin.metrics import ORACLE_METHODS, TRIAL_END_STATUSES
from skin.metrics.batch import BatchMetrics
from skin.metrics.chief import ChiefMetrics
from skin.metrics.server import role_metrics, serve
from skin.metrics.worker import WorkerMetrics

FORBIDDEN_LABELS = {"trial", "trial_id", "id", "hp", "hyperparameter", "value", "image"}
ALLOWED_LABELS = {"role", "status", "worker", "method", "split", "le", "kind", "metric", "phase",
                  "reason",  # skin_oracle_refused_calls_total: a fixed set (ORACLE_REFUSAL_REASONS)
                  # the build/search info metrics' descriptive labels (one series each)
                  "version", "python_version", "keras_tuner_version", "tensorflow_version",
                  "experiment", "tuner", "objective", "direction"}


def value(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


def families(registry: CollectorRegistry):
    from prometheus_client import generate_latest
    return list(text_string_to_metric_families(generate_latest(registry).decode()))


def all_registries():
    chief, worker, stage, retrain = (CollectorRegistry() for _ in range(4))
    ChiefMetrics(chief, workers=2)
    WorkerMetrics(worker, "tuner0")
    BatchMetrics(stage, "stage")
    BatchMetrics(retrain, "retrain")
    return {"chief": chief, "worker": worker, "stage": stage, "retrain": retrain}


@pytest.mark.parametrize("role", ["chief", "worker", "stage", "retrain"])
def test_names_and_labels_follow_the_conventions(role):
    registry = all_registries()[role]
    fams = families(registry)
    ours = [f for f in fams if not f.name.startswith("process_")]
    assert ours, "no metrics"
    for fam in ours:
        assert fam.name.startswith("skin_"), fam.name
        assert fam.documentation, f"{fam.name} has no help text"
        for sample in fam.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)
            assert not set(sample.labels) & FORBIDDEN_LABELS
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
        if fam.type == "gauge" and ("timestamp" in fam.name or "time" in fam.name):
            assert fam.name.endswith("_timestamp_seconds"), fam.name
    build = [s for f in fams for s in f.samples if s.name == "skin_build_info"]
    assert len(build) == 1 and build[0].name == "skin_build_info" and build[0].value == 1
    assert build[0].labels["role"] == role
    assert build[0].labels["version"]
    # No `_created` companions: they would double every counter on the dashboards.
    assert not [s for f in fams for s in f.samples if s.name.endswith("_created")]


def test_chief_initialises_known_label_sets_to_zero():
    r = CollectorRegistry()
    ChiefMetrics(r, workers=3)
    for status in TRIAL_END_STATUSES:
        assert value(r, "skin_chief_trials_ended_total", status=status) == 0
        assert value(r, "skin_chief_trial_duration_seconds_count", status=status) == 0
    for method in ORACLE_METHODS:
        assert value(r, "skin_chief_oracle_calls_total", method=method) == 0
    for i in range(3):
        assert value(r, "skin_chief_worker_reports_total", worker=f"tuner{i}") == 0
    assert value(r, "skin_chief_workers_expected") == 3
    assert value(r, "skin_chief_workers_connected") == 0
    assert value(r, "skin_chief_trials_running") == 0
    assert math.isnan(value(r, "skin_chief_best_objective"))
    assert value(r, "skin_chief_search_finished") == 0
    # Never-seen workers have no last-report timestamp (0 would read as "silent since 1970").
    assert value(r, "skin_chief_worker_last_report_timestamp_seconds", worker="tuner0") is None


def test_chief_counts_trials_and_keeps_the_best_of_completed_ones():
    r = CollectorRegistry()
    c = ChiefMetrics(r, objective="val_auc", workers=2)
    before = time.time()
    for worker in ("tuner0", "tuner1", "tuner0"):
        c.trial_started(worker)
    assert value(r, "skin_chief_trials_running") == 3
    assert value(r, "skin_chief_trials_started_total") == 3
    assert value(r, "skin_chief_worker_trials_running", worker="tuner0") == 2
    c.trial_ended("completed", 120.0, 0.70, "tuner0", trial_id="0000")
    c.trial_ended("COMPLETED", 90.0, 0.81, "tuner1", trial_id="0001")
    c.trial_ended("failed", 5.0, 0.99, "tuner0", trial_id="0002")  # a failed score never counts
    assert value(r, "skin_chief_trials_running") == 0
    assert value(r, "skin_chief_trials_ended_total", status="completed") == 2
    assert value(r, "skin_chief_trials_ended_total", status="failed") == 1
    assert value(r, "skin_chief_best_objective") == pytest.approx(0.81)
    assert value(r, "skin_chief_best_trial_number") == 1
    improved = value(r, "skin_chief_best_objective_improved_timestamp_seconds")
    assert before <= improved <= time.time()
    c.trial_started("tuner1")
    c.trial_ended("completed", 60.0, 0.75, "tuner1", trial_id="0003")  # worse: no change
    assert value(r, "skin_chief_best_objective") == pytest.approx(0.81)
    assert value(r, "skin_chief_best_trial_number") == 1
    assert value(r, "skin_chief_best_objective_improved_timestamp_seconds") == improved
    assert value(r, "skin_chief_trial_duration_seconds_count", status="completed") == 3
    assert value(r, "skin_chief_trial_duration_seconds_sum", status="completed") == 270.0
    # 120 s lands in the 120 s bucket, not the 60 s one (buckets for minutes to hours).
    assert value(r, "skin_chief_trial_duration_seconds_bucket", status="completed", le="60.0") == 1
    assert value(r, "skin_chief_trial_duration_seconds_bucket", status="completed", le="120.0") == 3
    assert c.best == pytest.approx(0.81)


def test_a_minimised_objective_keeps_the_lowest_score():
    r = CollectorRegistry()
    c = ChiefMetrics(r, objective="val_loss")
    assert c.direction == "min"
    for score in (0.9, 0.4, 0.6):
        c.trial_started("tuner0")
        c.trial_ended("completed", 1.0, score, "tuner0", trial_id="x7")  # not numeric: no number
    assert value(r, "skin_chief_best_objective") == pytest.approx(0.4)
    assert math.isnan(value(r, "skin_chief_best_trial_number"))
    assert value(r, "skin_chief_search_info", objective="val_loss", direction="min", experiment="",
                 tuner="") == 1


def test_workers_connected_follows_the_lease_and_reclaims_are_not_reports():
    r = CollectorRegistry()
    c = ChiefMetrics(r, workers=2, lease_seconds=0.3)
    c.worker_report("tuner0", epoch=2, epochs_budget=5)
    c.trial_started("tuner1")
    assert value(r, "skin_chief_workers_connected") == 2
    assert value(r, "skin_chief_worker_trial_epoch", worker="tuner0") == 2
    assert value(r, "skin_chief_worker_trial_epochs_budget", worker="tuner0") == 5
    reported = value(r, "skin_chief_worker_last_report_timestamp_seconds", worker="tuner1")
    time.sleep(0.4)
    assert value(r, "skin_chief_workers_connected") == 0
    c.trial_ended("reclaimed", 400.0, None, "tuner1")  # the chief took the trial back
    assert value(r, "skin_chief_worker_last_report_timestamp_seconds", worker="tuner1") == reported
    assert value(r, "skin_chief_worker_reports_total", worker="tuner1") == 1
    assert value(r, "skin_chief_workers_connected") == 0
    assert value(r, "skin_chief_trials_ended_total", status="reclaimed") == 1
    c.worker_report("tuner1")
    assert value(r, "skin_chief_workers_connected") == 1


def test_progress_timestamp_moves_on_epochs_and_trials_not_on_heartbeats():
    r = CollectorRegistry()
    c = ChiefMetrics(r)
    t0 = value(r, "skin_chief_last_progress_timestamp_seconds")
    time.sleep(0.01)
    c.worker_report("tuner0")  # a lease renewal alone is not progress
    assert value(r, "skin_chief_last_progress_timestamp_seconds") == t0
    c.worker_report("tuner0", epoch=1)
    t1 = value(r, "skin_chief_last_progress_timestamp_seconds")
    assert t1 > t0


def test_time_left_is_estimated_from_trial_durations_and_workers():
    r = CollectorRegistry()
    c = ChiefMetrics(r, workers=2)
    c.set_search_progress(0, 10, None)
    assert math.isnan(value(r, "skin_chief_search_eta_seconds"))  # nothing to estimate from
    for worker, seconds in (("tuner0", 100.0), ("tuner1", 300.0)):
        c.trial_started(worker)
        c.trial_ended("completed", seconds, 0.5, worker)
    now = time.time()
    c.set_search_progress(2, 10, None)
    # 8 trials left x 200 s mean / 2 connected workers
    assert value(r, "skin_chief_search_eta_seconds") == pytest.approx(800.0)
    assert value(r, "skin_chief_search_estimated_end_timestamp_seconds") == \
        pytest.approx(now + 800.0, abs=2)
    assert value(r, "skin_chief_search_trials_done") == 2
    assert value(r, "skin_chief_search_trials_estimated") == 10
    c.set_search_progress(3, None, 42.0)  # the tuner's own estimate wins
    assert value(r, "skin_chief_search_eta_seconds") == 42.0
    assert math.isnan(value(r, "skin_chief_search_trials_estimated"))
    c.search_finished()
    assert value(r, "skin_chief_search_finished") == 1
    assert value(r, "skin_chief_search_eta_seconds") == 0
    assert value(r, "skin_chief_search_finished_timestamp_seconds") >= now


def test_oracle_calls_are_counted_and_timed_by_method():
    r = CollectorRegistry()
    c = ChiefMetrics(r)
    c.oracle_call("CreateTrial", 0.004)
    with pytest.raises(RuntimeError):
        with c.timed_oracle_call("RenewLease"):
            raise RuntimeError("the call failed")
    assert value(r, "skin_chief_oracle_calls_total", method="CreateTrial") == 1
    assert value(r, "skin_chief_oracle_calls_total", method="RenewLease") == 1
    assert value(r, "skin_chief_oracle_call_duration_seconds_bucket", method="CreateTrial",
                 le="0.005") == 1
    assert value(r, "skin_chief_oracle_call_duration_seconds_count", method="RenewLease") == 1


def test_worker_tracks_its_trial_epochs_losses_and_throughput():
    r = CollectorRegistry()
    w = WorkerMetrics(r, "tuner1", objective="val_auc")
    lbl = {"worker": "tuner1"}
    w.data_synced(2_000_000, 1.5)
    w.trial_started(epochs_budget=4)
    assert value(r, "skin_worker_trial_running", **lbl) == 1
    assert value(r, "skin_worker_trial_epoch", **lbl) == 0
    assert value(r, "skin_worker_trial_epochs_budget", **lbl) == 4
    w.epoch_ended(0, 2.0, 150.0, {"loss": 0.7, "val_loss": 0.8, "val_auc": 0.6, "auc": 0.65})
    w.epoch_ended(1, 3.0, 100.0, {"loss": 0.5, "val_loss": 0.6, "val_auc": 0.7})
    assert value(r, "skin_worker_trial_epoch", **lbl) == 2
    assert value(r, "skin_worker_epochs_total", **lbl) == 2
    assert value(r, "skin_worker_images_per_second", **lbl) == 100.0
    assert value(r, "skin_worker_train_images_total", **lbl) == 600.0
    assert value(r, "skin_worker_epoch_loss", split="train", **lbl) == 0.5
    assert value(r, "skin_worker_epoch_loss", split="validation", **lbl) == 0.6
    assert value(r, "skin_worker_epoch_objective", **lbl) == 0.7
    assert value(r, "skin_worker_epoch_duration_seconds_count", **lbl) == 2
    assert value(r, "skin_worker_epoch_duration_seconds_sum", **lbl) == 5.0
    w.epoch_ended(2, float("nan"), None, {"loss": float("inf")})  # odd input: skipped, no raise
    assert value(r, "skin_worker_epoch_loss", split="train", **lbl) == 0.5
    w.trial_finished("completed")
    assert value(r, "skin_worker_trial_running", **lbl) == 0
    assert value(r, "skin_worker_trials_ended_total", status="completed", **lbl) == 1
    assert value(r, "skin_worker_trials_ended_total", status="failed", **lbl) == 0
    assert value(r, "skin_worker_data_synced_bytes_total", **lbl) == 2_000_000
    assert value(r, "skin_worker_data_sync_seconds_total", **lbl) == 1.5
    # A Hyperband trial continuing another: Keras counts from its initial epoch 4.
    w.trial_started(epochs_budget=2)  # a new trial starts from a clean slate
    assert math.isnan(value(r, "skin_worker_epoch_objective", **lbl))
    assert value(r, "skin_worker_trial_epoch", **lbl) == 0
    w.epoch_ended(4, 1.0, 10.0, {})
    assert value(r, "skin_worker_trial_epoch", **lbl) == 1
    assert value(r, "skin_worker_trial_epochs_budget", **lbl) == 2


def test_batch_metrics_time_the_run_and_keep_counts_and_model_metrics():
    r = CollectorRegistry()
    b = BatchMetrics(r, "retrain", experiment="exp1")
    with b.run():
        with b.phase("fit"):
            time.sleep(0.01)
        b.set_count("epochs", 7)
        b.set_model_metrics({"auc": 0.91, "accuracy": 0.85, "n": 300, "confusion_matrix": [[1]],
                             "evaluated_on": "test", "ok": True})
    assert value(r, "skin_retrain_duration_seconds") >= 0.01
    assert value(r, "skin_retrain_phase_duration_seconds", phase="fit") >= 0.01
    assert value(r, "skin_retrain_last_success_timestamp_seconds") > 0
    assert value(r, "skin_retrain_last_failure_timestamp_seconds") == 0
    assert value(r, "skin_retrain_items", kind="epochs") == 7
    assert value(r, "skin_retrain_model_metric", metric="auc") == 0.91
    assert value(r, "skin_retrain_model_metric", metric="n") == 300
    assert value(r, "skin_retrain_model_metric", metric="ok") is None
    assert value(r, "skin_retrain_model_metric", metric="confusion_matrix") is None
    assert "model.auc=0.91" in b.summary()

    r2 = CollectorRegistry()
    failing = BatchMetrics(r2, "stage")
    with pytest.raises(ValueError):
        with failing.run():
            raise ValueError("no images")
    assert value(r2, "skin_stage_last_failure_timestamp_seconds") > 0
    assert value(r2, "skin_stage_last_success_timestamp_seconds") == 0
    with pytest.raises(ValueError, match="job"):
        BatchMetrics(CollectorRegistry(), "Stage Job")


class _Gateway(http.server.BaseHTTPRequestHandler):
    """A loopback stand-in for the Pushgateway's push API: records what arrives."""

    received: list = []

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.command, self.path, body.decode()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_batch_push_sends_the_registry_to_the_gateway_and_logs_without_one(caplog):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = CollectorRegistry()
        b = BatchMetrics(r, "stage", experiment="exp1")
        b.set_count("train", 120)
        b.succeeded(3.0)
        _Gateway.received.clear()
        assert b.push(f"127.0.0.1:{server.server_port}") is True
        [(method, path, body)] = _Gateway.received
        assert method == "PUT"
        assert path == "/metrics/job/skin-stage/experiment/exp1"
        pushed = {s.name: s for f in text_string_to_metric_families(body) for s in f.samples}
        assert pushed["skin_stage_items"].value == 120
        assert pushed["skin_stage_duration_seconds"].value == 3.0
    finally:
        server.shutdown()
        server.server_close()
    caplog.set_level("INFO", logger="skin.metrics")
    assert b.push("") is False
    assert "skin_stage metrics:" in caplog.text and "items.train=120" in caplog.text
    # An unreachable gateway is logged, not raised: the job's work is done.
    assert b.push(f"127.0.0.1:{server.server_port}", timeout=1) is False


def test_serve_binds_a_free_port_and_reports_scrapes():
    r = CollectorRegistry()
    c = ChiefMetrics(r, workers=1)
    c.trial_started("tuner0")
    with serve(r, "127.0.0.1", 0) as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert server.wait_for_scrape(0.05) is False
        waiter = threading.Thread(target=lambda: setattr(server, "_got", server.wait_for_scrape(5)))
        waiter.start()
        time.sleep(0.05)
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        waiter.join()
        assert server._got is True
        assert "skin_chief_trials_running 1.0" in body
        assert server.scrapes == 1
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_wait_for_scrape_ignores_a_scrape_that_read_the_values_before_the_wait():
    from prometheus_client import Counter

    r = CollectorRegistry()
    done = Counter("skin_test_trials_done", "trials done", registry=r)
    inside, gate = threading.Event(), threading.Event()

    class Slow:  # holds the first scrape after it has read the counter
        def describe(self):
            return []

        def collect(self):
            inside.set()
            gate.wait(5)
            return []

    r.register(Slow())
    with serve(r, "127.0.0.1", 0) as server:
        first: dict = {}
        scrape = threading.Thread(target=lambda: first.setdefault(
            "body", urllib.request.urlopen(server.url, timeout=10).read().decode()))
        scrape.start()
        assert inside.wait(5)  # the first scrape has read skin_test_trials_done 0
        waiter = threading.Thread(target=lambda: setattr(server, "_got",
                                                         server.wait_for_scrape(10)))
        waiter.start()
        time.sleep(0.05)
        done.inc()  # the role's last increment, then it waits for a scrape before exiting
        gate.set()
        scrape.join()
        assert "skin_test_trials_done_total 0.0" in first["body"]
        time.sleep(0.3)
        assert waiter.is_alive()  # that scrape read the old value: not the one to wait for
        body = urllib.request.urlopen(server.url, timeout=10).read().decode()
        waiter.join()
        assert server._got is True and "skin_test_trials_done_total 1.0" in body


def test_role_metrics_configures_the_hooks_from_the_experiment():
    from skin.infra.config import parse_experiment

    exp = parse_experiment({"apiVersion": "skin/v1", "kind": "Experiment", "name": "exp1",
                            "workers": 3, "search": {"objective": "val_loss", "tuner": "random",
                                                     "lease_seconds": 45}}, env={})
    r = CollectorRegistry()
    chief = role_metrics(r, exp, "chief")
    assert isinstance(chief, ChiefMetrics)
    assert (chief.direction, chief.lease_seconds) == ("min", 45.0)
    assert value(r, "skin_chief_workers_expected") == 3
    assert value(r, "skin_chief_search_info", experiment="exp1", tuner="random",
                 objective="val_loss", direction="min") == 1
    worker = role_metrics(CollectorRegistry(), exp, "tuner2")
    assert isinstance(worker, WorkerMetrics)
    assert (worker.worker, worker.objective) == ("tuner2", "val_loss")


def test_metrics_implement_every_hook_of_their_interface_with_its_signature():
    import inspect

    from skin.tuning.hooks import ChiefHooks, WorkerHooks

    for interface, impl in ((ChiefHooks, ChiefMetrics), (WorkerHooks, WorkerMetrics)):
        hooks = [n for n, v in vars(interface).items() if callable(v) and not n.startswith("_")]
        assert len(hooks) >= 4
        for name in hooks:
            assert name in vars(impl), f"{impl.__name__} does not implement {name}"
            assert inspect.signature(getattr(impl, name)) == \
                inspect.signature(getattr(interface, name)), name
            assert getattr(interface(), name)(*_hook_args(interface, name)) is None  # no-op


def _hook_args(interface, name: str) -> list:
    import inspect

    params = list(inspect.signature(getattr(interface, name)).parameters.values())[1:]
    sample = {"str": "tuner0", "int": 1, "float": 1.0, "bool": True}
    return [sample.get(str(p.annotation).split(" |")[0], None) for p in params
            if p.default is inspect.Parameter.empty]


def test_a_failing_hook_is_logged_once_and_never_reaches_the_caller(caplog):
    from skin.tuning.hooks import ChiefHooks, WorkerHooks

    calls = []

    class Broken(ChiefHooks):
        def trial_started(self, worker: str) -> None:
            calls.append(worker)
            raise RuntimeError("broken on purpose")

    class Odd(WorkerHooks):
        def data_synced(self, nbytes: int, seconds: float) -> None:
            raise ZeroDivisionError("also broken")

    caplog.set_level("WARNING", logger="skin.tuning")
    hooks = Broken()
    assert hooks.trial_started("tuner0") is None
    hooks.trial_started("tuner1")
    hooks.search_finished()  # not overridden: the no-op
    Odd().data_synced(1, 1.0)
    assert calls == ["tuner0", "tuner1"]  # the hook ran each time
    lines = [r.getMessage() for r in caplog.records]
    assert sum("trial_started failed (RuntimeError: broken on purpose)" in x for x in lines) == 1
    assert sum("data_synced failed (ZeroDivisionError: also broken)" in x for x in lines) == 1
