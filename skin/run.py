"""``skin run``: the cluster's roles as supervised local processes.

The same commands the pods run (``skin stage``, ``skin tune`` as chief and
as ``tuner<i>``, ``skin retrain``) run here as child processes against one
bucket, which is an embedded fake-gcs-server (:mod:`skin.infra.emulator`) unless
``STORAGE_EMULATOR_HOST`` is already set. The embedded server keeps its
objects under ``OUT/gcs/<bucket>/`` (its filesystem backend), so the whole
bucket outlives the run: ``python -m skin.infra.emulator --data-dir OUT/gcs``
serves it again for ``skin status`` or ``skin evaluate``. A new run starts
from an empty bucket unless ``--resume`` keeps the last one. A crashed chief or worker is
restarted with the same id and bounded, backed-off retries, as a Job
restarts a pod; fatal exit codes stop the run. Everything listens on
127.0.0.1 only, and the oracle takes calls only with a fresh random token
made for this run, which the chief and the workers get in their environment
(``SKIN_ORACLE_TOKEN``), never on a command line or in a log. Ctrl-C or SIGTERM stops every
child (they also die with this process: PR_SET_PDEATHSIG), so nothing is
left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from skin.errors import (
    EXIT_OK,
    EXIT_RELEASED,
    EXIT_RETRYABLE,
    FATAL_EXIT_CODES,
    RetryableError,
    interrupts,
)
from skin.infra import artifacts, documents
from skin.infra.config import Experiment
from skin.infra.emulator import binary_path, ensure_bucket
from skin.infra.storage import Storage
from skin.serving.formatting import fmt, interval_text

log = logging.getLogger("skin.run")

_PR_SET_PDEATHSIG = 1
# Lines from children worth showing live (everything goes to OUT/logs/<role>.log).
_SHOW_LOGGERS = (" skin", "skin ", "Traceback", "Error", "error")


@dataclass(frozen=True)
class RunOptions:
    out: str | None = None
    metrics_port: int = 9090  # chief; worker i gets metrics_port + 1 + i; 0 = off
    max_restarts: int = 3
    restart_backoff_s: float = 1.0
    resume: bool = False  # keep OUT/gcs (the last run's bucket) instead of starting empty
    quiet: bool = False  # don't echo child output (tests)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    restart_at: float | None = None
    exit_code: int | None = None
    pump: threading.Thread | None = None
    stopping: bool = False  # we asked it to stop: its exit is not news
    free_restart: bool = False  # it left on SIGTERM with its work handed back (exit 80)


@dataclass
class Supervisor:
    """Starts, watches, restarts and stops the role processes."""

    log_dir: Path
    echo: bool = True
    children: dict[str, Child] = field(default_factory=dict)

    def start(self, child: Child) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = (self.log_dir / f"{child.name}.log").open("ab")
        child.proc = subprocess.Popen(
            child.argv, env=child.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        child.exit_code, child.restart_at, child.stopping = None, None, False
        child.pump = threading.Thread(target=self._pump, args=(child, child.proc, logfile),
                                      daemon=True)
        child.pump.start()
        self.children[child.name] = child
        log.info("started %-8s pid %d: %s", child.name, child.proc.pid, " ".join(child.argv[1:]))
        return child

    def _pump(self, child: Child, proc: subprocess.Popen, logfile) -> None:
        with logfile:
            for raw in proc.stdout:
                logfile.write(raw)
                logfile.flush()
                line = raw.decode(errors="replace").rstrip()
                if self.echo and any(tag in line for tag in _SHOW_LOGGERS):
                    print(f"[{child.name:>7}] {line}", flush=True)

    def poll(self, child: Child) -> int | None:
        if child.proc is None:
            return child.exit_code
        code = child.proc.poll()
        if code is not None and child.exit_code is None:
            child.pump.join(timeout=5)
            child.exit_code = code if code >= 0 else 128 - code  # -9 -> 137, like a pod
            level = (logging.DEBUG if child.stopping else
                     logging.INFO if code == 0 else logging.WARNING)
            log.log(level, "%s exited with code %d", child.name, child.exit_code)
        return child.exit_code

    def run_once(self, child: Child) -> int:
        self.start(child)
        while self.poll(child) is None:
            time.sleep(0.2)
        return child.exit_code

    def tail(self, name: str, lines: int = 25) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, child: Child, grace_s: float = 10.0) -> None:
        proc = child.proc
        if proc is None or proc.poll() is not None:
            return
        child.stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.poll(child)

    def stop_all(self) -> None:
        # Newest first: workers hand their trials back to a chief that can still save them,
        # and the chief flushes into a bucket that is still there.
        for child in reversed(list(self.children.values())):
            self.stop(child)


def _skin(*args: str) -> list[str]:
    return [sys.executable, "-m", "skin.cli", *args]


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except Exception:  # noqa: BLE001 - any answer-less state means "not up yet"
            if time.monotonic() > deadline:
                raise RetryableError(f"the storage emulator did not answer at {url} "
                                     f"within {timeout_s:.0f} s") from None
            time.sleep(0.2)


def run_local(exp: Experiment, opts: RunOptions) -> int:
    out = Path(opts.out or Path("runs") / exp.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(out / "logs", echo=not opts.quiet)
    for old in sup.log_dir.glob("*.log"):
        old.unlink()
    started = time.monotonic()
    try:
        with interrupts(signal.SIGINT, signal.SIGTERM):
            return _run(exp, opts, out, sup, started)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping every process")
        raise  # exit 130 (skin.errors.role_ended)
    finally:
        sup.stop_all()


def _run(exp: Experiment, opts: RunOptions, out: Path, sup: Supervisor, started: float) -> int:
    exp_file = out / "experiment.yaml"
    source = exp.data.source
    if source not in ("synthetic",) and not source.startswith("gs://"):
        source = str(Path(source).resolve())  # children resolve against the same folder
    doc = exp.to_dict()
    doc["data"]["source"] = source
    if exp.data.test_source:
        doc["data"]["test_source"] = str(Path(exp.data.test_source).resolve())
    exp_file.write_text(yaml.safe_dump(doc, sort_keys=False))

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")
                and k not in ("SKIN_ORACLE_TOKEN", "SKIN_ORACLE_TOKEN_FILE", "SKIN_ORACLE_TLS_DIR")}
    base_env.update(SKIN_CONFIG=str(exp_file), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                    SKIN_BIND_ADDRESS="127.0.0.1", SKIN_METRICS_HOST="127.0.0.1")
    if "STORAGE_EMULATOR_HOST" not in base_env:
        binary_path()  # no fake-gcs-server here: EmulatorUnavailable says what to do instead
        gcs_dir = out / "gcs"
        if gcs_dir.exists() and not opts.resume:
            shutil.rmtree(gcs_dir)
        port = _free_port()
        emu = Child("storage", [sys.executable, "-m", "skin.infra.emulator", "--host", "127.0.0.1",
                                "--port", str(port), "--bucket", exp.storage.bucket,
                                "--data-dir", str(gcs_dir)], base_env)
        sup.start(emu)
        base_env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        _wait_http(f"http://127.0.0.1:{port}/storage/v1/b", timeout_s=60)
        print(f"storage: embedded fake-gcs-server at {base_env['STORAGE_EMULATOR_HOST']} "
              f"(bucket {exp.storage.bucket}, kept in {gcs_dir}/)", flush=True)
    else:
        ensure_bucket(base_env["STORAGE_EMULATOR_HOST"], exp.storage.bucket)
        print(f"storage: {base_env['STORAGE_EMULATOR_HOST']} (STORAGE_EMULATOR_HOST)", flush=True)
    if exp.data.source == "synthetic":
        print("data: SYNTHETIC lesion images (round even blobs vs ragged multi-colour ones); "
              "pass DATA=<folder with benign/ and malignant/> for real images", flush=True)
    else:
        print(f"data: {source}", flush=True)

    def role_env(name: str, **extra: str) -> dict[str, str]:
        env = dict(base_env, SKIN_WORK_DIR=str(out / "work" / name), **extra)
        (out / "work" / name).mkdir(parents=True, exist_ok=True)
        return env

    timings: dict[str, float] = {}

    def batch(name: str) -> int:
        """Run a batch role (stage, retrain) to its end; on failure show why."""
        t0 = time.monotonic()
        code = sup.run_once(Child(name, _skin(name), role_env(name, SKIN_METRICS_PORT="0")))
        timings[name] = time.monotonic() - t0
        if code != EXIT_OK:
            print(sup.tail(name), file=sys.stderr)
            print(f"{name} failed with exit code {code}; log: {sup.log_dir / f'{name}.log'}",
                  file=sys.stderr)
        return code

    if (code := batch("stage")) != EXIT_OK:
        return code
    t0 = time.monotonic()
    code = _tune(exp, opts, sup, role_env)
    timings["tune"] = time.monotonic() - t0
    if code != EXIT_OK:
        return code
    if (code := batch("retrain")) != EXIT_OK:
        return code

    os.environ["STORAGE_EMULATOR_HOST"] = base_env["STORAGE_EMULATOR_HOST"]
    version, model_dir = _fetch_model(exp, out)
    timings["total"] = time.monotonic() - started
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    print(_summary(exp, out, version, model_dir, timings, opts), flush=True)
    return EXIT_OK


def _tune(exp: Experiment, opts: RunOptions, sup: Supervisor, role_env) -> int:
    oracle_port = str(_free_port())
    # A fresh token per run, in the environment of the chief and the workers only.
    common = dict(KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=oracle_port,
                  SKIN_ORACLE_TOKEN=secrets.token_urlsafe(32))
    roles = ["chief"] + [f"tuner{i}" for i in range(exp.workers)]
    for i, name in enumerate(roles):
        metrics_port = 0 if not opts.metrics_port else opts.metrics_port + i
        env = role_env(name, KERASTUNER_TUNER_ID=name, SKIN_METRICS_PORT=str(metrics_port),
                       **common)
        if name == "chief":  # restarted here like a pod: wait out a dead chief's lock
            env.setdefault("SKIN_CHIEF_ON_LOCK_HELD", "wait")
        sup.start(Child(name, _skin("tune", "--tuner-id", name), env))
        if metrics_port:
            print(f"metrics: {name:>7} http://127.0.0.1:{metrics_port}/metrics", flush=True)
    if opts.metrics_port:
        print(f"progress: skin status --address 127.0.0.1:{opts.metrics_port} --watch", flush=True)

    chief = sup.children["chief"]
    workers = [sup.children[n] for n in roles[1:]]
    chief_done_at: float | None = None
    while True:
        now = time.monotonic()
        for child in [chief, *workers]:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    if child.free_restart:
                        log.info("restarting %s after its release (not counted)", child.name)
                    else:
                        child.restarts += 1
                        log.warning("restarting %s (restart %d of %d)", child.name,
                                    child.restarts, opts.max_restarts)
                    child.free_restart = False
                    sup.start(child)
                continue
            code = sup.poll(child)
            if code is None or code == EXIT_OK or child.exit_code is None:
                continue
            if code == EXIT_RELEASED and chief_done_at is None:
                # Preempted (SIGTERM): it handed its work back. Kubernetes ignores this exit
                # in podFailurePolicy and starts a replacement; so do we, at once, uncounted.
                log.info("%s stopped on SIGTERM (exit %d, work handed back): restarting it "
                         "with the same id", child.name, code)
                child.restart_at, child.free_restart = now, True
                child.exit_code, child.proc = None, None
                continue
            if code in FATAL_EXIT_CODES:
                if child is chief:
                    print(sup.tail("chief"), file=sys.stderr)
                    print(f"the search stopped: chief exited with code {code}; "
                          f"log: {sup.log_dir / 'chief.log'}", file=sys.stderr)
                    for w in workers:
                        sup.stop(w)
                    return code
                continue  # a worker that gives up on a fatal error: the chief decides
            if child.restarts < opts.max_restarts and chief_done_at is None:
                delay = opts.restart_backoff_s * 2 ** child.restarts
                log.warning("%s crashed (exit %d): restarting with the same id in %.0f s",
                            child.name, code, delay)
                child.restart_at = now + delay
                child.exit_code = None
                child.proc = None
            elif child is chief:
                print(sup.tail("chief"), file=sys.stderr)
                print(f"the chief failed {child.restarts + 1} times (last exit {code}); "
                      "giving up", file=sys.stderr)
                return code if code != EXIT_OK else EXIT_RETRYABLE
        if chief.exit_code == EXIT_OK and chief.restart_at is None:
            if chief_done_at is None:
                chief_done_at = now
                log.info("search finished; waiting for the workers to leave")
            running = [w for w in workers if w.proc is not None and w.exit_code is None]
            if not running:
                return EXIT_OK
            if now - chief_done_at > 30:
                log.warning("workers still running 30 s after the search ended: stopping them")
                for w in running:
                    sup.stop(w)
                return EXIT_OK
        if chief.exit_code is None and chief.restart_at is None and all(
                w.exit_code is not None and w.restart_at is None for w in workers):
            # No worker is left (done, fatal, or out of restarts): the chief has 10 s to finish.
            try:
                chief.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sup.stop(chief)
            code = sup.poll(chief)
            if code == EXIT_OK:
                continue
            if code not in FATAL_EXIT_CODES:
                fatal = [w.exit_code for w in workers if w.exit_code in FATAL_EXIT_CODES]
                code = fatal[0] if fatal else EXIT_RETRYABLE
            print(sup.tail(workers[0].name), file=sys.stderr)
            print(f"the search stopped: no worker left (exit codes "
                  f"{[w.exit_code for w in workers]}), chief exit {chief.exit_code}",
                  file=sys.stderr)
            return code
        time.sleep(0.2)


def _fetch_model(exp: Experiment, out: Path) -> tuple[str, Path]:

    storage = Storage()
    version = storage.read_text(artifacts.latest_uri(exp)).strip()
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    storage.download_dir(artifacts.model_dir_uri(exp, version), model_dir)
    with contextlib.suppress(FileNotFoundError):
        (out / artifacts.BEST).write_text(storage.read_text(artifacts.best_uri(exp)))
    return version, model_dir


def _summary(exp: Experiment, out: Path, version: str, model_dir: Path,
             timings: dict[str, float], opts: RunOptions) -> str:
    metrics = json.loads((model_dir / artifacts.METRICS).read_text())
    best_path = out / artifacts.BEST
    best = (documents.BestTrial.from_json(json.loads(best_path.read_text()), str(best_path))
            if best_path.exists() else None)
    lines = ["", "=" * 72, f"skin run: {exp.name} done in {timings['total'] / 60:.1f} min "
             f"(stage {timings['stage']:.0f} s, tune {timings['tune']:.0f} s, "
             f"retrain {timings['retrain']:.0f} s)"]
    if exp.data.source == "synthetic":
        lines.append("NOTE: trained on SYNTHETIC images; these numbers say nothing about moles.")
    if best is not None:
        lines.append(f"best trial {best.trial_id}: {best.objective} = {fmt(best.score, 4, style='auto')}")
        for name, value in sorted(best.hyperparameters.items()):
            lines.append(f"  {name:<28} {fmt(value, 4, style='auto')}")
    split = metrics.get("evaluated_on", "test")
    lines.append(f"published model {version}, evaluated on the {split} split "
                 f"(n={metrics.get('n')}):")
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1",
                "threshold"):
        if key in metrics:
            ci = interval_text(metrics, key)
            lines.append(f"  {key:<12} {fmt(metrics[key], 4, style='auto')}"
                         + (f"  (95 % interval {ci})" if ci else ""))
    if "confusion_matrix" in metrics:
        lines.append(f"  confusion    [[tn, fp], [fn, tp]] = {metrics['confusion_matrix']}")
    lines += ["where everything went:",
              f"  bucket       {exp.root_uri}/ (data/, tuner/, trials/, models/{version}/)",
              f"  model        {model_dir}  (skin evaluate --model {model_dir} --data DIR)",
              f"  logs         {out / 'logs'}/"]
    if (out / "gcs").is_dir():
        lines.append(f"  bucket files {out / 'gcs'}/  (serve them again: python -m skin.infra.emulator "
                     f"--data-dir {out / 'gcs'}, then set STORAGE_EMULATOR_HOST)")
    report = model_dir / artifacts.REPORT_HTML
    if report.exists():
        lines.append(f"  run report   {report}")
    lines.append("=" * 72)
    return "\n".join(lines)
