"""The chief's oracle in one process: leases, persistence in the bucket, concurrency over gRPC.

The servicer runs on a free loopback port and the clients are skin's own worker clients
in threads; the state goes to the storage emulator. No models are trained here
(tests/test_tuning.py runs the real processes).
"""

from __future__ import annotations

import threading
import time

import pytest
import yaml

from conftest import free_port
from skin.context import RoleContext
from skin.infra.config import load_experiment
from skin.tuning.journal import Journal, OracleStore


def _exp(tmp_path, bucket, **search):
    doc = {"apiVersion": "skin/v1", "kind": "Experiment", "name": "oracle",
           "storage": {"bucket": bucket, "prefix": "unit"},
           "search": {"tuner": "random", "objective": "val_auc", "max_trials": 40,
                      "max_epochs": 2, "lease_seconds": 30, "max_trial_retries": 1,
                      "max_consecutive_failed_trials": 3, **search}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_experiment(path, env={})


def _oracle(exp, storage, *, journal=True, slots=16, compact_interval_s=0.5):
    from skin.infra.artifacts import oracle_uri
    from skin.tuning.oracle import make_oracle

    oracle = make_oracle(exp)
    for name in ("x", "y", "z"):  # what populate_space would find in a hypermodel
        oracle.hyperparameters.Float(name, 0.0, 1.0)
    store = OracleStore(storage, oracle_uri(exp), slots=slots)  # small: the ring wraps
    if journal:
        oracle.journal = Journal(store, oracle.lock, oracle.snapshot,
                                 compact_interval_s=compact_interval_s).start()
    return oracle, store


def _restored(exp, store):
    from skin.tuning.oracle import make_oracle

    loaded = store.load()
    oracle = make_oracle(exp)
    oracle.restore(loaded.header, loaded.records)
    return oracle, loaded


def _completed(trial, value):
    from keras_tuner.src.engine import metrics_tracking

    trial.metrics = metrics_tracking.MetricsTracker()
    trial.metrics.register("val_auc", direction="max")
    trial.metrics.update("val_auc", value, step=0)
    trial.status = "COMPLETED"
    return trial


def test_concurrent_workers_over_grpc_get_each_trial_once_and_the_bucket_keeps_it(
        tmp_path, bucket, storage):
    from skin.tuning.client import ChiefClient, SearchOver
    from skin.tuning.oracle import make_oracle
    from skin.tuning.servicer import make_servicer, serve

    exp = _exp(tmp_path, bucket, max_trials=60)
    oracle, store = _oracle(exp, storage)
    port = free_port()
    server = serve(make_servicer(oracle), port, host="127.0.0.1", threads=8)
    ran: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        name = f"tuner{i}"
        client = ChiefClient(f"127.0.0.1:{port}", name, make_oracle(exp, leased=False),
                             patience_s=30)
        try:
            while True:
                trial = client.create_trial(name)
                if trial.status != "RUNNING":
                    time.sleep(0.05)
                    continue
                ran.setdefault(trial.trial_id, []).append(name)
                client.report_epoch(trial.trial_id, 0, {"val_auc": 0.5})
                client.end_trial(_completed(trial, trial.hyperparameters.get("x")))
        except SearchOver:
            pass
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    server.stop(0).wait()
    oracle.journal.stop()
    assert not errors, errors
    assert oracle.state == "finished"
    assert sorted(ran) == sorted(oracle.trials) and len(ran) == 60
    assert all(len(workers) == 1 for workers in ran.values())  # no trial handed out twice
    assert len({tuple(sorted(t.hyperparameters.values.items()))
                for t in oracle.trials.values()}) == 60

    # Every answer waited for the bucket: a chief started now has all of it.
    again, loaded = _restored(exp, store)
    assert loaded.batches > 0 or loaded.journal_from > 0
    assert again.state == "finished"
    assert {t: (x.status, x.score) for t, x in again.trials.items()} == \
        {t: (x.status, x.score) for t, x in oracle.trials.items()}
    assert [a["worker"] for t in sorted(ran) for a in again.meta[t]["attempts"]] == \
        [ran[t][0] for t in sorted(ran)]
    assert again.get_best_trials(1)[0].trial_id == oracle.get_best_trials(1)[0].trial_id


def test_reload_replays_the_journal_on_top_of_the_last_compaction(tmp_path, bucket, storage):
    exp = _exp(tmp_path, bucket, max_trials=30)
    # only the explicit compaction below
    oracle, store = _oracle(exp, storage, slots=256, compact_interval_s=3600)
    done = []
    for i in range(12):
        a = oracle.assign(f"tuner{i % 3}")
        oracle.journal.wait(a.ticket)
        done.append(a.trial.trial_id)
        oracle.journal.wait(oracle.end(_completed(a.trial, i / 100), f"tuner{i % 3}", a.attempt))
        if i == 5:
            oracle.journal.flush()
            oracle.journal.compact()  # covering the first six
    held = oracle.assign("tuner7")
    oracle.journal.wait(held.ticket)
    oracle.journal.stop()  # "killed": no final compaction

    again, loaded = _restored(exp, store)
    assert loaded.journal_from > 0 and loaded.batches > 0
    assert sorted(t for t, x in again.trials.items() if x.status == "COMPLETED") == sorted(done)
    assert again.completed == 12
    # The trial that was running keeps its worker, with a fresh lease.
    assert again.ongoing_trials["tuner7"].trial_id == held.trial.trial_id
    assert again.assign("tuner7").trial.trial_id == held.trial.trial_id
    # New trials continue the numbering instead of reusing ids.
    fresh = again.assign("tuner8").trial
    assert fresh.trial_id not in oracle.trials and fresh.status == "RUNNING"


def test_expired_lease_requeues_the_trial_then_fails_it_when_retries_run_out(tmp_path, bucket,
                                                                           storage):
    from skin.tuning.protocol import LeaseLost

    exp = _exp(tmp_path, bucket, lease_seconds=1, max_trial_retries=1,
               max_consecutive_failed_trials=1)
    oracle, _ = _oracle(exp, storage, journal=False)
    first = oracle.assign("tuner0")
    assert first.attempt == 1
    assert oracle.reclaim_expired(time.monotonic() + 0.5) == []
    assert oracle.reclaim_expired(time.monotonic() + 2) == [(first.trial.trial_id, "tuner0")]
    assert oracle.trials[first.trial.trial_id].status == "INVALID"  # re-queued
    with pytest.raises(LeaseLost):
        oracle.report(first.trial.trial_id, "tuner0", 1, {"val_auc": 0.1}, 0, progress_only=True)

    second = oracle.assign("tuner1")
    assert (second.trial.trial_id, second.attempt) == (first.trial.trial_id, 2)
    oracle.report(second.trial.trial_id, "tuner1", 2, {"val_auc": 0.1}, 0, progress_only=True)
    with pytest.raises(LeaseLost):  # the first attempt cannot end the second
        oracle.end(_completed(first.trial, 0.9), "tuner0", 1)
    assert oracle.reclaim_expired(time.monotonic() + 2) == [(first.trial.trial_id, "tuner1")]
    assert oracle.trials[first.trial.trial_id].status == "FAILED"
    assert [a["status"] for a in oracle.meta[first.trial.trial_id]["attempts"]] == \
        ["reclaimed", "reclaimed"]
    assert oracle.state == "failed" and "1 consecutive trials failed" in oracle.reason
    assert "lease expired: no report from tuner1" in oracle.reason


def test_a_heartbeat_renews_the_lease_and_records_nothing(tmp_path, bucket, storage):
    from skin.tuning.protocol import LeaseLost

    exp = _exp(tmp_path, bucket, lease_seconds=2, max_trial_retries=1)
    oracle, _ = _oracle(exp, storage, journal=False)
    held = oracle.assign("tuner0")
    trial_id = held.trial.trial_id
    before = dict(oracle.meta[trial_id]["attempts"][-1])
    time.sleep(1.2)
    oracle.heartbeat(trial_id, "tuner0", held.attempt)
    # Past the first deadline (assign + 2 s) but within the renewed one (heartbeat + 2 s).
    assert oracle.reclaim_expired(time.monotonic() + 1.2) == []
    assert oracle.meta[trial_id]["attempts"][-1] == before  # no epoch, no metrics recorded
    assert oracle.reclaim_expired(time.monotonic() + 2.5) == [(trial_id, "tuner0")]
    with pytest.raises(LeaseLost):  # too late: the trial was given back
        oracle.heartbeat(trial_id, "tuner0", held.attempt)


def test_a_worker_asking_while_others_run_waits_instead_of_leaving(tmp_path, bucket, storage):
    exp = _exp(tmp_path, bucket, max_trials=1)
    oracle, _ = _oracle(exp, storage, journal=False)
    only = oracle.assign("tuner0")
    assert oracle.assign("tuner1").trial.status == "IDLE"  # stock would say STOPPED
    oracle.end(_completed(only.trial, 0.7), "tuner0", only.attempt)
    assert oracle.state == "finished" and oracle.done.is_set()
    assert oracle.assign("tuner1").trial.status == "STOPPED"
    # The same ending again (a retried RPC) is harmless.
    oracle.end(_completed(only.trial, 0.7), "tuner0", only.attempt)
    assert oracle.completed == 1


def test_the_header_does_not_grow_with_the_trials(tmp_path, bucket, storage):
    import json

    exp = _exp(tmp_path, bucket, max_trials=400)
    oracle, _ = _oracle(exp, storage, journal=False)
    sizes = {}
    for i in range(300):
        a = oracle.assign("tuner0")
        oracle.end(_completed(a.trial, (i % 97) / 100), "tuner0", a.attempt)
        if i + 1 in (10, 300):
            sizes[i + 1] = len(json.dumps(oracle.header()))
    assert sizes[300] <= sizes[10] + 16, sizes  # a few digits of counters, nothing per trial
    assert len(oracle._tried_so_far) == 300  # the stock bookkeeping is still there, in memory


# ---------------------------------------------------------------------------
# The chief's endings, in this process: no worker needed to reach them.

class _SpaceOnly:
    """A hypermodel for run_chief: declares the space; ``broken`` makes building fail."""

    def __init__(self, broken: bool = False):
        import keras_tuner

        class Model(keras_tuner.HyperModel):
            def build(self, hp):
                import keras

                hp.Float("x", 0.0, 1.0)
                if broken:
                    raise ValueError("no model for you")
                return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

        self.model = Model()


def _runtime(tmp_path, **kw):
    from skin.infra.runtime import Runtime

    return Runtime(tuner_id="chief", oracle_port=free_port(), work_dir=tmp_path / "work", **kw)


def test_a_space_that_cannot_be_built_fails_the_search_for_everyone(tmp_path, bucket, storage):
    from skin.tuning import load_result, run_chief, run_worker
    from skin.tuning.results import read_outcome

    exp = _exp(tmp_path, bucket)
    assert run_chief(RoleContext.with_hypermodel(exp, _runtime(tmp_path), storage,
                                            _SpaceOnly(True).model)) == 4
    result = load_result(storage, exp).to_json()
    assert result["outcome"] == "failed"
    assert "the search space cannot be built: ValueError: no model for you" in result["reason"]
    assert read_outcome(storage, exp)["outcome"] == "failed"
    # A worker (re)starting later learns it from the bucket and stops too, without a chief.
    from skin.infra.runtime import Runtime

    worker = Runtime(tuner_id="tuner0", work_dir=tmp_path / "w0")
    assert run_worker(RoleContext.with_hypermodel(exp, worker, storage, _SpaceOnly().model)) == 4


class _FakeJobs:
    """Just enough of the Kubernetes API for one suspended Job (GET, PATCH) or a 404."""

    def __init__(self, tmp_path, found: bool = True):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.patches = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                if self.command == "PATCH":
                    fake.patches.append(body)
                doc = {"apiVersion": "batch/v1", "kind": "Job",
                       "metadata": {"name": "retrain", "namespace": "skin"},
                       "spec": {"suspend": not fake.patches, "template": {"spec": {
                           "restartPolicy": "Never",
                           "containers": [{"name": "r", "image": "skin"}]}}}}
                data = json.dumps(doc if found else {"kind": "Status", "code": 404}).encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.kubeconfig = tmp_path / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {
                "server": f"http://127.0.0.1:{self.server.server_address[1]}"}}],
            "users": [{"name": "fake", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))


@pytest.mark.parametrize("found, code", [(True, 0), (False, 2)])
def test_an_ended_search_starts_the_retrain_job_once_more_when_the_chief_restarts(
        tmp_path, bucket, storage, monkeypatch, found, code):
    from skin.infra.artifacts import result_uri
    from skin.infra.documents import SearchResult
    from skin.tuning import run_chief

    exp = _exp(tmp_path, bucket)
    storage.write_json(result_uri(exp), SearchResult(  # as a chief that ended wrote it
        outcome="completed", reason="all trials ended", tuner="random", objective="val_auc",
        direction="max").to_json())
    api = _FakeJobs(tmp_path, found=found)
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig))
    runtime = _runtime(tmp_path, retrain_job="retrain", namespace="skin")
    # The search had ended (result.json) but the Job never started: a restarted chief only
    # does what is left, without serving or tuning anything.
    assert run_chief(RoleContext.with_hypermodel(exp, runtime, storage,
                                                 _SpaceOnly(True).model)) == code
    assert api.patches == ([{"spec": {"suspend": False}}] if found else [])
    api.server.shutdown()


def test_a_worker_waits_for_staged_data_a_bounded_time_then_exits_75(tmp_path, bucket, storage,
                                                                      caplog):
    from skin.infra.runtime import Runtime
    from skin.tuning import run_worker

    exp = _exp(tmp_path, bucket)
    worker = Runtime(tuner_id="tuner0", work_dir=tmp_path / "w0", data_wait_seconds=1.5)
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="skin"):  # the worker's wait is skin.data.dataset's
        assert run_worker(RoleContext.with_hypermodel(exp, worker, storage,
                                                      _SpaceOnly().model)) == 75
    assert time.monotonic() - t0 < 30
    assert f"waiting for staged data at {exp.data_uri}" in caplog.text
    assert "tuner0: error: no staged data at" in caplog.text  # skin.errors.role_ended
    assert "SKIN_DATA_WAIT_SECONDS" in caplog.text


@pytest.mark.parametrize("tuner", ["hyperband", "bayesian", "random"])
def test_each_tuner_runs_to_its_end_with_fixed_values_and_resumes_from_the_bucket(
        tmp_path, bucket, storage, tuner):
    if tuner == "bayesian":
        pytest.importorskip("sklearn", reason="keras-tuner's Bayesian oracle needs scikit-learn")
    exp = _exp(tmp_path, bucket, tuner=tuner, max_trials=7, max_epochs=3, hyperband_factor=3,
               fixed={"x": 0.25}, objective="val_loss")
    oracle, store = _oracle(exp, storage)
    assert oracle.objective.direction == "min"  # val_loss is minimised, the others maximised
    ran = []
    while oracle.state == "running":
        a = oracle.assign("tuner0")
        if a.trial.status != "RUNNING":
            break
        oracle.journal.wait(a.ticket)
        values = a.trial.hyperparameters.values
        assert values["x"] == 0.25  # search.fixed pins it
        trial = _completed(a.trial, 0.0)
        trial.metrics = type(trial.metrics)()
        trial.metrics.register("val_loss", direction="min")
        trial.metrics.update("val_loss", values["y"], step=0)
        oracle.journal.wait(oracle.end(trial, "tuner0", a.attempt))
        ran.append(a.trial.trial_id)
        if len(ran) == 3:  # a chief restarted here carries on from the bucket
            oracle.journal.stop()
            oracle, loaded = _restored(exp, store)
            oracle.journal = Journal(store, oracle.lock, oracle.snapshot, loaded=loaded).start()
    oracle.journal.stop()
    assert oracle.state == "finished", oracle.reason
    assert len(ran) == len(set(ran)) == (6 if tuner == "hyperband" else 7)
    best = oracle.get_best_trials(1)[0]
    assert best.score == min(t.score for t in oracle.trials.values())


def test_a_worker_gives_up_on_an_unreachable_chief_and_hears_endings_from_the_bucket(
        tmp_path, bucket):
    from skin.errors import RetryableError, SearchFailedError
    from skin.tuning.client import ChiefClient, SearchOver
    from skin.tuning.oracle import make_oracle

    local = make_oracle(_exp(tmp_path, bucket), leased=False)
    nobody = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RetryableError, match="did not answer for 2 s"):
        ChiefClient(nobody, "tuner0", local, patience_s=2).create_trial("tuner0")
    assert time.monotonic() - t0 < 15
    done = ChiefClient(nobody, "tuner0", local, patience_s=60,
                       outcome=lambda: {"outcome": "completed", "reason": "all trials ended"})
    with pytest.raises(SearchOver):
        done.create_trial("tuner0")
    failed = ChiefClient(nobody, "tuner0", local, patience_s=60,
                         outcome=lambda: {"outcome": "failed", "reason": "3 consecutive"})
    with pytest.raises(SearchFailedError, match="3 consecutive"):
        failed.create_trial("tuner0")


def test_bayesian_without_scikit_learn_is_a_config_error_naming_the_key(tmp_path, bucket):
    import importlib.util

    from skin.errors import ConfigError
    from skin.tuning.oracle import make_oracle

    if importlib.util.find_spec("sklearn") is None:
        with pytest.raises(ConfigError, match="search.tuner: 'bayesian'.*scikit-learn"):
            make_oracle(_exp(tmp_path, bucket, tuner="bayesian"))
    else:
        assert make_oracle(_exp(tmp_path, bucket, tuner="bayesian")).objective.name == "val_auc"


def test_a_compaction_cut_short_by_a_crash_loses_nothing(tmp_path, bucket, storage, monkeypatch):
    exp = _exp(tmp_path, bucket, max_trials=30)
    oracle, store = _oracle(exp, storage, slots=256, compact_interval_s=3600)

    def run(n, first):
        for i in range(first, first + n):
            a = oracle.assign("tuner0")
            oracle.journal.wait(a.ticket)
            oracle.journal.wait(oracle.end(_completed(a.trial, i / 100), "tuner0", a.attempt))

    run(8, 0)
    real_write = storage.write_bytes

    class Killed(Exception):
        pass

    def dies_at_the_header(uri, data):
        if uri == store.header_uri:
            raise Killed()  # every trial object is written, the header that retires batches not
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", dies_at_the_header)
    with pytest.raises(Killed):
        oracle.journal.compact()
    monkeypatch.setattr(storage, "write_bytes", real_write)
    run(2, 8)
    oracle.journal.stop()

    again, loaded = _restored(exp, store)
    assert len(storage.list(store.trials_prefix)) == 8  # the compaction's trial objects landed
    assert loaded.journal_from == 0  # ...but not its header: every batch replays
    assert {t: (x.status, x.score) for t, x in again.trials.items()} == \
        {t: (x.status, x.score) for t, x in oracle.trials.items()}
    assert again.completed == 10


@pytest.mark.slow
def test_executions_per_trial_average_their_best_epochs(tmp_path, bucket, storage):
    """A chief (in a thread) and a worker in this process, two executions per trial."""
    from skin.infra.artifacts import EPOCH_STATE
    from skin.infra.runtime import Runtime
    from skin.tuning import load_result, run_chief, run_worker
    from tuning_entry import TinyHyperModel

    exp = _exp(tmp_path, bucket, max_trials=2, max_epochs=2, executions_per_trial=2)
    port = free_port()
    codes = {}
    chief = threading.Thread(target=lambda: codes.setdefault("chief", run_chief(
        RoleContext.with_hypermodel(
            exp, Runtime(tuner_id="chief", oracle_port=port, work_dir=tmp_path / "c"), storage,
            TinyHyperModel()))))
    chief.start()
    worker = Runtime(tuner_id="tuner0", oracle_port=port, work_dir=tmp_path / "w")
    assert run_worker(RoleContext.with_hypermodel(exp, worker, storage, TinyHyperModel())) == 0
    chief.join(60)
    assert codes == {"chief": 0}
    result = load_result(storage, exp).to_json()
    assert result["counts"] == {"completed": 2}
    for t in result["trials"]:
        # The last epoch checkpoint: the first execution done, the second's epochs.
        state = storage.read_json(f"{exp.trials_uri}/{t['id']}/attempt-1/{EPOCH_STATE}")
        assert state["execution"] == 1 and len(state["done"]) == 1
        first = state["done"][0]["val_auc"]
        second = max(h["val_auc"] for h in state["history"])
        assert t["score"] == pytest.approx((first + second) / 2)  # keras-tuner's average
