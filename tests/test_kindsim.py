"""kind-sim's control-plane part without podman: pods from the rendered k8s/kind, Job policies,
the API server. The pods themselves run in tests/test_kindsim_image.py (make image-test)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from skin.kindsim import jobs
from skin.kindsim.apiserver import FakeKubeAPI, Rbac, merge_patch
from skin.kindsim.pods import INDEX_KEY, SA_DIR, Cluster, PodConfigError, expand, render

REPO = Path(__file__).resolve().parents[1]
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


@pytest.fixture(scope="module")
def kind_yaml() -> str:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    return render(REPO / "k8s/kind")


@pytest.fixture
def cluster(kind_yaml, tmp_path) -> Cluster:
    c = Cluster(kind_yaml)
    c.assign_addresses("10.9.8")
    c.kube_api = ("10.9.8.1", 6443)
    c.sa_dirs = {"skin-chief-quickstart": str(tmp_path / "sa-chief")}
    return c


def test_every_worker_index_gets_its_pod_with_the_job_controllers_index(cluster, tmp_path):
    workers = [s for s in cluster.slots.values() if s.name == "skin-workers-quickstart"]
    assert [s.index for s in workers] == [0, 1]  # completions: 2 in k8s/kind
    assert len({s.ip for s in cluster.slots.values()}) == len(cluster.slots)
    for slot in workers:
        built = cluster.build_pod(slot, f"skin-workers-quickstart-{slot.index}-x", "t", tmp_path)
        meta = built.doc["metadata"]
        assert meta["annotations"][INDEX_KEY] == str(slot.index)
        assert meta["labels"]["job-name"] == "skin-workers-quickstart"
        env = built.env["worker"]
        # fieldRef to the annotation, then the kubelet's $(VAR) expansion.
        assert env["JOB_COMPLETION_INDEX"] == str(slot.index)
        assert env["KERASTUNER_TUNER_ID"] == f"tuner{slot.index}"
        assert {"name": "KERASTUNER_TUNER_ID", "value": f"tuner{slot.index}"} \
            in built.doc["spec"]["containers"][0]["env"]


def test_service_names_resolve_to_the_pod_their_selector_matches(cluster, tmp_path):
    built = cluster.build_pod(cluster.slots["skin-workers-quickstart/0"], "skin-workers-0-x", "t",
                              tmp_path)
    aliases = {h: a["ip"] for a in built.doc["spec"]["hostAliases"] for h in a["hostnames"]}
    assert aliases["skin-chief-quickstart"] == cluster.slots["skin-chief-quickstart"].ip
    assert aliases["skin-chief-quickstart.skin.svc.cluster.local"] == \
        cluster.slots["skin-chief-quickstart"].ip
    assert aliases["fake-gcs-server-quickstart"] == cluster.slots["fake-gcs-server-quickstart"].ip
    env = built.env["worker"]
    assert env["SKIN_CHIEF_QUICKSTART_SERVICE_HOST"] == cluster.slots["skin-chief-quickstart"].ip
    assert env["SKIN_CHIEF_QUICKSTART_SERVICE_PORT_ORACLE"] == "8000"
    assert env["KUBERNETES_SERVICE_HOST"] == "10.9.8.1"
    assert cluster.check_services() == []


def test_only_pods_that_automount_get_the_service_account_token(cluster, tmp_path):
    chief = cluster.build_pod(cluster.slots["skin-chief-quickstart"], "skin-chief-x", "t", tmp_path)
    mounts = chief.doc["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "kube-api-access", "mountPath": SA_DIR, "readOnly": True} in mounts
    stage = cluster.build_pod(cluster.slots["skin-stage-quickstart"], "skin-stage-x", "t", tmp_path)
    assert all(m["mountPath"] != SA_DIR for m in stage.doc["spec"]["containers"][0]["volumeMounts"])
    # The ConfigMap travels with the pod for kube play; its volume stays a configMap volume.
    assert [cm["kind"] for cm in chief.config_maps] == ["ConfigMap"]


def _with_secret(kind_yaml: str, *, env_key="token", mount=True) -> Cluster:
    docs = list(yaml.safe_load_all(kind_yaml))
    docs.append({"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": "oracle-token", "namespace": "skin"},
                 "data": {"token": base64.b64encode(b"s3cret").decode()}})
    for d in docs:
        if d["kind"] == "Job" and d["metadata"]["name"] == "skin-workers-quickstart":
            spec = d["spec"]["template"]["spec"]
            c = spec["containers"][0]
            c["env"].append({"name": "TOKEN", "valueFrom": {"secretKeyRef": {
                "name": "oracle-token", "key": env_key}}})
            c["env"].append({"name": "PRICE", "value": "$$(TOKEN) and $(TOKEN) and $(NOPE)"})
            if mount:
                spec["volumes"].append({"name": "tok", "secret": {"secretName": "oracle-token",
                                                                  "defaultMode": 0o440}})
                c["volumeMounts"].append({"name": "tok", "mountPath": "/var/run/token",
                                          "readOnly": True})
    c = Cluster(yaml.safe_dump_all(docs))
    c.assign_addresses("10.9.8")
    return c


def test_secrets_reach_env_and_volumes_as_the_kubelet_puts_them(kind_yaml, tmp_path):
    c = _with_secret(kind_yaml)
    built = c.build_pod(c.slots["skin-workers-quickstart/1"], "skin-workers-1-x", "t", tmp_path)
    env = built.env["worker"]
    assert env["TOKEN"] == "s3cret"
    assert env["PRICE"] == "$(TOKEN) and s3cret and $(NOPE)"
    vol = next(v for v in built.doc["spec"]["volumes"] if v["name"] == "tok")
    folder = vol["hostPath"]["path"]
    assert built.files[f"{folder}/token"] == (b"s3cret", 0o440)


def test_a_missing_secret_key_stops_the_pod_as_the_kubelet_would(kind_yaml, tmp_path):
    c = _with_secret(kind_yaml, env_key="nope", mount=False)
    with pytest.raises(PodConfigError, match="secret 'oracle-token' has no key 'nope'"):
        c.build_pod(c.slots["skin-workers-quickstart/0"], "skin-workers-0-x", "t", tmp_path)


def test_expand_follows_kubernetes():
    env = {"A": "1"}
    assert expand("$(A)-$(B)-$$(A)-$$$(A)", env) == "1-$(B)-$(A)-$1"


# --- the Job controller's decisions ------------------------------------------------------------

def _spec(kind_yaml: str, name: str) -> dict:
    return next(d for d in yaml.safe_load_all(kind_yaml)
                if d["kind"] == "Job" and d["metadata"]["name"] == name)["spec"]


@pytest.mark.parametrize("codes, conditions, action", [
    ({"worker": 2}, (), jobs.FAIL_JOB),  # configuration: fatal
    ({"worker": 4}, (), jobs.FAIL_JOB),
    ({"worker": 130}, ("DisruptionTarget",), jobs.IGNORE),  # preempted: not counted
    ({"worker": 137}, ("DisruptionTarget",), jobs.IGNORE),
    ({"worker": 130}, (), jobs.COUNT),  # interrupted without a disruption: counted
    ({"worker": 75}, (), jobs.COUNT),
    ({"worker": 1}, (), jobs.COUNT),  # no rule: counted
])
def test_pod_failure_policy_of_the_workers(kind_yaml, codes, conditions, action):
    got, why = jobs.failure_action(_spec(kind_yaml, "skin-workers-quickstart"),
                                   jobs.PodEnd(codes, frozenset(conditions)))
    assert got == action, why


def test_rules_follow_the_api_semantics():
    spec = {"podFailurePolicy": {"rules": [
        {"action": "Ignore", "onExitCodes": {"operator": "NotIn", "values": [1]}},
        {"action": "FailJob", "onExitCodes": {"containerName": "b", "operator": "In",
                                              "values": [1]}}]}}
    assert jobs.failure_action(spec, jobs.PodEnd({"a": 0, "b": 3}))[0] == jobs.IGNORE
    assert jobs.failure_action(spec, jobs.PodEnd({"a": 1, "b": 0}))[0] == jobs.COUNT
    assert jobs.failure_action(spec, jobs.PodEnd({"a": 0, "b": 1}))[0] == jobs.FAIL_JOB
    assert jobs.backoff_limit({}) == (6, False)
    assert jobs.backoff_limit({"backoffLimitPerIndex": 4, "backoffLimit": 9}) == (4, True)
    assert [jobs.replacement_delay(n, 1.0) for n in (0, 1, 2, 9)] == [0.0, 10.0, 20.0, 360.0]


# --- the API server -----------------------------------------------------------------------------

@pytest.fixture
def api(kind_yaml):
    objects = [d for d in yaml.safe_load_all(kind_yaml)]
    started = []
    server = FakeKubeAPI([o for o in objects if o["kind"] == "Job"],
                         tokens={"chief-token": ("skin", "skin-chief-quickstart"),
                                 "workload-token": ("skin", "skin-workload")},
                         rbac=Rbac(objects), on_unsuspend=lambda ns, n: started.append((ns, n)),
                         log=lambda line: None)
    port = server.serve("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}", started
    server.close()


def _call(url: str, method: str = "GET", token: str | None = None, body=None):
    req = urllib.request.Request(url, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/strategic-merge-patch+json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_chiefs_patch_starts_the_suspended_job_and_nothing_else_may(api):
    base, started = api
    job = f"{base}/apis/batch/v1/namespaces/skin/jobs/skin-retrain-quickstart"
    assert _call(job)[0] == 401
    assert _call(job, token="workload-token")[0] == 403  # the workload's SA has no Role
    status, doc = _call(job, token="chief-token")
    assert status == 200 and doc["spec"]["suspend"] is True
    # The Role names skin-retrain only.
    assert _call(f"{base}/apis/batch/v1/namespaces/skin/jobs/skin-workers-quickstart",
                 token="chief-token")[0] == 403
    status, doc = _call(job, "PATCH", "chief-token", {"spec": {"suspend": False}})
    assert status == 200 and doc["spec"]["suspend"] is False
    assert started == [("skin", "skin-retrain-quickstart")]
    _call(job, "PATCH", "chief-token", {"spec": {"suspend": False}})
    assert started == [("skin", "skin-retrain-quickstart")]  # once
    assert _call(f"{base}/api/v1/namespaces/skin/pods", token="chief-token")[0] == 404


def test_merge_patch():
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2, "d": 3}}


def test_a_secret_users_create_by_hand_reaches_an_optional_secret_volume(kind_yaml, tmp_path):
    c = _with_secret(kind_yaml)
    docs = [o for o in c.objects if not (o["kind"] == "Secret")]
    bare = Cluster(yaml.safe_dump_all(docs + [next(o for o in c.objects if o["kind"] == "Secret")
                                              | {"metadata": {"name": "other", "namespace": "skin"}}]))
    bare.assign_addresses("10.9.8")
    with pytest.raises(PodConfigError, match="secret 'oracle-token' not found"):
        bare.build_pod(bare.slots["skin-workers-quickstart/0"], "skin-workers-0-x", "t",
                       tmp_path)
    bare.add_secret("oracle-token", {"token": "made-here"})
    built = bare.build_pod(bare.slots["skin-workers-quickstart/0"], "skin-workers-0-x", "t",
                           tmp_path)
    assert built.env["worker"]["TOKEN"] == "made-here"
    with pytest.raises(Exception, match="already in the rendered manifests"):
        bare.add_secret("oracle-token", {"token": "again"})


def test_the_local_fake_gcs_server_image_is_the_release_the_kind_overlay_pins():
    dockerfile = (REPO / "images/fake-gcs-server.Dockerfile").read_text()
    built = re.search(r"^ARG FAKE_GCS_VERSION=(\S+)$", dockerfile, re.M).group(1)
    overlay = yaml.safe_load((REPO / "k8s/kind/fake-gcs/kustomization.yaml").read_text())
    pinned = next(i["newTag"] for i in overlay["images"] if i["name"] == "fsouza/fake-gcs-server")
    makefile = (REPO / "Makefile").read_text()
    local = re.search(r"^FAKE_GCS_IMAGE \?= \S+:(\S+)$", makefile, re.M).group(1)
    assert built == pinned == local


def test_the_simulator_maps_images_and_finds_the_experiment_and_its_bucket(kind_yaml, tmp_path):
    from skin.kindsim.simulator import SimOptions, Simulator

    sim = Simulator(kind_yaml, SimOptions(out=tmp_path, images={
        "fsouza/fake-gcs-server": "localhost/fake-gcs-server:1.54.0",
        "localhost/skin:dev": "localhost/skin:image-test"}, secrets=["tok/token"]))
    assert sim._image("fsouza/fake-gcs-server:1.54.0") == "localhost/fake-gcs-server:1.54.0"
    assert sim._image("localhost/skin:dev") == "localhost/skin:image-test"
    assert sim._image("localhost/skin:other") == "localhost/skin:other"
    assert len(sim.cluster.get("Secret", "tok")["stringData"]["token"]) == 64
    sim.cluster.assign_addresses("10.9.8")
    doc, storage, env = sim._experiment()
    # k8s/kind/experiment.yaml through the ConfigMap, with the name and the worker count the
    # overlay gives every pod (its skin/experiment label, its `workers=`)
    from skin.infra.config import parse_experiment
    exp = parse_experiment(doc, env=env)
    assert (exp.name, exp.workers, exp.data.source) == ("quickstart", 2, "synthetic")
    assert storage == f"http://{sim.cluster.slots['fake-gcs-server-quickstart'].ip}:4443"
