"""Preemptions and hangs with real processes: a chief and workers over loopback gRPC, the bucket
in the storage emulator, faults made with SIGTERM (a preemption, a drain) and with a training
batch that never ends.

- Churn: 10 SIGTERMs to random workers mid-trial and 2 to the chief, each restarted at once with
  the same id (the Job controller's replacement pod). The search completes, every trial once,
  no attempt failed or reclaimed, every preempted trial resumes at its last finished epoch.
- Hang: a worker whose batch blocks exits by its own watchdog (exit 81) within
  search.watchdog_leases x search.lease_seconds, and its trial moves on at once.
- `skin run`: a worker SIGTERMed mid-trial exits 80 and is restarted at once without
  spending one of --max-restarts (0 here), as the Job's podFailurePolicy ignores it.
"""

from __future__ import annotations

import re
import time

import pytest

from churn import drive, epochs_begun
from skin.errors import EXIT_RELEASED, EXIT_WATCHDOG
from skin.tuning import load_result
from test_tuning import assert_each_trial_ended_once, search  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

EPOCH_S = 1.0


def test_preemption_churn_loses_no_trial_and_no_finished_epoch(search, storage):  # noqa: F811
    s = search(max_trials=8, max_epochs=4, lease_seconds=30, max_trial_retries=1,
               max_consecutive_failed_trials=2, entry_args=["--epoch-seconds", str(EPOCH_S)])
    workers = ["tuner0", "tuner1"]
    for role in ["chief", *workers]:
        s.start(role)
    churn = drive(s, workers, worker_kills=10, chief_kills=2, epoch_seconds=EPOCH_S, seed=13)
    assert s.wait("chief", timeout=300) == 0, s.log("chief")[-4000:]
    for w in workers:
        assert s.wait(w) == 0, s.log(w)[-4000:]

    # Every fault was made, and each role left on its own, in time, with the release code.
    assert len(churn.kills) == 10, f"the search ended after {len(churn.kills)} preemptions"
    assert len(churn.chief_kills) == 2
    for kill in churn.kills + churn.chief_kills:
        assert kill.code == EXIT_RELEASED, kill
        assert kill.seconds < 15, kill

    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    assert len(result["trials"]) == 8
    by = result["attempts_by_status"]
    assert by["failed"] == 0 and by["reclaimed"] == 0, by
    assert by["completed"] == 8, by
    # A kill lands mid-trial; only one racing its trial's last epoch may find nothing to hand back.
    assert by["released"] >= 8, by
    assert result["counts"] == {"completed": 8}

    workers_log = s.log("tuner0") + s.log("tuner1")
    resumed = 0
    for t in result["trials"]:
        attempts = t["attempts"]
        assert [a["status"] for a in attempts][-1] == "completed", t
        assert all(a["status"] == "released" for a in attempts[:-1]), t
        # No finished epoch trained twice: each attempt starts where the previous one ended.
        trained = sum(a["epochs"] - a["first_epoch"] for a in attempts
                      if a.get("first_epoch") is not None)
        assert trained == t["epochs"] == 4, [(a["status"], a["epochs"], a.get("first_epoch")) for a in attempts]
        for before, after in zip(attempts, attempts[1:]):
            if after.get("first_epoch") is None:  # released again before finishing an epoch
                assert after["epochs"] == before["epochs"], t
                continue
            assert after["first_epoch"] == before["epochs"], (t["id"], before, after)
            if before["epochs"] > 0:
                resumed += 1
                assert f"trial {t['id']}: resuming execution 1 at epoch {before['epochs'] + 1}" \
                    in workers_log, (t["id"], before)
    assert resumed >= 5, "too few preempted trials resumed from a finished epoch"
    for kill in churn.kills:  # the worker said what it handed back
        assert re.search(rf"trial {kill.trial} released by {kill.role} after \d+ epochs",
                         workers_log), kill

    chief_log = s.log("chief")
    assert chief_log.count("resuming the search from") >= 2
    assert chief_log.count("journal flushed after SIGTERM") == 2
    assert "reclaimed from" not in chief_log
    # Lost work: at most the epoch in progress per preemption (32 epochs without faults).
    assert epochs_begun(s) <= 32 + len(churn.kills)


def test_hung_worker_exits_by_its_watchdog_and_its_trial_moves_on(search, storage):  # noqa: F811
    # Lease 3 s x 2 leases: a worker with no finished batch for 6 s exits 81 by itself.
    s = search(max_trials=2, max_epochs=2, lease_seconds=3, watchdog_leases=2,
               max_trial_retries=1, entry_args=["--hang-after-batches", "4"])
    s.start("chief")
    s.start("tuner0")  # 3 batches an epoch: it finishes epoch 1, then its 5th batch blocks
    hung_at = s.wait_for(lambda: "hanging in batch" in s.log("tuner0") and time.monotonic())
    code = s.wait("tuner0", timeout=60)
    took = time.monotonic() - hung_at
    log = s.log("tuner0")
    assert code == EXIT_WATCHDOG, log[-4000:]
    assert took < 6 + 5, f"the watchdog took {took:.1f} s for a 6 s limit"
    assert re.search(r"watchdog: trial \d+ finished no batch for \d+ s \(limit 6 s", log), log
    assert "Thread" in log and "on_train_batch_begin" in log  # the stacks show where it hung
    chief_log = s.log("chief")
    assert re.search(r"tuner0's watchdog ends trial (\d+)", chief_log), chief_log[-3000:]
    assert "reclaimed from" not in chief_log  # ended at once, not after a lease

    s.entry_args = []  # the replacement pod, on a healthy node
    s.start("tuner0")
    assert s.wait("chief") == 0, s.log("chief")[-4000:]
    assert s.wait("tuner0") == 0
    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    hung = [t for t in result["trials"] if t["attempts"][0]["status"] == "failed"]
    assert len(hung) == 1, result["trials"]
    assert "watchdog" in hung[0]["attempts"][0]["reason"]
    assert [a["status"] for a in hung[0]["attempts"]] == ["failed", "completed"]


def _pid_of(root: int, tuner_id: str) -> int | None:
    from test_pipeline import _descendants

    for pid in _descendants(root):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"--tuner-id" in argv and tuner_id.encode() in argv:
            return pid
    return None


def test_skin_run_restarts_a_preempted_worker_at_once_without_spending_a_restart(
        tmp_path, emulator, storage, bucket, real_or_synthetic_images):
    import os
    import signal
    import subprocess
    import sys

    from skin.infra.config import load_experiment
    from test_pipeline import _experiment, _skin_env

    # --max-restarts 0: a crash would not be restarted; a release is, and is not counted.
    config = _experiment(tmp_path, real_or_synthetic_images, bucket, max_trials=4, max_epochs=4)
    out = tmp_path / "out"
    with open(tmp_path / "run.log", "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "skin.cli", "run", "--config", str(config), "--out", str(out),
             "--metrics-port", "0", "--max-restarts", "0"],
            env=_skin_env(emulator), stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        log = out / "logs" / "tuner0.log"
        deadline = time.monotonic() + 300
        while not (log.exists() and re.search(r"trial \d+ epoch 1/4 on tuner0", log.read_text())):
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "tuner0 never trained an epoch"
            time.sleep(0.2)
        pid = _pid_of(proc.pid, "tuner0")
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    run_log = (tmp_path / "run.log").read_text()
    assert "tuner0 stopped on SIGTERM (exit 80, work handed back)" in run_log, run_log[-3000:]
    assert "restarting tuner0 after its release (not counted)" in run_log
    assert log.read_text().count("asks the chief at") == 2  # the replacement ran
    result = storage.read_json(load_experiment(config, env={}).tuner_uri + "/result.json")
    by = result["attempts_by_status"]
    assert by["released"] == 1 and by["failed"] == 0 and by["reclaimed"] == 0, by
    assert result["counts"] == {"completed": 4}
