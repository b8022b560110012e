"""Split brains and stale holders, with real processes and fake-gcs-server (no mocks).

- two chiefs started at once on one experiment: one serves, the other waits on the lock;
  the serving one frozen (SIGSTOP) past the lock's expiry loses it to the other, which
  finishes the search with a worker; continued (SIGCONT), the first exits 6 and writes
  nothing; every trial is in the result once;
- a worker frozen past its trial's lease, continued after another worker finished the
  trial, cannot overwrite that worker's checkpoint (per-attempt folders);
- two retrains racing to publish: both versions exist, LATEST names one complete version,
  the loser exits 7 and says so.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from skin.errors import EXIT_FENCED, EXIT_PUBLISH_RACE
from skin.infra.storage import join
from skin.tuning import load_result
from test_tuning import ENTRY, ROOT, Search, assert_each_trial_ended_once

pytestmark = pytest.mark.slow

LOCK_SECONDS = 3


class Roles(Search):
    """A Search whose processes are named apart from their role (two chiefs, two ports)."""

    def start_as(self, key: str, role: str, port: int, *entry_args: str,
                 **env_extra: str) -> subprocess.Popen:
        n = self.runs[key] = self.runs.get(key, 0) + 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KERASTUNER_", "SKIN_"))}
        env.update(self.emulator.environ(), SKIN_CONFIG=str(self.config),
                   KERASTUNER_TUNER_ID=role, KERASTUNER_ORACLE_IP="127.0.0.1",
                   KERASTUNER_ORACLE_PORT=str(port),
                   SKIN_WORK_DIR=str(self.tmp / "work" / f"{key}.{n}"),
                   SKIN_CHIEF_LOCK_SECONDS=str(LOCK_SECONDS), SKIN_CHIEF_ON_LOCK_HELD="wait",
                   PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                   **env_extra)
        log = open(self.tmp / "logs" / f"{key}.{n}.log", "w")
        proc = subprocess.Popen([sys.executable, str(ENTRY), *self.entry_args, *entry_args],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        log.close()
        self.procs[key] = proc
        return proc


@pytest.fixture
def roles(tmp_path, bucket, emulator):
    made = []

    def make(**kw):
        s = Roles(tmp_path, bucket, emulator, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        for proc in s.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        s.stop_all()


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def _objects(storage, uri: str) -> dict[str, int]:
    return {i.uri: i.version for i in storage.list_info(uri)}


def test_split_brain_one_chief_serves_and_a_frozen_one_writes_nothing(roles, storage):
    s = roles(max_trials=4, max_epochs=2, entry_args=["--epoch-seconds", "0.2"])
    ports = {"chiefA": s.port, "chiefB": free_port()}
    for key, port in ports.items():  # started at once
        s.start_as(key, "chief", port)
    serving = s.wait_for(lambda: [k for k in ports if "oracle serving on" in s.log(k)],
                         timeout=90)
    assert len(serving) == 1, serving
    first = serving[0]
    second = next(k for k in ports if k != first)
    time.sleep(2 * LOCK_SECONDS)  # the lock stays fresh: the other keeps waiting
    assert "oracle serving on" not in s.log(second), s.log(second)[-3000:]
    assert "waiting for it" in s.log(second)
    assert s.procs[second].poll() is None

    s.procs[first].send_signal(signal.SIGSTOP)  # frozen past its expiry
    s.wait_for(lambda: "oracle serving on" in s.log(second), timeout=10 * LOCK_SECONDS)
    assert re.search(r"took over the lock .* from \S+ \(term 2\)", s.log(second))
    s.start_as("tuner0", "tuner0", ports[second])
    assert s.wait(second) == 0, s.log(second)[-4000:]
    assert s.wait("tuner0") == 0, s.log("tuner0")[-4000:]

    before = _objects(storage, s.exp.root_uri)
    s.procs[first].send_signal(signal.SIGCONT)
    assert s.wait(first, timeout=60) == EXIT_FENCED, s.log(first)[-4000:]
    assert "lost the lock" in s.log(first)
    assert _objects(storage, s.exp.root_uri) == before  # it wrote nothing at all

    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    assert len(result["trials"]) == 4


def test_a_reclaimed_trials_old_holder_cannot_overwrite_the_new_attempts_files(roles, storage):
    s = roles(max_trials=5, max_epochs=4, lease_seconds=4, max_trial_retries=2,
              entry_args=["--epoch-seconds", "0.4"])
    s.start_as("chief", "chief", s.port)
    old = s.start_as("tuner0", "tuner0", s.port, "--freeze-before-saving-epoch", "2")
    s.wait_for(lambda: _stopped(old.pid), timeout=120)
    trial_id = re.search(r"freezing before saving epoch 2 of trial (\S+)",
                         s.log("tuner0")).group(1)
    s.start_as("tuner1", "tuner1", s.port)
    # The chief reclaims the frozen worker's trial; tuner1 finishes it (a new attempt).
    s.wait_for(lambda: re.search(rf"trial {trial_id} completed on tuner1", s.log("chief")),
               timeout=120)
    trial_uri = join(s.exp.trials_uri, trial_id)
    finished = _objects(storage, trial_uri)

    old.send_signal(signal.SIGCONT)  # the old holder uploads its stale epoch 2, then learns
    s.wait_for(lambda: f"trial {trial_id} on tuner0: the chief gave it to another worker"
               in s.log("tuner0"), timeout=60)
    assert s.wait("chief") == 0, s.log("chief")[-4000:]
    for worker in ("tuner0", "tuner1"):
        assert s.wait(worker) == 0, s.log(worker)[-4000:]

    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    trial = next(t for t in result["trials"] if t["id"] == trial_id)
    assert [(a["status"], a["worker"]) for a in trial["attempts"]] == [
        ("reclaimed", "tuner0"), ("completed", "tuner1")]
    # tuner1's files: its last epoch, untouched since it finished (the stale upload went
    # to the old attempt's own folder).
    states = {uri: storage.read_json(uri) for uri in storage.list(trial_uri)
              if uri.endswith("/epoch.json")}
    new = [uri for uri, st in states.items() if st["worker"] == "tuner1" and st["epoch"] == 4]
    assert len(new) == 1, states
    folder = new[0].rsplit("/", 1)[0]
    ours = {uri: g for uri, g in _objects(storage, trial_uri).items() if uri.startswith(folder)}
    assert ours == {uri: g for uri, g in finished.items() if uri.startswith(folder)}
    assert "checkpoint.weights.h5" in {u.rsplit("/", 1)[1] for u in ours}
    stale = [st for st in states.values() if st["worker"] == "tuner0"]
    assert [st["epoch"] for st in stale] == [2]  # it did write: into attempt 1, its own
    assert "resuming execution 1 at epoch 2 from the bucket (attempt 1's files)" \
        in s.log("tuner1")


# -- two retrains racing on models/LATEST ------------------------------------------------

def test_two_retrains_racing_both_publish_and_one_moves_latest(
        emulator, storage, bucket, real_or_synthetic_images, tmp_path):
    from test_retrain import BEST, RESULT, experiment, stage

    exp = experiment(bucket, real_or_synthetic_images, epochs=1)
    stage(exp, storage)
    storage.write_json(join(exp.tuner_uri, "result.json"), RESULT)
    storage.write_json(join(exp.tuner_uri, "best_hyperparameters.json"), BEST)
    latest = join(exp.models_uri, "LATEST")
    storage.write_text(latest, "20000101-000000\n")  # an older model both start from
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(exp.to_dict(), sort_keys=False))
    procs = []
    for name in ("a", "b"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SKIN_", "KERASTUNER_"))}
        env.update(emulator.environ(), SKIN_CONFIG=str(config), SKIN_METRICS_PORT="0",
                   SKIN_WORK_DIR=str(tmp_path / name), TF_CPP_MIN_LOG_LEVEL="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "skin.cli", "retrain"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, cwd=ROOT))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, EXIT_PUBLISH_RACE], "\n".join(o[-3000:] for o in outs)
    winner_out = outs[[p.returncode for p in procs].index(0)]
    loser_out = outs[[p.returncode for p in procs].index(EXIT_PUBLISH_RACE)]

    versions = sorted({u[len(exp.models_uri) + 1:].split("/")[0]
                       for u in storage.list(exp.models_uri) if not u.endswith("/LATEST")})
    assert len(versions) == 2, versions
    for version in versions:  # both complete: the loser's is kept, not half-written
        metrics = storage.read_json(join(exp.models_uri, version, "metrics.json"))
        assert metrics["version"] == version and "publishing" not in metrics
        assert storage.exists(join(exp.models_uri, version, "model.keras"))
    named = storage.read_text(latest).strip()
    assert named in versions and f"published {join(exp.models_uri, named)}" in winner_out
    lost = next(v for v in versions if v != named)
    assert f"another retrain published {named} while this one ran" in loser_out
    assert f"version {lost} is complete" in loser_out
