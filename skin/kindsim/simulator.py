"""The control loop: podman runs the pods, the simulator plays the Job controller.

:class:`Simulator` creates a podman network, gives every pod slot its fixed
address (:meth:`skin.kindsim.pods.Cluster.assign_addresses`), starts the
fake API server (:mod:`skin.kindsim.apiserver`, HTTPS on the network's
gateway, a token per ServiceAccount) and then, once a second:

- starts every Deployment replica and every Job that is not suspended, one pod
  per completion index, with ``podman kube play``;
- notices pods whose containers have all exited, saves their logs
  (``OUT/logs/<pod>.log``), removes them and decides as the Job controller
  would (:mod:`skin.kindsim.jobs`): done, replaced after a back-off, or the
  Job failed; a pod that exits non-zero is reported with its Job and its last
  log lines;
- starts a suspended Job when the API server's PATCH un-suspends it;
- fails a Job that outlives its ``activeDeadlineSeconds``.

The run succeeds when every Job has completed; then the published model is
read from the bucket (``STORAGE_EMULATOR_HOST`` of the pods, resolved to the
storage pod's address) and summarised as ``skin run`` does. It fails (exit 1)
when a Job fails, when a pod failure was counted against a Job's back-off
limit (the run completed, but a cluster would have restarted a pod that
should not have failed), or at ``timeout_s``.

:meth:`Simulator.disrupt` stops a pod the way the kubelet does on preemption:
the ``DisruptionTarget`` condition, SIGTERM, ``terminationGracePeriodSeconds``,
SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import secrets
import shutil
import string
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from skin.errors import ConfigError
from skin.kindsim import jobs as jobctl
from skin.kindsim.apiserver import FakeKubeAPI
from skin.kindsim.network import NetworkSetup, podman
from skin.kindsim.outcome import Outcome
from skin.kindsim.pods import BuiltPod, Cluster, PodConfigError, Slot, play_yaml

log = logging.getLogger("skin.kindsim")

# The pods' limits (gVisor's and some hosts' defaults are higher than runc accepts here).
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
"""
DISRUPTION = "DisruptionTarget"


@dataclass
class SimOptions:
    out: Path
    images: dict[str, str] = field(default_factory=dict)  # image in the YAML -> image to run
    timeout_s: float = 3600.0
    backoff_scale: float = 0.1  # the Job controller's 10 s, 20 s, ... back-off, scaled
    log_lines: int = 30  # of a failed pod, in the report
    keep: bool = False  # leave the pods and the network (podman pod ps) for a look
    # Secrets a user creates by hand before `kubectl apply`, as "NAME/KEY": each is made
    # here with a random value (as `--from-literal=KEY=$(openssl rand -hex 32)` would).
    secrets: list[str] = field(default_factory=list)
    fetch_model: bool = True


@dataclass
class PodRun:
    name: str
    slot: Slot
    attempt: int
    containers: list[str]
    started: float
    conditions: set[str] = field(default_factory=set)
    sigterm_at: float | None = None  # when the kubelet's SIGTERM went out (disrupt)
    grace_s: int = 30


@dataclass
class JobState:
    obj: dict
    started: float | None = None
    finished: float | None = None
    failed: str = ""  # why the Job failed
    succeeded: set[str] = field(default_factory=set)  # slot keys done
    successes: int = 0
    counted: dict[str, int] = field(default_factory=dict)  # slot key (or "") -> failures
    attempts: dict[str, int] = field(default_factory=dict)  # slot key -> pods started
    failed_indexes: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def kind(self) -> str:
        return self.obj["kind"]


class Simulator(NetworkSetup, Outcome):
    """The cluster of one rendered overlay, run by podman (setup and teardown:
    :class:`skin.kindsim.network.NetworkSetup`; the run's end: :class:`skin.kindsim.outcome.Outcome`)."""

    def __init__(self, yaml_text: str, opts: SimOptions):
        self.cluster = Cluster(yaml_text)
        self.opts = opts
        made: dict[str, dict[str, str]] = {}
        for ref in opts.secrets:
            name, sep, key = ref.partition("/")
            if not sep or not name or not key:
                raise ConfigError(f"secret {ref!r}: expected NAME/KEY")
            made.setdefault(name, {})[key] = secrets.token_hex(32)
        for name, data in made.items():
            self.cluster.add_secret(name, data)
        self.run_id = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        self.network = f"kindsim-{self.run_id}"
        self.jobs = {(w["kind"], w["metadata"]["name"]): JobState(w)
                     for w in self.cluster.workloads}
        self.pods: dict[str, PodRun] = {}  # slot key -> running pod
        self.pending: dict[str, float] = {}  # slot key -> when to start its next pod
        self.events: queue.Queue = queue.Queue()
        self.api: FakeKubeAPI | None = None
        self.started = time.monotonic()
        self.ended_pods: list[tuple[str, str, int, str]] = []  # pod, slot, exit code, verdict
        self.env = dict(os.environ)
        self.lock = threading.Lock()
        opts.out.mkdir(parents=True, exist_ok=True)
        for sub in ("pods", "logs", "volumes"):
            shutil.rmtree(opts.out / sub, ignore_errors=True)
            (opts.out / sub).mkdir()
        (opts.out / "rendered.yaml").write_text(yaml_text)
        conf = opts.out / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env["CONTAINERS_CONF"] = str(conf)

    # --- what tests and users call --------------------------------------------------------

    def say(self, msg: str) -> None:
        print(f"[kind-sim {time.monotonic() - self.started:6.1f}s] {msg}", flush=True)

    def pod_of(self, name: str, index: int | None = None) -> str | None:
        """The current pod of Job ``name`` (index ``index``), if one runs."""
        with self.lock:
            key = name if index is None else f"{name}/{index}"
            run = self.pods.get(key)
            return run.name if run else None

    def disrupt(self, name: str, index: int | None = None) -> None:
        """Preempt the current pod of Job ``name``: DisruptionTarget, SIGTERM, grace, SIGKILL."""
        self.events.put(("disrupt", name if index is None else f"{name}/{index}"))

    def run(self) -> int:
        try:
            self._setup()
            return self._loop()
        finally:
            self._teardown()

    # --- pods -----------------------------------------------------------------------------

    def _image(self, ref: str) -> str:
        if ref in self.opts.images:
            return self.opts.images[ref]
        name = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
        return self.opts.images.get(name, ref)

    def _start_pod(self, job: JobState, slot: Slot) -> None:
        attempt = job.attempts.get(slot.key, 0)
        job.attempts[slot.key] = attempt + 1
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        base = slot.name if slot.index is None else f"{slot.name}-{slot.index}"
        name = f"{base}-{suffix}"
        try:
            built = self.cluster.build_pod(slot, name, self.run_id, self.opts.out / "volumes")
        except PodConfigError as e:
            self._job_failed(job, f"pod {name} cannot start (CreateContainerConfigError): {e}")
            return
        for c in [*(built.doc["spec"].get("initContainers") or []),
                  *built.doc["spec"]["containers"]]:
            c["image"] = self._image(c["image"])
        self._write_files(built)
        path = self.opts.out / "pods" / f"{name}.yaml"
        path.write_text(play_yaml(built))
        out = podman("kube", "play", "--network", self.network, "--ip", slot.ip,
                     "--log-driver", "k8s-file", str(path), timeout=300, env=self.env)
        containers = [f"{name}-{c['name']}" for c in built.doc["spec"]["containers"]]
        if out.returncode != 0:
            self._remove_pod(name)
            self._job_failed(job, f"pod {name}: podman kube play failed: "
                             f"{(out.stderr or out.stdout).strip()[-2000:]}")
            return
        with self.lock:
            self.pods[slot.key] = PodRun(name, slot, attempt, containers, time.monotonic())
        if job.started is None:
            job.started = time.monotonic()
        self.say(f"{job.kind} {job.name}: started pod {name} at {slot.ip}"
                 + (f" (index {slot.index})" if slot.index is not None else "")
                 + (f", attempt {attempt + 1}" if attempt else ""))

    def _write_files(self, built: BuiltPod) -> None:
        fs_group = (built.doc["spec"].get("securityContext") or {}).get("fsGroup")
        for folder, mode in built.dirs.items():
            Path(folder).mkdir(parents=True, exist_ok=True)
            Path(folder).chmod(mode)
        for path, (data, mode) in built.files.items():
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            p.chmod(mode)
            if fs_group is not None and os.geteuid() == 0:
                os.chown(p, 0, int(fs_group))
        for folder in {Path(p).parent for p in built.files} - {Path(d) for d in built.dirs}:
            folder.chmod(0o755)
        (self.opts.out / "volumes").chmod(0o755)
        if (self.opts.out / "volumes" / built.name).exists():
            (self.opts.out / "volumes" / built.name).chmod(0o755)

    def _save_logs(self, pod: str) -> Path:
        path = self.opts.out / "logs" / f"{pod}.log"
        with self.lock:
            run = next((r for r in self.pods.values() if r.name == pod), None)
        containers = run.containers if run else []
        with open(path, "w") as f:
            for c in containers:
                out = podman("logs", c, env=self.env)
                if len(containers) > 1:
                    f.write(f"----- container {c} -----\n")
                f.write(out.stdout + out.stderr)
        return path

    def _container_states(self) -> dict[str, tuple[str, int]]:
        out = podman("ps", "-a", "--format", "json", env=self.env)
        states = {}
        for c in json.loads(out.stdout or "[]"):
            for name in c.get("Names") or []:
                states[name] = (c.get("State", ""), int(c.get("ExitCode") or 0))
        return states

    # --- the loop -------------------------------------------------------------------------

    def _loop(self) -> int:
        for job in self.jobs.values():
            if job.kind == "Deployment" or not job.obj["spec"].get("suspend"):
                self._start_job(job)
            else:
                self.say(f"Job {job.name}: suspended (waits for a PATCH through the API)")
        deadline = self.started + self.opts.timeout_s
        while True:
            self._events()
            self._reap()
            now = time.monotonic()
            for key, when in list(self.pending.items()):
                if now >= when:
                    del self.pending[key]
                    slot = self.cluster.slots[key]
                    job = self.jobs[(slot.kind, slot.name)]
                    if not job.failed:
                        self._start_pod(job, slot)
            for job in self.jobs.values():
                limit = job.obj["spec"].get("activeDeadlineSeconds")
                if job.kind == "Job" and job.started and not job.finished and limit \
                        and now - job.started > float(limit):
                    self._job_failed(job, f"DeadlineExceeded: active longer than "
                                          f"activeDeadlineSeconds {limit}")
            failed = [j for j in self.jobs.values() if j.failed]
            if failed:
                return self._fail(failed)
            batch = [j for j in self.jobs.values() if j.kind == "Job"]
            if all(j.finished for j in batch):
                return self._succeed()
            if not self.pending and not any(p.slot.kind == "Job" for p in self.pods.values()):
                self._events()  # an un-suspend that came with the last pod's end
                waiting = [j for j in batch if not j.finished and j.started is None]
                if waiting and not any(p.slot.kind == "Job" for p in self.pods.values()):
                    for job in waiting:
                        self._job_failed(job, "still suspended, and no pod is left that could "
                                              "start it (nothing PATCHed spec.suspend: false)")
                    continue
            if now > deadline:
                running = ", ".join(p.name for p in self.pods.values())
                self.say(f"FAILED: timeout after {self.opts.timeout_s:.0f} s; still running: "
                         f"{running or 'nothing'}; unfinished Jobs: "
                         + ", ".join(j.name for j in batch if not j.finished))
                for run in list(self.pods.values()):
                    self._report_tail(run.name, self._save_logs(run.name))
                return 1
            time.sleep(1.0)

    def _start_job(self, job: JobState) -> None:
        for slot in self.cluster.slots.values():
            if (slot.kind, slot.name) == (job.kind, job.name):
                self._start_pod(job, slot)

    def _events(self) -> None:
        while True:
            try:
                what, arg = self.events.get_nowait()
            except queue.Empty:
                return
            if what == "unsuspend":
                job = self.jobs.get(("Job", arg))
                if job and job.started is None:
                    self.say(f"Job {arg}: un-suspended through the API")
                    self._start_job(job)
            elif what == "disrupt":
                with self.lock:
                    run = self.pods.get(arg)
                if run is None:
                    self.say(f"disrupt {arg}: no pod runs")
                    continue
                run.conditions.add(DISRUPTION)
                spec = self.cluster.get(run.slot.kind, run.slot.name)["spec"]["template"]["spec"]
                grace = int(spec.get("terminationGracePeriodSeconds", 30))
                run.sigterm_at, run.grace_s = time.monotonic(), grace
                self.say(f"pod {run.name}: preempted (DisruptionTarget): SIGTERM, "
                         f"{grace} s grace, then SIGKILL")
                threading.Thread(target=podman, args=("pod", "stop", "-t", str(grace), run.name),
                                 kwargs={"timeout": grace + 60, "env": self.env},
                                 daemon=True).start()

    def _reap(self) -> None:
        states = self._container_states()
        for run in list(self.pods.values()):
            codes = {}
            for c in run.containers:
                state, code = states.get(c, ("missing", 137))
                if state not in ("exited", "stopped", "missing") \
                        or (state == "missing" and time.monotonic() - run.started < 10):
                    break
                codes[c[len(run.name) + 1:]] = code
            else:
                self._pod_ended(run, jobctl.PodEnd(codes, frozenset(run.conditions)))

    def _pod_ended(self, run: PodRun, end: jobctl.PodEnd) -> None:
        slot = run.slot
        job = self.jobs[(slot.kind, slot.name)]
        log_path = self._save_logs(run.name)
        self._remove_pod(run.name)
        with self.lock:
            del self.pods[slot.key]
        took = time.monotonic() - run.started
        where = f"pod {run.name} (Job {job.name}" + (
            f", index {slot.index})" if slot.index is not None else ")")
        if job.kind == "Deployment":
            self.ended_pods.append((run.name, slot.key, end.exit_code, "Deployment"))
            job.counted[slot.key] = job.counted.get(slot.key, 0) + 1
            delay = jobctl.replacement_delay(job.counted[slot.key], self.opts.backoff_scale)
            self.say(f"{where} ended (exit {end.exit_code}); the Deployment starts another "
                     f"in {delay:.0f} s")
            self._report_tail(run.name, log_path)
            self.pending[slot.key] = time.monotonic() + delay
            return
        if end.succeeded:
            self.say(f"{where} succeeded in {took:.0f} s")
            job.successes += 1
            completions = int(job.obj["spec"].get("completions", 1) or 1)
            if job.obj["spec"].get("completionMode") == "Indexed" or job.successes >= completions:
                job.succeeded.add(slot.key)
            else:
                self.pending[slot.key] = time.monotonic()
            self._job_progress(job)
            return
        action, why = jobctl.failure_action(job.obj["spec"], end)
        limit, per_index = jobctl.backoff_limit(job.obj["spec"])
        verdict = f"{why}"
        if action == jobctl.COUNT:
            key = slot.key if per_index else ""
            job.counted[key] = job.counted.get(key, 0) + 1
            verdict += f", counted failure {job.counted[key]} (" + (
                f"backoffLimitPerIndex {limit})" if per_index else f"backoffLimit {limit})")
            if job.counted[key] > limit:
                action = jobctl.FAIL_INDEX if per_index else jobctl.FAIL_JOB
                verdict += " -> backoff limit exceeded"
        self.ended_pods.append((run.name, slot.key, end.exit_code, action))
        stopped = ""
        if run.sigterm_at is not None:
            after = time.monotonic() - run.sigterm_at
            stopped = (f" {after:.0f} s after SIGTERM (terminationGracePeriodSeconds "
                       f"{run.grace_s}" + ("; killed when the grace period ran out)"
                                           if end.exit_code == 137 else ")"))
        self.say(f"{where} FAILED with exit code {end.exit_code}"
                 + (" after a disruption" if DISRUPTION in end.conditions else "")
                 + stopped + f": {verdict}")
        self._report_tail(run.name, log_path)
        if action == jobctl.FAIL_JOB:
            self._job_failed(job, f"{where} exited {end.exit_code}: {verdict}")
        elif action == jobctl.FAIL_INDEX:
            job.failed_indexes.add(slot.key)
            self._job_progress(job)
        else:
            counted = job.counted.get(slot.key if per_index else "", 0) \
                if action == jobctl.COUNT else 0
            delay = jobctl.replacement_delay(counted, self.opts.backoff_scale)
            self.pending[slot.key] = time.monotonic() + delay
            self.say(f"Job {job.name}: a new pod for {slot.key} in {delay:.0f} s")

    def _job_progress(self, job: JobState) -> None:
        slots = [s.key for s in self.cluster.slots.values() if (s.kind, s.name) ==
                 (job.kind, job.name)]
        if all(k in job.succeeded or k in job.failed_indexes for k in slots):
            if job.failed_indexes:
                self._job_failed(job, "failed indexes: " + ", ".join(sorted(job.failed_indexes)))
            else:
                job.finished = time.monotonic()
                self.say(f"Job {job.name}: complete in {job.finished - job.started:.0f} s")

    def _job_failed(self, job: JobState, why: str) -> None:
        if job.failed:
            return
        job.failed, job.finished = why, time.monotonic()
        self.say(f"Job {job.name}: FAILED: {why}")

    def _report_tail(self, pod: str, log_path: Path) -> None:
        lines = log_path.read_text(errors="replace").splitlines()[-self.opts.log_lines:]
        print(f"----- last {len(lines)} log lines of pod {pod} ({log_path}) -----", flush=True)
        print("\n".join(lines), flush=True)
        print("-----", flush=True)

    # --- the end --------------------------------------------------------------------------

    def _fail(self, failed: list[JobState]) -> int:
        for job in failed:
            print(f"kind-sim: Job {job.name} failed: {job.failed}", file=sys.stderr, flush=True)
        self._print_pods()
        return 1

    def _print_pods(self) -> None:
        for pod, key, code, action in self.ended_pods:
            self.say(f"  ended: {pod} ({key}) exit {code}: {action}")
