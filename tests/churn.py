"""The preemption churn: a fault driver SIGTERMs random workers (and the chief) mid-search and
restarts each at once with the same id, as the Job controller would after a preemption.

Used by tests/test_preemption.py and bench/churn.py; roles are tests/tuning_entry.py processes
driven by :class:`test_tuning.Search`.
"""

from __future__ import annotations

import random
import re
import signal
import time
from dataclasses import dataclass, field

from test_tuning import Search

EPOCH_LINE = re.compile(r"trial (\d+) epoch (\d+)/(\d+) on (tuner\d+)")


@dataclass
class Kill:
    role: str
    code: int | None  # exit code (None: did not exit within the grace period)
    seconds: float  # SIGTERM to exit
    trial: str | None = None  # the trial it was training
    epoch: int = 0  # epochs of that trial finished when the signal was sent


@dataclass
class Churn:
    kills: list[Kill] = field(default_factory=list)
    chief_kills: list[Kill] = field(default_factory=list)

    @property
    def worker_codes(self) -> list[int | None]:
        return [k.code for k in self.kills]


def current_log(s: Search, role: str) -> str:
    path = s.tmp / "logs" / f"{role}.{s.runs[role]}.log"
    return path.read_text() if path.exists() else ""


def training(s: Search, role: str) -> tuple[str, int] | None:
    """(trial, epochs done) when ``role``'s current process finished an epoch of a trial it
    is still training, else None."""
    log = current_log(s, role)
    found = EPOCH_LINE.findall(log)
    if not found:
        return None
    trial, epoch, epochs, _ = found[-1]
    if int(epoch) >= int(epochs) or re.search(rf"trial {trial} (completed|released)", log):
        return None
    return trial, int(epoch)


def sigterm(s: Search, role: str, grace_s: float) -> tuple[int | None, float]:
    proc = s.procs[role]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=grace_s)
    except Exception:  # noqa: BLE001 - past the grace period: what Kubernetes does next
        proc.kill()
        proc.wait(timeout=30)
        code = None
    return code, time.monotonic() - t0


def wait_serving(s: Search, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "oracle serving" in current_log(s, "chief"):
            return
        if s.procs["chief"].poll() is not None:
            return
        time.sleep(0.2)


def drive(s: Search, workers: list[str], *, worker_kills: int, chief_kills: int,
          epoch_seconds: float, seed: int = 0, grace_s: float = 15.0,
          timeout_s: float = 600.0) -> Churn:
    """SIGTERM ``worker_kills`` times a random worker that is mid-trial (after a random part
    of an epoch), and the chief ``chief_kills`` times spread among them; restart each at
    once. Returns when the kills are done or the search ended (the chief exited, with any code)."""
    rng = random.Random(seed)
    churn = Churn()
    chief_after = {round((i + 1) * worker_kills / (chief_kills + 1)) for i in range(chief_kills)}
    deadline = time.monotonic() + timeout_s
    while len(churn.kills) < worker_kills and time.monotonic() < deadline:
        if s.procs["chief"].poll() is not None:
            break  # the search ended (or failed) before every fault was made
        ready = [(w, t) for w in workers if s.procs[w].poll() is None
                 and (t := training(s, w)) is not None]
        if not ready:
            time.sleep(0.1)
            continue
        role, (trial, epoch) = rng.choice(ready)
        time.sleep(rng.uniform(0.1, 0.9) * epoch_seconds)  # land somewhere in the next epoch
        now = training(s, role)
        if now is not None:
            trial, epoch = now
        code, seconds = sigterm(s, role, grace_s)
        churn.kills.append(Kill(role, code, seconds, trial, epoch))
        s.start(role)  # the replacement pod: same index, same tuner id
        if len(churn.kills) in chief_after and s.procs["chief"].poll() is None:
            code, seconds = sigterm(s, "chief", grace_s)
            churn.chief_kills.append(Kill("chief", code, seconds))
            s.start("chief")
            wait_serving(s)
    return churn


def epochs_begun(s: Search) -> int:
    """Epochs the workers began, over every process (lost work shows as extra epochs)."""
    return sum(len(re.findall(r"tiny: epoch \d+ begins", s.log(f"tuner{i}"))) for i in range(8))
