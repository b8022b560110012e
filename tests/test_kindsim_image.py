"""kind-sim for real: the rendered k8s/kind overlay's pods under podman (make image-test).

The overlay is k8s/kind itself with a smaller experiment (a test overlay on top
of it replaces the ConfigMap, as a user's own overlay would): fake-gcs-server
(the image built from the PyPI wrapper), stage, chief, two workers, the
suspended retrain. A worker is preempted mid-trial the way the kubelet does
it; the run must still publish a model. Broken manifests must fail the run
with the failing pod's log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from skin.kindsim.pods import render
from skin.kindsim.simulator import SimOptions, Simulator

REPO = Path(__file__).resolve().parents[1]
TAG = os.environ.get("SKIN_IMAGE_TEST_TAG", "image-test")
FAKE_GCS_IMAGE = "localhost/fake-gcs-server:1.54.0"
IMAGES = {"localhost/skin:dev": f"localhost/skin:{TAG}",
          "fsouza/fake-gcs-server": FAKE_GCS_IMAGE}

pytestmark = [
    pytest.mark.image,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("podman") is None or shutil.which("kubectl") is None,
                       reason="podman or kubectl is not installed"),
]

# A few trials of a tiny search; the bucket is the one k8s/kind's fake-gcs-server creates.
# Its name and worker count are k8s/kind's (quickstart, 2: the overlay gives them to the pods).
EXPERIMENT = {
    "apiVersion": "skin/v1", "kind": "Experiment",
    "storage": {"bucket": "skin-experiments", "prefix": "experiments"},
    "data": {"source": "synthetic", "synthetic_images_per_class": 40, "image_size": 32,
             "validation_fraction": 0.25, "test_fraction": 0.2, "shards": 1},
    "search": {"tuner": "random", "max_trials": 3, "max_epochs": 3, "lease_seconds": 120,
               "max_consecutive_failed_trials": 2},
    "retrain": {"epochs": 2, "patience": 0},
}


@pytest.fixture(scope="module")
def sim_images():
    """The skin image (the tag tests/test_image.py builds; cached layers) and fake-gcs-server."""
    for ref, target in ((IMAGES["localhost/skin:dev"], "runtime"),
                        (FAKE_GCS_IMAGE, "fake-gcs-server")):
        build = subprocess.run([str(REPO / "images/build.sh"), ref, target], cwd=REPO,
                               capture_output=True, text=True, timeout=1800)
        assert build.returncode == 0, f"building {ref} failed:\n{build.stderr[-4000:]}"


def overlay(tmp_path: Path, patches: list[dict] | None = None) -> str:
    """k8s/kind with the tiny experiment (and ``patches``), rendered by kustomize."""
    folder = tmp_path / "overlay"
    folder.mkdir()
    (folder / "experiment.yaml").write_text(yaml.safe_dump(EXPERIMENT, sort_keys=False))
    doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
           "resources": [os.path.relpath(REPO / "k8s/kind", folder)],
           "configMapGenerator": [{"name": "skin-experiment", "behavior": "replace",
                                   "files": ["experiment.yaml"]}]}
    if patches:
        doc["patches"] = patches
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return render(folder)


# As Makefile KIND_SIM_SECRETS: the Secrets a user creates by hand before kubectl apply.
SECRETS = ["skin-oracle-token/token"]
# The worker Job as k8s/kind names it (nameSuffix: its experiment's name); patches in
# overlay() still target it by its base name, skin-workers.
WORKERS_JOB = "skin-workers-quickstart"


def simulator(tmp_path: Path, text: str, timeout_s: float = 900) -> Simulator:
    return Simulator(text, SimOptions(out=tmp_path / "sim", images=IMAGES, timeout_s=timeout_s,
                                      backoff_scale=0.05, secrets=SECRETS))


def container_log(sim: Simulator, pod: str, container: str) -> str:
    out = subprocess.run(["podman", "logs", f"{pod}-{container}"], capture_output=True,
                         text=True, timeout=60, env=sim.env)
    return out.stdout + out.stderr


def test_the_kind_overlay_publishes_a_model_through_a_preempted_worker(sim_images, tmp_path,
                                                                        capsys):
    sim = simulator(tmp_path, overlay(tmp_path))
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(rc=sim.run()), daemon=True)
    started = time.monotonic()
    runner.start()

    # Preempt tuner1 as soon as its first trial runs (the kubelet: SIGTERM, grace, SIGKILL).
    preempted = None
    deadline = time.monotonic() + 600
    while preempted is None and runner.is_alive() and time.monotonic() < deadline:
        pod = sim.pod_of(WORKERS_JOB, 1)
        if pod and re.search(r"trial \S+ started on tuner1", container_log(sim, pod, "worker")):
            sim.disrupt(WORKERS_JOB, 1)
            preempted = pod
        time.sleep(0.5)
    runner.join(timeout=900)
    out = capsys.readouterr().out
    took = time.monotonic() - started
    with capsys.disabled():
        print(f"\nkind-sim run with a preempted worker: {took:.0f} s")
    assert preempted, f"tuner1 never started a trial\n{out[-6000:]}"
    assert result.get("rc") == 0, out[-8000:]

    # The preempted pod ended with the disruption, was not counted, and was replaced.
    ends = {pod: (key, code, action) for pod, key, code, action in sim.ended_pods}
    key, code, action = ends[preempted]
    assert (key, action) == (f"{WORKERS_JOB}/1", "Ignore"), ends
    assert code != 0
    log = (tmp_path / "sim/logs" / f"{preempted}.log").read_text()
    trial = re.search(r"trial (\S+) started on tuner1", log).group(1)
    assert f"trial {trial} completed on tuner1" not in log, "the trial ended before SIGTERM"
    assert sim.jobs[("Job", WORKERS_JOB)].attempts[f"{WORKERS_JOB}/1"] == 2
    assert f"pod {preempted}: preempted (DisruptionTarget)" in out

    # The chief started the retrain through the API; the model came out published.
    requests = [json.loads(line) for line in (tmp_path / "sim/apiserver.log").read_text()
                .splitlines()]
    assert [(r[0], r[4]) for r in requests] == [("GET", 200), ("PATCH", 200)], requests
    published = json.loads((tmp_path / "sim/published.json").read_text())
    assert published["version"] and published["metrics"]["n"] > 0, published
    assert (Path(published["model_dir"]) / "model.keras").exists()
    assert "published model" in out


@pytest.mark.parametrize("breakage, patch, expected", [
    # volumeMounts/1 is the experiment ConfigMap (0 is the oracle token Secret that
    # k8s/base/jobs/oracle-access.yaml adds).
    ("the ConfigMap mounted where the workers do not look",
     {"op": "replace", "path": "/spec/template/spec/containers/0/volumeMounts/1/mountPath",
      "value": "/etc/skin-config"},
     [r"FAILED with exit code 2: podFailurePolicy rule 0 \(FailJob\)",
      r"experiment file /etc/skin/experiment.yaml: cannot be read"]),
    ("a worker command that does not exist",
     {"op": "replace", "path": "/spec/template/spec/containers/0/command",
      "value": ["python", "-m", "jobs.tuner"]},
     [r"FAILED with exit code 1: no podFailurePolicy rule matched",
      r"No module named jobs.tuner", r"backoff limit exceeded"]),
])
def test_a_broken_manifest_fails_the_run_with_the_pods_log(sim_images, tmp_path, capsys,
                                                           breakage, patch, expected):
    text = overlay(tmp_path, [{"target": {"kind": "Job", "name": "skin-workers"},
                               "patch": yaml.safe_dump([patch])}])
    sim = simulator(tmp_path, text, timeout_s=600)
    rc = sim.run()
    out = capsys.readouterr()
    assert rc == 1, out.out[-6000:]
    assert f"kind-sim: Job {WORKERS_JOB} failed" in out.err, out.err
    for pattern in expected:
        assert re.search(pattern, out.out), (breakage, pattern, out.out[-6000:])
    assert "----- last" in out.out  # the pod's log is shown
