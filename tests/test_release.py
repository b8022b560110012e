"""Releases in the chief's oracle, in one process (tests/test_preemption.py runs real processes):
a preempted worker's trial goes back to the queue at once, resumes where it stopped, and never
counts as a failed attempt, also across a chief restart; plus the watchdog and SIGTERM helpers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from skin.errors import EXIT_RELEASED, EXIT_WATCHDOG, ConfigError
from test_tuning_oracle import _completed, _exp, _oracle, _restored


def test_a_released_trial_is_requeued_at_once_and_never_counts_as_failed(tmp_path, bucket,
                                                                         storage):
    from skin.tuning.protocol import LeaseLost
    from skin.tuning.results import build_result

    # One retry and one consecutive failure allowed: three releases would exhaust both if
    # they counted as failures.
    exp = _exp(tmp_path, bucket, max_trials=1, max_epochs=4, max_trial_retries=0,
               max_consecutive_failed_trials=1)
    oracle, store = _oracle(exp, storage)
    held = oracle.assign("tuner0")
    tid = held.trial.trial_id
    oracle.report(tid, "tuner0", held.attempt, {"val_auc": 0.6}, 0, progress_only=True)
    oracle.journal.wait(oracle.release(tid, "tuner0", held.attempt, 1))
    assert oracle.release(tid, "tuner0", held.attempt, 1) >= 0  # a retried release: harmless
    with pytest.raises(LeaseLost):  # released: the old attempt cannot report any more
        oracle.report(tid, "tuner0", held.attempt, {"val_auc": 0.7}, 1, progress_only=True)
    assert oracle.state == "running" and oracle.trials[tid].status == "INVALID"

    # The other worker gets it at once (no lease to wait for), from epoch 1.
    again = oracle.assign("tuner1")
    assert (again.trial.trial_id, again.attempt) == (tid, 2)
    oracle.report(tid, "tuner1", 2, {"val_auc": 0.7}, 1, progress_only=True)
    oracle.journal.wait(oracle.release(tid, "tuner1", 2, 2, first_epoch=1))

    # A chief restart keeps the releases uncounted.
    oracle.journal.flush()
    oracle.journal.stop()
    oracle, _ = _restored(exp, store)
    assert oracle._retry_queue == [tid] and oracle._run_times[tid] == 0
    third = oracle.assign("tuner0")
    assert (third.trial.trial_id, third.attempt) == (tid, 3)
    oracle.report(tid, "tuner0", 3, {"val_auc": 0.8}, 2, progress_only=True)
    oracle.end(_completed(third.trial, 0.8), "tuner0", 3, epochs=(2, 4))
    assert oracle.state == "finished", oracle.reason

    result = build_result(oracle, exp).to_json()
    (t,) = result["trials"]
    assert [(a["status"], a.get("first_epoch"), a["epochs"]) for a in t["attempts"]] == \
        [("released", 0, 1), ("released", 1, 2), ("completed", 2, 4)]
    assert result["attempts_by_status"] == {"completed": 1, "released": 2, "reclaimed": 0,
                                            "failed": 0}
    assert result["counts"] == {"completed": 1}


def test_a_release_reaches_the_chief_over_grpc_and_is_logged_as_such(tmp_path, bucket, storage,
                                                                     caplog):
    from prometheus_client import CollectorRegistry

    from conftest import free_port
    from skin.metrics.chief import ChiefMetrics
    from skin.tuning.chief import ChiefListener
    from skin.tuning.client import ChiefClient
    from skin.tuning.oracle import make_oracle
    from skin.tuning.servicer import make_servicer, serve

    caplog.set_level("INFO", logger="skin.tuning")
    exp = _exp(tmp_path, bucket, max_trials=2)
    oracle, _ = _oracle(exp, storage)
    registry = CollectorRegistry()
    hooks = ChiefMetrics(registry, workers=1)
    oracle.listener = ChiefListener(hooks)
    port = free_port()
    server = serve(make_servicer(oracle, hooks), port, host="127.0.0.1", threads=4)
    client = ChiefClient(f"127.0.0.1:{port}", "tuner0", make_oracle(exp, leased=False),
                         patience_s=10)
    try:
        trial = client.create_trial("tuner0")
        client.release(trial.trial_id, 0, first_epoch=0)
        assert trial.trial_id not in client.attempts
        assert client.create_trial("tuner0").trial_id == trial.trial_id  # first in line
    finally:
        client.close()
        server.stop(0)
        oracle.journal.stop()
    assert oracle.meta[trial.trial_id]["attempts"][0]["status"] == "released"
    assert registry.get_sample_value("skin_chief_trials_ended_total",
                                     {"status": "released"}) == 1
    assert registry.get_sample_value("skin_chief_trials_ended_total",
                                     {"status": "reclaimed"}) == 0
    assert "not counted as a failed attempt" in caplog.text


def test_watchdog_leases_is_validated(tmp_path, bucket):
    assert _exp(tmp_path, bucket).search.watchdog_leases == 5.0
    assert _exp(tmp_path, bucket, watchdog_leases=0).search.watchdog_leases == 0.0
    with pytest.raises(ConfigError, match=r"search.watchdog_leases: 0.5 is not valid; expected "
                                          r"0 \(off\) or >= 1"):
        _exp(tmp_path, bucket, watchdog_leases=0.5)
    with pytest.raises(ConfigError, match="search.watchdog_leases: -1"):
        _exp(tmp_path, bucket, watchdog_leases=-1)


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_the_watchdog_ends_a_hung_process_with_its_code_and_its_stacks():
    proc = _child("""
        import logging, time
        from skin.tuning.watchdog import Watchdog
        logging.basicConfig(level=logging.INFO)
        said = []
        dog = Watchdog("tuner7", 0.5, on_fire=said.append).start()
        dog.arm("trial 3")
        for _ in range(5):
            time.sleep(0.2)
            dog.progress()  # alive: no exit
        print("hanging", flush=True)
        time.sleep(60)
    """)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_WATCHDOG, out
    assert out.index("hanging") < out.index("watchdog: trial 3 finished no batch")
    assert "time.sleep(60)" in out or "<string>" in out  # the main thread's stack


def test_sigterm_inside_a_deferred_section_waits_for_the_safe_point():
    proc = _child("""
        import sys, time
        from skin.tuning.preempt import Preempted, Preemption
        p = Preemption("tuner0").install()
        print("ready", flush=True)
        try:
            with p.deferred():
                t0 = time.monotonic()
                while not p.requested.is_set() and time.monotonic() - t0 < 20:
                    time.sleep(0.05)
                print("asked; finishing the batch", flush=True)
            p.wait(20)
        except Preempted:
            print("left", flush=True)
            sys.exit(80)
    """)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_RELEASED, out
    assert out.index("asked; finishing the batch") < out.index("left")


def test_the_workers_span_sets_where_an_attempt_began_when_epoch_reports_were_lost(tmp_path,
                                                                                   bucket,
                                                                                   storage):
    from skin.tuning.results import build_result

    # Epoch reports 0 and 1 never reached the chief (it was restarting); the first that did is
    # epoch 2. The worker's ending says it trained epochs 0-4 in this attempt: that counts.
    exp = _exp(tmp_path, bucket, max_trials=1, max_epochs=4)
    oracle, _ = _oracle(exp, storage)
    held = oracle.assign("tuner0")
    tid = held.trial.trial_id
    oracle.report(tid, "tuner0", held.attempt, {"val_auc": 0.7}, 2, progress_only=True)
    oracle.end(_completed(held.trial, 0.8), "tuner0", held.attempt, epochs=(0, 4))
    (t,) = build_result(oracle, exp).to_json()["trials"]
    assert [(a["status"], a.get("first_epoch"), a["epochs"]) for a in t["attempts"]] == \
        [("completed", 0, 4)]


def test_a_replacement_process_of_the_same_attempt_keeps_where_the_attempt_began(tmp_path,
                                                                                 bucket,
                                                                                 storage):
    from skin.infra.artifacts import EPOCH_STATE
    from skin.tuning.checkpoints import TrialFiles

    # Attempt 1 began at epoch 0 and saved epoch 3; its process died before the chief heard of
    # it, and a replacement with the same id got attempt 1 back. Attempt 2 (another worker)
    # takes the trial up at epoch 3.
    files = TrialFiles(storage, f"gs://{bucket}/exp/tuner/trials", tmp_path)
    fresh, _ = files.resume_state("7", 1, "h", 0, 4, "tuner0")
    assert (fresh["epoch"], fresh["attempt_first"]) == (0, 0)
    saved = dict(fresh, epoch=3, history=[{"epoch": e} for e in range(3)])
    storage.write_json(files.uri("7", EPOCH_STATE, 1), saved)

    same, source = files.resume_state("7", 1, "h", 0, 4, "tuner0")
    assert (same["epoch"], same["attempt_first"], source) == (3, 0, 1)
    later, adopted = files.resume_state("7", 2, "h", 0, 4, "tuner1")
    assert (later["epoch"], later["attempt_first"], later["attempt"], adopted) == (3, 3, 2, 1)
    other, _ = files.resume_state("7", 1, "another configuration", 0, 4, "tuner0")
    assert (other["epoch"], other["attempt_first"], other["history"]) == (0, 0, [])
