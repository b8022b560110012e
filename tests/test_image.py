"""The container image, for real: built with podman and run the way the cluster runs it.

`make image-test` (pytest -m image; plain `make test` leaves these out). The
image is built from images/Dockerfile on the debootstrap base (no registry is
reachable here); then every role runs as its own container on a podman network,
as the image's numeric non-root user with a read-only root filesystem and
tmpfs where the manifests put an emptyDir: the storage emulator, stage, a
chief, two workers and the retrain. The model must come out published.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TAG = os.environ.get("SKIN_IMAGE_TEST_TAG", "image-test")
ORACLE_TOKEN = secrets.token_urlsafe(24)  # this run's oracle token (chief and workers)
IMAGE = f"localhost/skin:{TAG}"
EMULATOR_IMAGE = f"localhost/skin-emulator:{TAG}"
UID = 10001  # images/Dockerfile USER
BUCKET = "skin-image-test"
EMULATOR_PORT = 9023
ORACLE_PORT = 8000
KUBE_API_PORT = 8001
NAMESPACE, RETRAIN_JOB = "skin", "skin-retrain"


pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]

# What this machine's podman needs (runc; gVisor's default ulimits are too high for it).
PODMAN_RUN = ["podman", "run", "--runtime", "runc",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# As in k8s/base/jobs: read-only root, writable emptyDirs at /tmp and /scratch.
LOCKED_DOWN = ["--read-only", "--read-only-tmpfs=false",
               "--tmpfs", "/tmp:rw,mode=1777,size=1g", "--tmpfs", "/scratch:rw,mode=1777,size=2g",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--env", "SKIN_WORK_DIR=/scratch"]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          check=check)


def run_in_image(*cmd: str, env: dict | None = None, image: str = IMAGE, extra=(),
                 timeout: float = 300) -> subprocess.CompletedProcess:
    env_args = [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
    return subprocess.run([*PODMAN_RUN, "--rm", *LOCKED_DOWN, *env_args, *extra, image, *cmd],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images():
    """Build the runtime image and the emulator image (cached layers make reruns fast)."""
    timings = {}
    for ref, target in ((IMAGE, "runtime"), (EMULATOR_IMAGE, "emulator")):
        start = time.monotonic()
        build = subprocess.run([str(REPO / "images/build.sh"), ref, target], cwd=REPO,
                               capture_output=True, text=True, timeout=1800)
        assert build.returncode == 0, f"building {ref} failed:\n{build.stdout[-4000:]}\n" \
                                      f"{build.stderr[-4000:]}"
        timings[target] = time.monotonic() - start
    print(f"\nimage build: runtime {timings['runtime']:.0f} s, emulator {timings['emulator']:.0f} s")
    return IMAGE


def test_the_image_runs_as_a_numeric_non_root_user(images):
    config = podman("image", "inspect", "--format", "{{.Config.User}}", IMAGE).stdout.strip()
    assert config == f"{UID}:{UID}"
    probe = run_in_image("python", "-c", "import os, sys\n"
                         "print(os.getuid(), os.getgid())\n"
                         "try:\n    open('/app/x', 'w')\nexcept OSError as e:\n"
                         "    print('read-only', e.errno)\n"
                         "open(os.path.join(os.environ['TMPDIR'], 'ok'), 'w').write('ok')\n"
                         "open('/scratch/ok', 'w').write('ok')\n")
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.split("\n")
    assert lines[0] == f"{UID} {UID}"
    assert lines[1].startswith("read-only")


def test_every_role_entrypoint_starts_read_only(images):
    result = run_in_image("skin", "--help")
    assert result.returncode == 0, result.stderr
    for role in ("stage", "tune", "retrain"):
        result = run_in_image("python", "-m", f"jobs.{role}", "--help")
        assert result.returncode == 0, (role, result.stderr)
        assert f"skin {role}" in result.stdout, (role, result.stdout)


def test_a_bad_setting_exits_with_the_config_code(images):
    # podFailurePolicy fails the Job on exit 2: the entrypoint must pass it through.
    result = run_in_image("python", "-m", "jobs.tune", env={"KERASTUNER_TUNER_ID": "worker-7"})
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "KERASTUNER_TUNER_ID" in result.stderr


# --- the whole pipeline as containers ---------------------------------------------------------

def experiment_doc() -> dict:
    """The smallest search that still exercises every role (seconds of CPU per trial)."""
    return {
        "apiVersion": "skin/v1", "kind": "Experiment", "name": "image-test", "workers": 2,
        "storage": {"bucket": BUCKET, "prefix": "experiments"},
        "data": {"source": "synthetic", "synthetic_images_per_class": 40, "image_size": 32,
                 "validation_fraction": 0.25, "test_fraction": 0.2, "shards": 1},
        "search": {"tuner": "random", "max_trials": 3, "max_epochs": 2, "lease_seconds": 120,
                   "max_consecutive_failed_trials": 2},
        "retrain": {"epochs": 2, "patience": 0},
        "chief": {"oracle_port": ORACLE_PORT, "metrics_port": 9090},
    }


class Pod:
    """The roles as containers on one podman network with fixed addresses."""

    def __init__(self, config_dir: Path):
        self.prefix = f"skin-it-{os.getpid()}"
        self.network = self.prefix
        self.config_dir = config_dir
        self.containers: list[str] = []
        podman("network", "create", self.network)
        subnet = podman("network", "inspect", self.network, "--format",
                        "{{range .Subnets}}{{.Subnet}}{{end}}").stdout.strip()
        base = subnet.split("/")[0].rsplit(".", 1)[0]
        self.ips = {"emulator": f"{base}.10", "chief": f"{base}.11", "kubeapi": f"{base}.12"}
        self.next_ip = 20
        self.base = base

    def start(self, role: str, *cmd: str, env: dict, image: str = IMAGE) -> str:
        name = f"{self.prefix}-{role}"
        ip = self.ips.get(role)
        if ip is None:
            ip = f"{self.base}.{self.next_ip}"
            self.next_ip += 1
        hosts = [a for r, addr in self.ips.items() for a in ("--add-host", f"{r}:{addr}")]
        env_args = [a for k, v in {"SKIN_CONFIG": "/etc/skin/experiment.yaml", **env}.items()
                    for a in ("--env", f"{k}={v}")]
        subprocess.run([*PODMAN_RUN, "-d", "--name", name, "--network", self.network,
                        "--ip", ip, *hosts, *LOCKED_DOWN, *env_args,
                        "-v", f"{self.config_dir}:/etc/skin:ro", image, *cmd],
                       check=True, capture_output=True, text=True, timeout=120)
        self.containers.append(name)
        return name

    def wait(self, name: str, timeout: float) -> int:
        try:
            out = podman("wait", name, timeout=timeout).stdout.strip()
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running after {timeout:.0f} s\n{self.logs()}")
        return int(out.splitlines()[-1])

    def logs(self, tail: int = 60) -> str:
        parts = []
        for name in self.containers:
            out = podman("logs", "--tail", str(tail), name, check=False)
            parts.append(f"----- {name} -----\n{out.stdout}{out.stderr}")
        return "\n".join(parts)

    def close(self) -> None:
        for name in reversed(self.containers):
            podman("rm", "-f", "-t", "0", name, check=False)
        podman("network", "rm", "-f", self.network, check=False)


@pytest.fixture
def pod(images, tmp_path):
    config_dir = tmp_path / "etc-skin"
    config_dir.mkdir()
    (config_dir / "experiment.yaml").write_text(yaml.safe_dump(experiment_doc(), sort_keys=False))
    # The chief finds the (fake) API through a kubeconfig, as it would outside a cluster.
    (config_dir / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://kubeapi:{KUBE_API_PORT}"}}],
        "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    config_dir.chmod(0o755)
    for f in config_dir.iterdir():
        f.chmod(0o644)
    pod = Pod(config_dir)
    yield pod
    pod.close()


def test_the_roles_as_containers_publish_a_model(pod):
    storage_env = {"STORAGE_EMULATOR_HOST": f"http://emulator:{EMULATOR_PORT}"}
    started = time.monotonic()
    timings = {}

    pod.start("emulator", "python", "-m", "skin.infra.emulator", "--host", "0.0.0.0",
              "--port", str(EMULATOR_PORT), "--bucket", BUCKET,
              "--external-url", f"http://emulator:{EMULATOR_PORT}", env={}, image=EMULATOR_IMAGE)
    deadline = time.monotonic() + 60
    while "http://" not in podman("logs", pod.containers[0], check=False).stdout:
        assert time.monotonic() < deadline, f"the emulator did not start\n{pod.logs()}"
        time.sleep(0.5)

    t = time.monotonic()
    stage = pod.start("stage", "python", "-m", "jobs.stage", env=storage_env)
    assert pod.wait(stage, timeout=600) == 0, f"stage failed\n{pod.logs()}"
    timings["stage"] = time.monotonic() - t

    # Just enough of the Kubernetes API for the chief's un-suspend (kind-sim's, from the
    # image); it prints every request as a JSON line.
    kubeapi = pod.start("kubeapi", "python", "-m", "skin.kindsim.apiserver", "--port",
                        str(KUBE_API_PORT), "--job", f"{NAMESPACE}/{RETRAIN_JOB}", env={})
    t = time.monotonic()
    chief = pod.start("chief", "python", "-m", "jobs.tune", env={
        **storage_env, "KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_PORT": str(ORACLE_PORT),
        "SKIN_METRICS_PORT": "9090", "SKIN_RETRAIN_JOB": RETRAIN_JOB, "POD_NAMESPACE": NAMESPACE,
        "KUBECONFIG": "/etc/skin/kubeconfig",
        # The oracle listens beyond loopback only with a token (issue 12): workers dial it.
        "SKIN_BIND_ADDRESS": "0.0.0.0", "SKIN_ORACLE_TOKEN": ORACLE_TOKEN})
    workers = [pod.start(f"worker{i}", "python", "-m", "jobs.tune", env={
        **storage_env, "KERASTUNER_TUNER_ID": f"tuner{i}", "KERASTUNER_ORACLE_IP": "chief",
        "KERASTUNER_ORACLE_PORT": str(ORACLE_PORT), "SKIN_METRICS_PORT": "9090",
        "SKIN_DATA_WAIT_SECONDS": "120", "SKIN_ORACLE_TOKEN": ORACLE_TOKEN}) for i in range(2)]
    for name in [*workers, chief]:
        assert pod.wait(name, timeout=1200) == 0, f"{name} failed\n{pod.logs()}"
    timings["search"] = time.monotonic() - t

    # The chief un-suspended the retrain Job through the kubernetes client; the Job
    # controller would now start the retrain pod, which is what comes next here.
    requests = [json.loads(line) for line in podman("logs", kubeapi).stdout.splitlines()
                if line.startswith("[")]
    job_path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{RETRAIN_JOB}"
    assert [(r[0], r[1]) for r in requests] == [("GET", job_path), ("PATCH", job_path)], requests
    assert requests[1][3] == {"spec": {"suspend": False}}

    t = time.monotonic()
    retrain = pod.start("retrain", "python", "-m", "jobs.retrain", env=storage_env)
    assert pod.wait(retrain, timeout=900) == 0, f"retrain failed\n{pod.logs()}"
    timings["retrain"] = time.monotonic() - t

    # What the bucket holds, read through skin's own Storage from one more container.
    root = f"gs://{BUCKET}/experiments/image-test"
    check = pod.start("check", "python", "-c", (
        "import json\n"
        "from skin.infra.storage import Storage\n"
        "s = Storage()\n"
        f"root = {root!r}\n"
        "version = s.read_text(root + '/models/LATEST').strip()\n"
        "print(json.dumps({'version': version,\n"
        "    'model': s.exists(f'{root}/models/{version}/model.keras'),\n"
        "    'metrics': s.read_json(f'{root}/models/{version}/metrics.json'),\n"
        "    'best': s.exists(root + '/tuner/best_hyperparameters.json')}))\n"),
        env=storage_env)
    assert pod.wait(check, timeout=120) == 0, pod.logs()
    found = json.loads(podman("logs", check).stdout.strip().splitlines()[-1])
    assert found["version"], found
    assert found["model"] is True, found
    assert found["best"] is True, found
    assert found["metrics"], found
    timings["total"] = time.monotonic() - started
    print("\nimage-test roles: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
