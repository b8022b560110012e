"""Distributed tuning with real processes: a chief and workers over loopback gRPC, the bucket
in the storage emulator, faults made with SIGKILL.

Each role runs ``tests/tuning_entry.py`` (``skin.tuning.run_chief`` / ``run_worker`` with a
tiny dense hypermodel), configured like ``skin tune``: ``SKIN_CONFIG``,
``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP``/``PORT``, its own ``SKIN_WORK_DIR``.
Every fault test checks that the search completes and that every trial ended exactly
once as completed or failed, with no completed result lost.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from skin.infra.artifacts import best_uri
from skin.infra.config import load_experiment
from skin.infra.storage import join
from skin.tuning import load_best, load_result

pytestmark = pytest.mark.slow

ENTRY = Path(__file__).with_name("tuning_entry.py")
ROOT = Path(__file__).resolve().parents[1]
ROLE_TIMEOUT_S = 180


class Search:
    """One experiment and its role processes; logs under ``tmp_path/logs``."""

    def __init__(self, tmp_path: Path, bucket: str, emulator, *, entry_args=(), **search):
        self.tmp = tmp_path
        self.name = f"tune-{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.emulator = emulator
        self.entry_args = list(entry_args)
        doc = {
            "apiVersion": "skin/v1", "kind": "Experiment", "name": self.name, "workers": 2,
            "storage": {"bucket": bucket, "prefix": "tests"},
            "search": {"tuner": "random", "objective": "val_auc", "max_trials": 3,
                       "max_epochs": 2, "lease_seconds": 30, "max_trial_retries": 1,
                       "max_consecutive_failed_trials": 3, **search},
            "chief": {"oracle_port": self.port, "metrics_port": 0},
        }
        self.config = tmp_path / "experiment.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.exp = load_experiment(self.config, env={})
        self.procs: dict[str, subprocess.Popen] = {}
        self.runs: dict[str, int] = {}
        (tmp_path / "logs").mkdir(exist_ok=True)

    def start(self, role: str, **extra_env: str) -> subprocess.Popen:
        n = self.runs[role] = self.runs.get(role, 0) + 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KERASTUNER_", "SKIN_"))}
        env.update(self.emulator.environ(), SKIN_CONFIG=str(self.config),
                   KERASTUNER_TUNER_ID=role, KERASTUNER_ORACLE_IP="127.0.0.1",
                   KERASTUNER_ORACLE_PORT=str(self.port),
                   SKIN_WORK_DIR=str(self.tmp / "work" / f"{role}.{n}"),
                   # Restarted like a pod: a chief waits out the lock of the one it replaces.
                   SKIN_CHIEF_ON_LOCK_HELD="wait", SKIN_CHIEF_LOCK_SECONDS="5",
                   PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        env.update(extra_env)
        log = open(self.tmp / "logs" / f"{role}.{n}.log", "w")
        proc = subprocess.Popen([sys.executable, str(ENTRY), *self.entry_args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        log.close()
        self.procs[role] = proc
        return proc

    def kill(self, role: str) -> None:
        proc = self.procs[role]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def wait(self, role: str, timeout: float = ROLE_TIMEOUT_S) -> int:
        try:
            return self.procs[role].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{role} still running after {timeout} s; log:\n{self.log(role)[-4000:]}")

    def log(self, role: str | None = None) -> str:
        pattern = f"{role}.*.log" if role else "*.log"
        return "\n".join(p.read_text() for p in sorted((self.tmp / "logs").glob(pattern)))

    def wait_for(self, what, timeout: float = 120, every: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            for role, proc in self.procs.items():
                if proc.poll() is not None and proc.returncode != 0:
                    pytest.fail(f"{role} exited {proc.returncode} early:\n{self.log(role)[-4000:]}")
            time.sleep(every)
        pytest.fail(f"timed out waiting for {getattr(what, '__name__', what)}; logs:\n"
                    f"{self.log()[-6000:]}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    def epoch_state(self, storage, worker: str, min_epoch: int = 1):
        """(trial_id, epoch.json) of a trial ``worker`` is training, once it has an epoch saved."""
        for uri in storage.list(self.exp.trials_uri):
            if uri.endswith("/epoch.json"):
                try:
                    state = storage.read_json(uri)
                except FileNotFoundError:
                    continue
                if state.get("worker") == worker and state["epoch"] >= min_epoch and \
                        state["epoch"] < state["epochs"]:
                    return state["trial_id"], state
        return None


@pytest.fixture
def search(tmp_path, bucket, emulator):
    made = []

    def make(**kw):
        s = Search(tmp_path, bucket, emulator, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop_all()


def started_lines(log: str, trial_id: str) -> int:
    return len(re.findall(rf"trial {re.escape(trial_id)} started on tuner\d+ \(attempt", log))


def completed_lines(log: str, trial_id: str) -> int:
    return len(re.findall(rf"trial {re.escape(trial_id)} completed on tuner\d+:", log))


def assert_each_trial_ended_once(s: Search, result: dict, *, statuses=("completed",)) -> None:
    """Every trial ends exactly once: one final status, one completion, every score kept."""
    assert result["outcome"] == "completed", result["reason"]
    ids = [t["id"] for t in result["trials"]]
    assert len(ids) == len(set(ids))
    assert {t["status"] for t in result["trials"]} <= set(statuses), result["counts"]
    workers_log = "\n".join(s.log(f"tuner{i}") for i in range(4))
    for t in result["trials"]:
        ended = [a for a in t["attempts"] if a["ended"] is not None]
        assert len(ended) == len(t["attempts"]), t  # no attempt left open
        if t["status"] == "completed":
            assert t["score"] is not None
            assert [a["status"] for a in t["attempts"]].count("completed") == 1, t
            assert completed_lines(workers_log, t["id"]) == 1, t["id"]


def test_chief_and_two_workers_run_a_hyperband_search(search, storage):
    # max_epochs 3, factor 3: 3 one-epoch trials, the best continued to 3 epochs, 2 more of 3.
    s = search(tuner="hyperband", max_epochs=3, hyperband_factor=3)
    for role in ("chief", "tuner0", "tuner1"):
        s.start(role)
    assert s.wait("chief") == 0, s.log("chief")
    chief_done = time.monotonic()
    assert s.wait("tuner0") == 0, s.log("tuner0")
    assert s.wait("tuner1") == 0, s.log("tuner1")
    workers_left_after = time.monotonic() - chief_done

    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    assert len(result["trials"]) == 6
    assert {t["worker"] for t in result["trials"]} == {"tuner0", "tuner1"}
    assert result["trials_by_status"] == {"completed": [t["id"] for t in result["trials"]]}

    best = load_best(storage, s.exp).to_json()
    assert best == storage.read_json(best_uri(s.exp))  # read back as written, key for key
    assert set(best) == {"trial_id", "score", "objective", "direction", "hyperparameters",
                         "epochs", "best_epoch"}
    assert best["objective"] == "val_auc"
    assert set(best["hyperparameters"]) == {"units", "learning_rate"}  # no tuner/ keys
    assert best["score"] == max(t["score"] for t in result["trials"])

    continued = [t for t in result["trials"] if t["continues"]]
    by_id = {t["id"]: t for t in result["trials"]}
    assert continued, "hyperband continued no trial"
    logs = s.log()
    for t in continued:
        attempt = [a["n"] for a in by_id[t["continues"]]["attempts"]
                   if a["status"] == "completed"][0]
        assert storage.exists(join(s.exp.trials_uri, t["continues"], f"attempt-{attempt}",
                                   "checkpoint.weights.h5"))
        assert f"trial {t['id']}: starting from the weights of trial {t['continues']}" in logs
        assert t["epochs"] == 3
    # The chief keeps one object per trial plus a small header, not one growing file.
    oracle_objects = storage.list(join(s.exp.tuner_uri, "oracle", "trials"))
    assert len(oracle_objects) == 6
    assert storage.exists(join(s.exp.tuner_uri, "oracle", "header.json"))
    assert workers_left_after < 30, "workers lingered after the chief finished"


def test_worker_killed_mid_trial_resumes_with_the_same_id(search, storage):
    s = search(max_trials=2, max_epochs=4, entry_args=["--epoch-seconds", "0.6"])
    s.start("chief")
    s.start("tuner0")
    trial_id, state = s.wait_for(lambda: s.epoch_state(storage, "tuner0", min_epoch=1))
    s.kill("tuner0")
    s.start("tuner0")  # same id: gets its trial back, resumes from the bucket
    assert s.wait("chief") == 0, s.log("chief")
    assert s.wait("tuner0") == 0, s.log("tuner0")

    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    killed = next(t for t in result["trials"] if t["id"] == trial_id)
    assert killed["status"] == "completed" and killed["epochs"] == 4
    assert len(killed["attempts"]) == 1  # the restarted worker took over the same attempt
    second_run = (s.tmp / "logs" / "tuner0.2.log").read_text()
    resumed = re.search(rf"trial {trial_id}: resuming execution 1 at epoch (\d+)", second_run)
    assert resumed, second_run[-3000:]
    assert int(resumed.group(1)) >= state["epoch"] + 1 >= 2


def test_worker_killed_for_good_loses_its_trial_to_another(search, storage):
    s = search(max_trials=3, max_epochs=3, lease_seconds=6, max_trial_retries=2,
               entry_args=["--epoch-seconds", "0.5"])
    for role in ("chief", "tuner0", "tuner1"):
        s.start(role)
    trial_id, _ = s.wait_for(lambda: s.epoch_state(storage, "tuner0", min_epoch=1))
    s.kill("tuner0")  # and never again
    assert s.wait("chief") == 0, s.log("chief")
    assert s.wait("tuner1") == 0, s.log("tuner1")

    chief_log = s.log("chief")
    assert re.search(rf"trial {trial_id} reclaimed from tuner0: no report for 6 s", chief_log), \
        chief_log[-3000:]
    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    lost = next(t for t in result["trials"] if t["id"] == trial_id)
    assert [a["status"] for a in lost["attempts"]] == ["reclaimed", "completed"]
    assert [a["worker"] for a in lost["attempts"]] == ["tuner0", "tuner1"]
    assert f"trial {trial_id}: resuming execution 1 at epoch" in s.log("tuner1")


def test_an_epoch_longer_than_the_lease_keeps_its_trial(search, storage):
    # Epochs of 3 x 1.5 s against a 4 s lease: only the mid-epoch heartbeats keep them.
    s = search(max_trials=2, max_epochs=2, lease_seconds=4, max_trial_retries=0,
               entry_args=["--batch-seconds", "1.5"])
    for role in ("chief", "tuner0"):
        s.start(role)
    assert s.wait("chief") == 0, s.log("chief")
    assert s.wait("tuner0") == 0, s.log("tuner0")

    assert "reclaimed" not in s.log("chief"), s.log("chief")[-3000:]
    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    assert len(result["trials"]) == 2
    for t in result["trials"]:
        assert [a["status"] for a in t["attempts"]] == ["completed"], t
        assert t["duration"] > 2 * 4.5  # two epochs, each longer than the lease


def test_chief_killed_mid_search_resumes_without_rerunning(search, storage):
    s = search(max_trials=6, max_epochs=2, entry_args=["--epoch-seconds", "0.3"])
    for role in ("chief", "tuner0", "tuner1"):
        s.start(role)
    s.wait_for(lambda: len(re.findall(r"completed on tuner", s.log("chief"))) >= 2)
    s.kill("chief")
    before = set(re.findall(r"trial (\d+) completed on tuner", s.log("chief")))
    time.sleep(1.0)
    s.start("chief")  # same port, state from the bucket; workers reconnect on their own
    assert s.wait("chief") == 0, s.log("chief")
    assert s.wait("tuner0") == 0, s.log("tuner0")
    assert s.wait("tuner1") == 0, s.log("tuner1")

    assert "resuming the search from" in (s.tmp / "logs" / "chief.2.log").read_text()
    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    assert len(result["trials"]) == 6
    workers_log = s.log("tuner0") + s.log("tuner1")
    for trial_id in before:  # completed before the kill: kept, never run again
        assert started_lines(workers_log, trial_id) == 1, trial_id
        assert next(t for t in result["trials"] if t["id"] == trial_id)["status"] == "completed"


def test_failing_search_space_stops_everyone_with_exit_4(search, storage):
    s = search(max_trials=10, max_trial_retries=0, max_consecutive_failed_trials=2,
               entry_args=["--fail"])
    for role in ("chief", "tuner0", "tuner1"):
        s.start(role)
    assert s.wait("chief", timeout=120) == 4, s.log("chief")
    assert s.wait("tuner0", timeout=120) == 4, s.log("tuner0")
    assert s.wait("tuner1", timeout=120) == 4, s.log("tuner1")
    assert "search failed: 2 consecutive trials failed" in s.log("chief")
    assert "this search space is broken on purpose" in s.log("chief")
    for worker in ("tuner0", "tuner1"):
        assert "the search failed" in s.log(worker)
    result = load_result(storage, s.exp).to_json()
    assert result["outcome"] == "failed"
    assert "consecutive trials failed" in result["reason"]
    assert result["counts"].get("failed", 0) >= 2
    assert set(result["counts"]) <= {"failed", "cancelled"}
    with pytest.raises(FileNotFoundError):
        load_best(storage, s.exp)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_worker_waits_with_backoff_using_almost_no_cpu(search, storage):
    s = search(max_trials=1, max_epochs=3, entry_args=["--epoch-seconds", "2.5"])
    for role in ("chief", "tuner0", "tuner1"):
        s.start(role)
    idle = s.wait_for(lambda: next((r for r in ("tuner0", "tuner1")
                                    if "no trial to run yet" in s.log(r)), None))
    pid = s.procs[idle].pid
    time.sleep(0.5)
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(4.0)
    cpu, wall = _cpu_seconds(pid) - cpu0, time.monotonic() - t0
    assert s.procs[idle].poll() is None
    assert cpu / wall < 0.02, f"idle worker used {cpu:.3f} s of CPU in {wall:.1f} s"
    assert s.wait("chief") == 0, s.log("chief")
    assert s.wait("tuner0") == 0 and s.wait("tuner1") == 0
    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    assert result["trials"][0]["worker"] != idle
