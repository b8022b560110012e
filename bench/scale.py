"""Chief capacity and worker scaling (``make bench-scale``); numbers go to BENCHMARKS.md.

    python -m bench.scale [capacity|scaling|all] [--trials 10000] [--workers 200,1000]
                          [--impls ours,stock] [--scaling-trials 8] [--out FILE]

**capacity**: one chief, many simulated workers. Each simulated worker is a
coroutine on a ``grpc.aio`` channel that runs trivial trials back to back:
CreateTrial, UpdateTrial (the trial's metric), EndTrial, with a think time of
``--think`` seconds (jittered) before each call, so the offered load grows
with the number of workers (about ``workers / think`` calls per second).
Both chiefs speak keras-tuner's gRPC service, so one driver drives both:

- ``ours``: ``skin.tuning.run_chief`` (random search, 3 float hyperparameters),
  its state journaled to the storage emulator (a separate process) as in a run
  (fake-gcs-server since issue 13; the BENCHMARKS rows before it: gcp-storage-emulator);
- ``stock``: keras-tuner 1.4's ``oracle_chief.start_server`` with the same
  ``RandomSearchOracle``, saving to a local directory (its only mode), verbose 0.

Measured: trial operations per second (calls that ran a trial: created,
updated, ended) between the first call and the last trial's end, p50/p99
latency per method, the chief's CPU seconds and peak RSS, the emulator's CPU
(ours only), and the cost per trial early and late in the search: the chief's
CPU per ended trial and the median of a trial's three call latencies, over
trials 100-1,099 and the thousand up to trial 10,000 (the run goes on for 250
more, so the late window is steady state, not the search's tail).

**scaling**: the same budget of real trials (``skin tune`` with the real
hypermodel on a small staged synthetic set) with 1 and with 2 worker
processes, each worker pinned to its own core with taskset. Speedup is the
ratio of the time from the first trial's start to the last trial's end
(``trials_span_s``); ``wall_s`` adds the processes' start-up (TensorFlow
import, data sync), which is the same in both runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "bench-scale"
SPACE = ("x", "y", "z")
# Trials run beyond the measured count, so the late window (around trial N) is steady state,
# not the last trials ending while the other simulated workers already wait idle.
PAD = 250


# ---------------------------------------------------------------------------
# helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKIN_", "KERASTUNER_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **extra)
    return env


class Emulator:
    """The storage emulator as its own process (``python -m skin.infra.emulator``)."""

    def __init__(self, log: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "skin.infra.emulator", "--port", "0",
                                      "--bucket", BUCKET], stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), env=base_env(), text=True)
        self.endpoint = self.proc.stdout.readline().strip()
        if not self.endpoint.startswith("http"):
            raise RuntimeError(f"emulator did not start; see {log}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def machine_busy_s() -> float:
    """CPU seconds all processes on this machine spent busy so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------------------
# capacity: the server processes

def _bench_experiment(name: str, trials: int, port: int):
    from skin.infra.config import parse_experiment

    return parse_experiment({
        "apiVersion": "skin/v1", "kind": "Experiment", "name": name,
        "workers": 10_000,  # the chief accepts tuner0..tuner9999, as many as drive() simulates
        "storage": {"bucket": BUCKET, "prefix": "capacity"},
        "search": {"tuner": "random", "objective": "val_auc", "max_trials": trials,
                   "max_epochs": 1, "lease_seconds": 3600},
        "chief": {"oracle_port": port, "metrics_port": 0}}, env={})


def _disk_storage(root: str):
    """A Storage whose ``gs://`` URIs land in a local folder (``ours-disk``: the chief's own
    cost without the emulator's; Storage's local paths write atomically with fsync)."""
    from skin.infra.storage import Storage

    class DiskStorage(Storage):
        def _map(self, uri):
            uri = str(uri)
            return os.path.join(root, uri[5:]) if uri.startswith("gs://") else uri

        def read_bytes(self, uri):
            return super().read_bytes(self._map(uri))

        def read_versioned(self, uri):
            return super().read_versioned(self._map(uri))

        def write_bytes(self, uri, data, **kwargs):
            return super().write_bytes(self._map(uri), data, **kwargs)

        def stat(self, uri):
            return super().stat(self._map(uri))

        def exists(self, uri):
            return super().exists(self._map(uri))

        def list_info(self, prefix_uri):
            return super().list_info(self._map(prefix_uri))

    return DiskStorage()


def serve_ours(args) -> int:
    """``skin.tuning.run_chief`` with a hypermodel that only declares the space."""
    import logging

    import keras
    import keras_tuner

    from skin.context import RoleContext
    from skin.infra.runtime import Runtime
    from skin.infra.storage import Storage
    from skin.tuning import run_chief

    class Space(keras_tuner.HyperModel):
        def build(self, hp):
            for name in SPACE:
                hp.Float(name, 0.0, 1.0)
            return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "urllib3", "google", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if os.environ.get("BENCH_DEBUG_JOURNAL"):
        logging.getLogger("skin.tuning.journal").setLevel(logging.DEBUG)
    exp = _bench_experiment(args.name, args.trials, args.port)
    runtime = Runtime(tuner_id="chief", oracle_port=args.port, work_dir=Path(args.work))
    storage = _disk_storage(os.path.join(args.work, "bucket")) if args.disk else Storage()
    return run_chief(RoleContext.with_hypermodel(exp, runtime, storage, Space()))


def serve_stock(args) -> int:
    """keras-tuner 1.4's own chief: ``oracle_chief.start_server`` (one RPC thread)."""
    import keras_tuner
    from keras_tuner.src.distribute import oracle_chief

    hps = keras_tuner.HyperParameters()
    for name in SPACE:
        hps.Float(name, 0.0, 1.0)
    oracle = keras_tuner.oracles.RandomSearchOracle(
        objective=keras_tuner.Objective("val_auc", "max"), max_trials=args.trials, seed=42,
        hyperparameters=hps)
    oracle.verbose = 0  # its Display prints a table per trial
    oracle._set_project_dir(args.work, "stock")
    os.environ.update(KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(args.port))
    oracle_chief.start_server(oracle)  # returns 20 s after the end at best; the driver kills it
    return 0


# ---------------------------------------------------------------------------
# capacity: the driver

async def drive(port: int, workers: int, trials: int, think: float, deadline_s: float,
                chief_pid: int, emulator_pid: int | None) -> dict:
    import grpc
    from keras_tuner.src import protos

    service, grpc_service = protos.get_service(), protos.get_service_grpc()
    status = protos.get_proto().TrialStatus
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(min(16, workers))]
    stubs = [grpc_service.OracleStub(ch) for ch in channels]
    lat: dict[str, list[tuple[float, int]]] = {"CreateTrial": [], "UpdateTrial": [],
                                               "EndTrial": []}
    counts = {"idle": 0, "ops": 0, "errors": 0}
    state = {"ended": 0, "first": None, "last_end": None}
    marks: dict[int, tuple[float, float]] = {}  # ended count -> (chief cpu, wall)
    measured = trials - PAD  # the trial count the late window ends at
    # Windows of `width` trials, wide enough to hold the chief's periodic work (a compaction
    # every 10 s) in both: early = trials 100.., late = ..measured.
    width = min(1000, measured // 4)
    early_lo, late_lo = 100, measured - width
    window = {early_lo, early_lo + width, late_lo, measured}
    done = asyncio.Event()
    rng = random.Random(7)
    trace = [] if os.environ.get("BENCH_TRACE") else None

    def mark() -> None:
        n = state["ended"]
        if n in window and n not in marks:
            marks[n] = (cpu_seconds(chief_pid), time.perf_counter())

    async def timed(method: str, call, index: int):
        t0 = time.perf_counter()
        if state["first"] is None:
            state["first"] = t0
        response = await call
        trailing = await call.trailing_metadata()
        lat[method].append((time.perf_counter() - t0, index))
        if trace is not None:
            trace.append((t0, time.perf_counter() - t0, method))
        return response, dict(trailing or ())

    async def sim(i: int) -> None:
        stub, name = stubs[i % len(stubs)], f"tuner{i}"
        await asyncio.sleep(rng.random() * think)
        idle = 0.05
        while not done.is_set():
            try:
                md = (("skin-worker", name),)
                response, trailing = await timed(
                    "CreateTrial", stub.CreateTrial(service.CreateTrialRequest(tuner_id=name),
                                                    metadata=md), -1)
                trial = response.trial
                if trial.status == status.STOPPED:
                    return
                if trial.status != status.RUNNING:
                    counts["idle"] += 1
                    await asyncio.sleep(idle)
                    idle = min(idle * 2, 1.0)
                    continue
                lat["CreateTrial"][-1] = (lat["CreateTrial"][-1][0], int(trial.trial_id))
                idle, index = 0.05, int(trial.trial_id)
                md = md + (("skin-attempt", trailing.get("skin-attempt", "1")),)
                await asyncio.sleep(think * (0.5 + rng.random()))
                await timed("UpdateTrial", stub.UpdateTrial(service.UpdateTrialRequest(
                    trial_id=trial.trial_id, metrics={"val_auc": rng.random()}, step=0),
                    metadata=md), index)
                await asyncio.sleep(think * (0.5 + rng.random()))
                trial.status = status.COMPLETED
                await timed("EndTrial", stub.EndTrial(service.EndTrialRequest(trial=trial),
                                                      metadata=md), index)
                counts["ops"] += 3
                state["ended"] += 1
                state["last_end"] = time.perf_counter()
                mark()
                if state["ended"] >= trials:
                    done.set()
                    return
                await asyncio.sleep(think * (0.5 + rng.random()))
            except grpc.aio.AioRpcError as e:
                counts["errors"] += 1
                if counts["errors"] < 5:
                    print(f"  {name}: {e.code().name} {e.details()}", file=sys.stderr)
                await asyncio.sleep(0.5)

    cpu0, emu0 = cpu_seconds(chief_pid), cpu_seconds(emulator_pid) if emulator_pid else 0.0
    tasks = [asyncio.create_task(sim(i)) for i in range(workers)]
    try:
        await asyncio.wait_for(done.wait(), timeout=deadline_s)
        finished = True
    except TimeoutError:
        finished = False
    cpu1 = cpu_seconds(chief_pid)
    emu1 = cpu_seconds(emulator_pid) if emulator_pid else 0.0
    peak = peak_rss_mb(chief_pid)
    done.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()

    if trace is not None:
        Path(os.environ["BENCH_TRACE"]).write_text(json.dumps(trace))
    ended = state["ended"]
    elapsed = (state["last_end"] or time.perf_counter()) - (state["first"] or time.perf_counter())
    out = {"workers": workers, "trials_run": trials, "trials_ended": ended,
           "finished": finished, "seconds": round(elapsed, 1),
           "trial_ops_per_s": round(counts["ops"] / elapsed, 1) if elapsed > 0 else None,
           "idle_polls": counts["idle"], "errors": counts["errors"],
           "chief_cpu_s": round(cpu1 - cpu0, 1),
           "chief_cpu_share": round((cpu1 - cpu0) / elapsed, 2) if elapsed > 0 else None,
           "chief_peak_rss_mb": round(peak, 1),
           "emulator_cpu_s": round(emu1 - emu0, 1) if emulator_pid else None,
           "latency_ms": {}}
    for method, values in lat.items():
        secs = [v for v, i in values if i >= 0]
        out["latency_ms"][method] = {"p50": round(pct(secs, 0.5) * 1e3, 2),
                                     "p99": round(pct(secs, 0.99) * 1e3, 2), "n": len(secs)}
    per_trial: dict[int, float] = {}
    for values in lat.values():
        for v, i in values:
            if i >= 0:
                per_trial[i] = per_trial.get(i, 0.0) + v

    def trial_cost(lo: int, hi: int) -> dict:
        """Trials lo..hi-1: median of a trial's three call latencies; chief CPU per trial
        while the ended count went from lo to hi."""
        got = [per_trial[i] for i in range(lo, hi) if i in per_trial]
        cpu = None
        if lo in marks and hi in marks:
            cpu = round((marks[hi][0] - marks[lo][0]) / (hi - lo) * 1e3, 2)
        return {"trials": f"{lo}-{hi - 1}", "chief_cpu_ms_per_trial": cpu,
                "median_call_ms_per_trial":
                    round(statistics.median(got) * 1e3, 2) if got else None}

    early = trial_cost(early_lo, early_lo + width)
    late = trial_cost(late_lo, measured)
    out["cost_early"], out["cost_late"] = early, late
    return out


def run_capacity(args, work: Path) -> list[dict]:
    rows = []
    for workers in args.workers:
        for impl in args.impls:
            # A fresh emulator per run: its cost per write grows with the objects it holds.
            emulator = Emulator(work / f"emulator-{impl}-{workers}.log")
            try:
                measured = args.emulator_trials if impl == "ours" else args.trials
                trials = measured + PAD
                port = free_port()
                name = f"cap-{impl}-{workers}-{int(time.time())}"
                server_log = work / f"{name}.log"
                env = base_env(STORAGE_EMULATOR_HOST=emulator.endpoint)
                cmd = [sys.executable, "-m", "bench.scale", "_serve-stock" if impl == "stock" else
                       "_serve-ours", "--port", str(port), "--trials", str(trials), "--name",
                       name, "--work", str(work / name)] + (["--disk"] if impl == "ours-disk"
                                                             else [])
                server = subprocess.Popen(cmd, env=env, stdout=open(server_log, "w"),
                                          stderr=subprocess.STDOUT)
                try:
                    wait_port(port, server)
                    print(f"capacity: {impl} chief, {workers} workers, {trials} trials ...",
                          flush=True)
                    row = asyncio.run(drive(port, workers, trials, args.think, args.deadline,
                                            server.pid, emulator.proc.pid if impl == "ours"
                                            else None))
                    row["state"] = {"ours": "emulator bucket", "ours-disk": "local folder",
                                    "stock": "local folder (keras-tuner)"}[impl]
                    row["impl"] = impl
                    if impl != "stock":  # ours leaves by itself once the last trial ended
                        t0 = time.monotonic()
                        try:
                            server.wait(timeout=60)
                            row["chief_exit_s_after_last_trial"] = round(
                                time.monotonic() - t0, 2)
                            row["chief_exit_code"] = server.returncode
                        except subprocess.TimeoutExpired:
                            row["chief_exit_s_after_last_trial"] = None
                    print("  " + json.dumps(row), flush=True)
                    rows.append(row)
                finally:
                    if server.poll() is None:
                        server.kill()
                        server.wait()
            finally:
                emulator.stop()
    return rows


# ---------------------------------------------------------------------------
# scaling: real trials with 1 and 2 pinned worker processes

def run_scaling(args, work: Path) -> list[dict]:
    import yaml

    cores = sorted(os.sched_getaffinity(0))
    rows = []
    emulator = Emulator(work / "emulator-scaling.log")
    try:
        for n in args.scaling_workers:
            name = f"scale-{n}w-{int(time.time())}"
            doc = {
                "apiVersion": "skin/v1", "kind": "Experiment", "name": name, "workers": n,
                "storage": {"bucket": BUCKET, "prefix": "scaling"},
                "data": {"source": "synthetic", "synthetic_images_per_class": 120,
                         "image_size": 48, "validation_fraction": 0.25, "seed": 11,
                         "shards": 2},
                "search": {"tuner": "random", "objective": "val_auc",
                           "max_trials": args.scaling_trials, "max_epochs": args.scaling_epochs,
                           "lease_seconds": 600,
                           "fixed": {"blocks": 3, "batch_size": 32, "mixup": 0.0}},
                "chief": {"metrics_port": 0},
            }
            config = work / f"{name}.yaml"
            config.write_text(yaml.safe_dump(doc))
            env = base_env(STORAGE_EMULATOR_HOST=emulator.endpoint, SKIN_CONFIG=str(config),
                           SKIN_LOG_LEVEL="INFO")
            stage = subprocess.run([sys.executable, "-m", "skin.cli", "stage"], env=dict(
                env, SKIN_WORK_DIR=str(work / name / "stage")), capture_output=True, text=True)
            if stage.returncode:
                raise RuntimeError(f"stage failed: {stage.stderr[-2000:]}")
            port = free_port()
            procs = {}
            t0 = time.monotonic()
            busy0, ours0 = machine_busy_s(), children_cpu_s()
            emu0 = cpu_seconds(emulator.proc.pid)
            for role in ["chief"] + [f"tuner{i}" for i in range(n)]:
                role_env = dict(env, KERASTUNER_TUNER_ID=role, KERASTUNER_ORACLE_IP="127.0.0.1",
                                KERASTUNER_ORACLE_PORT=str(port), SKIN_METRICS_PORT="0",
                                SKIN_WORK_DIR=str(work / name / role))
                cmd = [sys.executable, "-m", "skin.cli", "tune", "--tuner-id", role]
                if role != "chief" and shutil.which("taskset"):
                    core = cores[int(role[5:]) % len(cores)]
                    cmd = ["taskset", "-c", str(core)] + cmd
                procs[role] = subprocess.Popen(cmd, env=role_env, stdout=open(
                    work / f"{name}-{role}.log", "w"), stderr=subprocess.STDOUT)
            print(f"scaling: {n} worker(s), {args.scaling_trials} trials x "
                  f"{args.scaling_epochs} epochs ...", flush=True)
            codes = {r: p.wait(timeout=args.deadline) for r, p in procs.items()}
            wall = time.monotonic() - t0
            busy = machine_busy_s() - busy0
            ours = children_cpu_s() - ours0 + cpu_seconds(emulator.proc.pid) - emu0
            from skin.infra.config import load_experiment
            from skin.infra.storage import Storage
            from skin.tuning import load_result

            os.environ["STORAGE_EMULATOR_HOST"] = emulator.endpoint
            result = load_result(Storage(), load_experiment(config, env={})).to_json()
            attempts = [a for t in result["trials"] for a in t["attempts"]]
            # From the first trial's start to the last trial's end: the budget's run time,
            # without the processes' start (TensorFlow import, data sync), equal in both runs.
            span = max(a["ended"] for a in attempts) - min(a["started"] for a in attempts)
            gaps = []  # a worker's wait between one trial's end and the next one's start
            for w in {a["worker"] for a in attempts}:
                mine = sorted((a for a in attempts if a["worker"] == w), key=lambda a: a["started"])
                gaps += [b["started"] - a["ended"] for a, b in zip(mine, mine[1:])]
            row = {"workers": n, "trials": len(result["trials"]), "codes": codes,
                   "completed": result["counts"].get("completed", 0),
                   "trials_span_s": round(span, 1), "wall_s": round(wall, 1),
                   # CPU over the run, in cores: ours (chief, workers, emulator) and everything
                   # else on the machine (other people's jobs share these 2 cores)
                   "cores_ours": round(ours / wall, 2),
                   "cores_others": round(max(0.0, busy - ours) / wall, 2),
                   "gap_between_trials_ms_max": round(max(gaps, default=0) * 1e3, 1),
                   "trial_s_mean": round(statistics.mean(t["duration"]
                                                         for t in result["trials"]), 1),
                   "per_worker": {w: sum(1 for t in result["trials"] if t["worker"] == w)
                                  for w in sorted({t["worker"] for t in result["trials"]})}}
            print("  " + json.dumps(row), flush=True)
            rows.append(row)
    finally:
        emulator.stop()
    if len(rows) >= 2:
        rows.append({"speedup_trials_span": round(rows[0]["trials_span_s"] /
                                                  rows[-1]["trials_span_s"], 2),
                     "speedup_wall": round(rows[0]["wall_s"] / rows[-1]["wall_s"], 2)})
    return rows


# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="all",
                        choices=["all", "capacity", "scaling", "_serve-ours", "_serve-stock"])
    parser.add_argument("--disk", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--emulator-trials", type=int, default=2000,
                        help="trials for 'ours' with its state in the emulator (whose every "
                             "write re-serialises the metadata of all its objects)")
    parser.add_argument("--workers", default="200,1000")
    parser.add_argument("--impls", default="ours,ours-disk,stock",
                        help="ours (state in the emulator), ours-disk (in a local folder), stock")
    parser.add_argument("--think", type=float, default=0.7,
                        help="mean seconds a simulated worker waits before each call")
    parser.add_argument("--deadline", type=float, default=1800)
    parser.add_argument("--scaling-workers", default="1,2")
    parser.add_argument("--scaling-trials", type=int, default=16)
    parser.add_argument("--scaling-epochs", type=int, default=3)
    parser.add_argument("--out", default="")
    parser.add_argument("--port", type=int)
    parser.add_argument("--name", default="")
    parser.add_argument("--work", default="")
    args = parser.parse_args(argv)
    if args.what == "_serve-ours":
        return serve_ours(args)
    if args.what == "_serve-stock":
        return serve_stock(args)
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.impls = [i for i in args.impls.split(",") if i]
    args.scaling_workers = [int(w) for w in args.scaling_workers.split(",") if w]

    work = Path(tempfile.mkdtemp(prefix="skin-bench-scale-"))
    report = {"command": "python -m bench.scale " + " ".join(argv or sys.argv[1:]),
              "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.node()}: {os.cpu_count()} cpus, {platform.processor()}",
              "load_avg_at_start": os.getloadavg()}
    print(f"work dir {work}", flush=True)
    if args.what in ("all", "capacity"):
        report["capacity"] = run_capacity(args, work)
    if args.what in ("all", "scaling"):
        report["scaling"] = run_scaling(args, work)
    report["load_avg_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
