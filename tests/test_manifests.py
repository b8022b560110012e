"""k8s/tuning and k8s/kind: rendered with kustomize, validated against the official
schemas, and the properties users and the cluster rely on asserted on the objects.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from skin.errors import EXIT_RETRYABLE, FATAL_EXIT_CODES
from skin.infra.config import (
    DEFAULT_EXPERIMENT_FILE,
    QUICKSTART_EXPERIMENT_FILE,
    load_experiment,
    parse_experiment,
)
from skin.infra.runtime import runtime_from_env

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = ("tuning", "kind")
K8S_VERSIONS = ("1.29", "1.30", "1.31", "1.32", "1.33")  # as Makefile K8S_VERSIONS
WRITABLE_ENV = ("HOME", "TMPDIR", "MPLCONFIGDIR", "KERAS_HOME", "SKIN_WORK_DIR")
GPU = "nvidia.com/gpu"
# Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl (with kustomize) is not installed")


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def objects(overlay: str, kind: str) -> list[dict]:
    return [d for d in render(overlay) if d["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict:
    found = [d for d in objects(overlay, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(overlay: str) -> list[dict]:
    return [d for d in render(overlay) if d["kind"] in ("Job", "Deployment")]


def skin_jobs(overlay: str) -> dict[str, dict]:
    """The roles' Jobs by component label."""
    jobs = {}
    for job in objects(overlay, "Job"):
        jobs[job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] = job
    return jobs


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container: dict, name: str) -> str:
    return env_of(container)[name]["value"]


def pod_env(job: dict) -> dict[str, str]:
    """The plain environment of a Job's container, with the pod-label fieldRefs resolved as
    the kubelet resolves them (SKIN_EXPERIMENT_NAME)."""
    labels = job["spec"]["template"]["metadata"].get("labels", {})
    (c,) = pod_spec(job)["containers"]
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            path = e["valueFrom"].get("fieldRef", {}).get("fieldPath", "")
            m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            if m:
                env[e["name"]] = labels.get(m.group(1), "")
    return env


def experiment(overlay: str, role: str = "chief"):
    """The experiment a role's pod runs: the mounted file with the pod's SKIN_* overrides."""
    (cm,) = objects(overlay, "ConfigMap")
    return parse_experiment(yaml.safe_load(cm["data"]["experiment.yaml"]),
                            env=pod_env(skin_jobs(overlay)[role]))


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions In/NotIn/Exists)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# --- rendering and schemas -------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_renders_every_part(overlay):
    kinds = {d["kind"] for d in render(overlay)}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "Job",
            "NetworkPolicy"} <= kinds
    assert set(skin_jobs(overlay)) == {"stage", "chief", "worker", "retrain"}
    # Nothing an experiment shares with the others in its namespace: the Namespace
    # (k8s/namespace.yaml) and the token Secret are applied once, apart.
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Secret", "Namespace"}


def test_the_bundled_schemas_cover_the_supported_versions():
    bundled = {kubernetes_validate.utils.major_minor(v)
               for v in kubernetes_validate.utils.all_versions()}
    assert set(K8S_VERSIONS) <= bundled


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_strict_schema_validation(overlay, version):
    for doc in render(overlay):
        kubernetes_validate.validate(doc, f"{version}.0", strict=True)
    kubernetes_validate.validate(namespace(), f"{version}.0", strict=True)


def test_strict_validation_rejects_an_unknown_field():
    job = yaml.safe_load(yaml.safe_dump(skin_jobs("tuning")["worker"]))
    job["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True  # typo
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(job, "1.29.0", strict=True)


def test_the_makefile_validates_the_same_versions():
    makefile = (REPO / "Makefile").read_text()
    versions = re.search(r"^K8S_VERSIONS \?= (.+)$", makefile, re.M).group(1).split()
    assert tuple(versions) == K8S_VERSIONS


# --- pod security, resources, labels ----------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_standard_with_a_read_only_root(overlay):
    for obj in workloads(overlay):
        where = f"{overlay} {obj['kind']} {obj['metadata']['name']}"
        spec = pod_spec(obj)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), where
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, (where, volume)
        for c in containers(obj):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert csc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert csc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert not csc.get("privileged"), (where, c["name"])
            assert csc.get("runAsUser", psc["runAsUser"]) != 0, (where, c["name"])


def namespace() -> dict:
    return yaml.safe_load((REPO / "k8s/namespace.yaml").read_text())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespace_enforces_the_restricted_standard(overlay):
    ns = namespace()
    assert ns["kind"] == "Namespace"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {d["metadata"].get("namespace") for d in render(overlay)} == {ns["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    for obj in workloads(overlay):
        for c in containers(obj):
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), \
                    (overlay, obj["metadata"]["name"], c["name"], kind)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_and_pod_carries_the_app_labels(overlay):
    for doc in render(overlay):
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "skin", (doc["kind"], doc["metadata"])
        assert "app.kubernetes.io/name" in labels, (doc["kind"], doc["metadata"])
    for obj in workloads(overlay):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert {"app.kubernetes.io/name", "app.kubernetes.io/part-of",
                "app.kubernetes.io/component"} <= set(labels), obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_what_must_write_goes_to_an_empty_dir(overlay):
    for role, job in skin_jobs(overlay).items():
        spec = pod_spec(job)
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        (c,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        writable = [p for p, m in mounts.items() if m["name"] in empty_dirs]
        for name in WRITABLE_ENV:
            path = env_value(c, name)
            assert any(path == p or path.startswith(p.rstrip("/") + "/") for p in writable), \
                (overlay, role, name, path)
        assert mounts["/tmp"]["name"] in empty_dirs, (overlay, role)


# --- the roles --------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_runs_its_entrypoint_with_the_mounted_experiment(overlay):
    (cm,) = objects(overlay, "ConfigMap")
    for job in skin_jobs(overlay).values():
        spec = pod_spec(job)
        (c,) = spec["containers"]
        module = c["command"][2]
        assert c["command"][:2] == ["python", "-m"] and module.startswith("jobs."), c["command"]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
        (volume,) = [v for v in spec["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True
        assert env_value(c, "SKIN_CONFIG") == f"{mount['mountPath']}/experiment.yaml"
        assert spec["restartPolicy"] == "Never"
        assert c["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_failure_policy_follows_the_exit_codes(overlay):
    for role, job in skin_jobs(overlay).items():
        rules = job["spec"]["podFailurePolicy"]["rules"]
        by_action = {r["action"]: r for r in rules}
        fatal = rules[0]["onExitCodes"]
        assert fatal["operator"] == "In" and tuple(fatal["values"]) == FATAL_EXIT_CODES, role
        ignored = [r for r in rules if r["action"] == "Ignore"]
        assert {"onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                "action": "Ignore"} in ignored, role
        retried = by_action["Count"]["onExitCodes"]["values"]
        assert EXIT_RETRYABLE in retried and {130, 137, 143} <= set(retried), role
        assert not set(retried) & set(FATAL_EXIT_CODES), role
        # The fatal rule comes first: the first matching rule wins.
        assert rules[0]["action"] == "FailJob", role
        assert job["spec"]["podReplacementPolicy"] == "Failed", role


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_are_an_indexed_job_sized_by_the_experiment(overlay):
    workers = skin_jobs(overlay)["worker"]
    spec = workers["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == experiment(overlay).workers
    assert spec["backoffLimitPerIndex"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_worker_gets_its_tuner_id_from_the_completion_index(overlay):
    (c,) = pod_spec(skin_jobs(overlay)["worker"])["containers"]
    names = [e["name"] for e in c["env"]]
    # $(VAR) expands only variables declared earlier in the list.
    assert names.index("JOB_COMPLETION_INDEX") < names.index("KERASTUNER_TUNER_ID")
    assert env_of(c)["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    template = env_value(c, "KERASTUNER_TUNER_ID")
    assert template == "tuner$(JOB_COMPLETION_INDEX)"
    # What the kubelet makes of it, for index 3, is a worker id skin accepts.
    env = {k: v["value"] for k, v in env_of(c).items()
           if "value" in v and k != "SKIN_ORACLE_TOKEN_FILE"}  # the Secret: tests below
    env["KERASTUNER_TUNER_ID"] = template.replace("$(JOB_COMPLETION_INDEX)", "3")
    runtime = runtime_from_env(env)
    assert (runtime.role, runtime.worker_index) == ("worker", 3)
    # The wait for the staged data is bounded (the stage Job runs at the same time).
    assert 0 < runtime.data_wait_seconds <= 3600


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_dial_the_chief_service_on_the_oracle_port(overlay):
    jobs = skin_jobs(overlay)
    (chief,) = pod_spec(jobs["chief"])["containers"]
    (worker,) = pod_spec(jobs["worker"])["containers"]
    service = one(overlay, "Service", env_value(worker, "KERASTUNER_ORACLE_IP"))
    assert selects({"matchLabels": service["spec"]["selector"]},
                   jobs["chief"]["spec"]["template"]["metadata"]["labels"])
    assert not selects({"matchLabels": service["spec"]["selector"]},
                       jobs["worker"]["spec"]["template"]["metadata"]["labels"])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    chief_ports = {p["name"]: p["containerPort"] for p in chief["ports"]}
    exp = experiment(overlay)
    assert int(env_value(worker, "KERASTUNER_ORACLE_PORT")) == ports["oracle"]["port"]
    assert int(env_value(chief, "KERASTUNER_ORACLE_PORT")) == chief_ports["oracle"]
    assert ports["oracle"]["targetPort"] == "oracle"
    assert chief_ports["oracle"] == exp.chief.oracle_port
    assert ports["metrics"]["targetPort"] == "metrics"
    assert int(env_value(chief, "SKIN_METRICS_PORT")) == chief_ports["metrics"] \
        == exp.chief.metrics_port
    worker_ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert int(env_value(worker, "SKIN_METRICS_PORT")) == worker_ports["metrics"]
    # The runtimes parse (POD_NAMESPACE comes from the downward API).
    assert runtime_from_env({**{k: v.get("value", "skin") for k, v in env_of(chief).items()
                                if k != "SKIN_ORACLE_TOKEN_FILE"}}).role == "chief"
    assert chief["readinessProbe"]["tcpSocket"]["port"] == "oracle"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_retrain_job_waits_suspended_for_the_chief(overlay):
    jobs = skin_jobs(overlay)
    retrain = jobs["retrain"]
    assert retrain["spec"]["suspend"] is True
    assert not any(job["spec"].get("suspend") for role, job in jobs.items() if role != "retrain")
    (chief,) = pod_spec(jobs["chief"])["containers"]
    assert env_value(chief, "SKIN_RETRAIN_JOB") == retrain["metadata"]["name"]
    assert env_of(chief)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.namespace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_chief_may_touch_the_api_and_only_the_retrain_job(overlay):
    jobs = skin_jobs(overlay)
    (role,) = objects(overlay, "Role")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["batch"] and rule["resources"] == ["jobs"]
    assert rule["resourceNames"] == [jobs["retrain"]["metadata"]["name"]]
    assert sorted(rule["verbs"]) == ["get", "patch"]
    (binding,) = objects(overlay, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    (subject,) = binding["subjects"]
    chief_spec = pod_spec(jobs["chief"])
    assert subject["kind"] == "ServiceAccount"
    assert subject["name"] == chief_spec["serviceAccountName"]
    assert chief_spec["automountServiceAccountToken"] is True
    for obj in workloads(overlay):
        if obj is jobs["chief"]:
            continue
        spec = pod_spec(obj)
        assert spec["automountServiceAccountToken"] is False, obj["metadata"]["name"]
        assert spec.get("serviceAccountName") != subject["name"], obj["metadata"]["name"]


# --- the network ------------------------------------------------------------------------------

def _allowed_peers(overlay: str, pod_labels: dict, port: str) -> list[dict]:
    peers = []
    for policy in objects(overlay, "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"], pod_labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            if any(p.get("port") == port for p in rule.get("ports", [])) or not rule.get("ports"):
                peers.extend(rule.get("from", [{"everyone": True}]))
    return peers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_workers_reach_the_oracle_and_only_monitoring_the_metrics(overlay):
    jobs = skin_jobs(overlay)
    labels = {role: job["spec"]["template"]["metadata"]["labels"] for role, job in jobs.items()}
    # Every skin pod is isolated for ingress by at least one policy.
    for role, pod_labels in labels.items():
        assert any(selects(p["spec"]["podSelector"], pod_labels)
                   and "Ingress" in p["spec"]["policyTypes"]
                   for p in objects(overlay, "NetworkPolicy")), role
    oracle_peers = _allowed_peers(overlay, labels["chief"], "oracle")
    assert oracle_peers and all(set(p) == {"podSelector"} for p in oracle_peers)
    for role, pod_labels in labels.items():
        allowed = any(selects(p["podSelector"], pod_labels) for p in oracle_peers)
        assert allowed == (role == "worker"), role
    for role in ("chief", "worker"):
        peers = _allowed_peers(overlay, labels[role], "metrics")
        assert peers == [{"namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": PROMETHEUS}], role
    for role in ("stage", "retrain"):
        assert _allowed_peers(overlay, labels[role], "metrics") == [], role


# --- the experiment ---------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_experiment_passes_the_validator(overlay):
    exp = experiment(overlay)
    assert exp.name and exp.workers >= 1


def test_the_cluster_experiment_is_the_shipped_default_with_its_data_in_the_bucket():
    exp = experiment("tuning")
    default = load_experiment(DEFAULT_EXPERIMENT_FILE, env={})
    assert exp.data.source.startswith(f"gs://{exp.storage.bucket}/")
    assert exp == dataclasses.replace(default,
                                      data=dataclasses.replace(default.data,
                                                               source=exp.data.source))


def test_the_kind_experiment_is_the_quickstart():
    assert experiment("kind") == load_experiment(QUICKSTART_EXPERIMENT_FILE, env={})
    assert experiment("kind").data.source == "synthetic"


# --- GPU (tuning) and CPU (kind) --------------------------------------------------------------

def test_tuning_trains_on_gpu_nodes():
    jobs = skin_jobs("tuning")
    for role in ("worker", "retrain"):
        spec = pod_spec(jobs[role])
        (c,) = spec["containers"]
        assert c["resources"]["limits"][GPU] == 1, role
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"], role
    for role in ("stage", "chief"):
        spec = pod_spec(jobs[role])
        assert GPU not in str(spec), role


def test_kind_has_no_gpu_anywhere():
    for obj in workloads("kind"):
        spec = pod_spec(obj)
        assert GPU not in yaml.safe_dump(spec), obj["metadata"]["name"]
        assert not spec.get("tolerations") and not spec.get("nodeSelector")


def test_tuning_reaches_the_bucket_through_workload_identity():
    accounts = {sa["metadata"]["name"]: sa for sa in objects("tuning", "ServiceAccount")}
    for job in skin_jobs("tuning").values():
        sa = accounts[pod_spec(job)["serviceAccountName"]]
        assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
            ".iam.gserviceaccount.com")
    text = yaml.safe_dump_all(render("tuning"))
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in text and "STORAGE_EMULATOR_HOST" not in text


def test_kind_talks_to_the_in_cluster_emulator_holding_the_bucket():
    name = "fake-gcs-server-" + experiment("kind").name  # the experiment's own emulator
    service = one("kind", "Service", name)
    deployment = one("kind", "Deployment", name)
    port = service["spec"]["ports"][0]["port"]
    for role, job in skin_jobs("kind").items():
        env = pod_env(job)
        # $(VAR): what the kubelet makes of it
        host = re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], env["STORAGE_EMULATOR_HOST"])
        assert host == f"http://{name}:{port}", role
    assert selects({"matchLabels": service["spec"]["selector"]},
                   deployment["spec"]["template"]["metadata"]["labels"])
    (server,) = pod_spec(deployment)["containers"]
    assert re.fullmatch(r"fsouza/fake-gcs-server:\d+\.\d+\.\d+", server["image"])
    # The URL it sends clients back to (resumable uploads) is its Service's.
    assert f"-external-url=http://$(FAKE_GCS_SERVICE):{port}" in server["args"]
    assert env_value(server, "FAKE_GCS_SERVICE") == name
    data_dir = next(a.split("=", 1)[1] for a in server["args"] if a.startswith("-data="))
    bucket_dirs = [m["mountPath"] for m in server["volumeMounts"]
                   if m["mountPath"].startswith(data_dir + "/")]
    assert bucket_dirs == [f"{data_dir}/{experiment('kind').storage.bucket}"]
    assert "iam.gke.io/gcp-service-account" not in yaml.safe_dump_all(render("kind"))


def test_images_are_pinned():
    for overlay in OVERLAYS:
        for obj in workloads(overlay):
            for c in containers(obj):
                name, _, tag = c["image"].rpartition(":")
                assert name and tag and tag != "latest", (overlay, c["image"])
    kind_images = {c["image"] for job in skin_jobs("kind").values() for c in containers(job)}
    assert kind_images == {"localhost/skin:dev"}


def test_the_kind_cluster_has_one_control_plane_and_two_workers():
    cluster = yaml.safe_load((REPO / "k8s/kind/cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster"
    assert [n["role"] for n in cluster["nodes"]] == ["control-plane", "worker", "worker"]


# === issue 12: the oracle token, the bind address, per-role identities, egress ==============
# (h12; a separate block so that other branches' manifest tests merge beside it)

PRIVATE_RANGES = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"}
# Peers outside the experiment: matchExpressions, which the overlay's experiment label
# (includeSelectors) leaves alone.
KUBE_DNS = {"matchExpressions": [{"key": "k8s-app", "operator": "In", "values": ["kube-dns"]}]}
PROMETHEUS = {"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In",
                                    "values": ["prometheus"]}]}


def pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"]["labels"]


def _secret_volume_of(obj: dict, container: dict, path: str) -> dict | None:
    """The secret volume whose mount holds ``path`` in ``container``, if any."""
    volumes = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/") and \
                "secret" in volumes[mount["name"]]:
            return {**volumes[mount["name"]], "mount": mount}
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_chief_and_workers_read_the_oracle_token_from_the_secret_and_nobody_else(overlay):
    jobs = skin_jobs(overlay)
    for role, job in jobs.items():
        (c,) = pod_spec(job)["containers"]
        env = env_of(c)
        if role in ("chief", "worker"):
            path = env["SKIN_ORACLE_TOKEN_FILE"]["value"]
            assert "SKIN_ORACLE_TOKEN" not in env  # never a literal in a manifest
            volume = _secret_volume_of(job, c, path)
            assert volume is not None, role
            assert volume["secret"]["secretName"] == "skin-oracle-token"
            assert path.endswith("/token")  # the Secret's key
            # Optional, so a missing Secret is the chief's clear exit 2, not a stuck pod.
            assert volume["secret"]["optional"] is True
            assert volume["mount"]["readOnly"] is True
            # They listen on the pod address (downward API), not on every interface.
            assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            assert "SKIN_BIND_ADDRESS" not in env or env["SKIN_BIND_ADDRESS"]["value"] != "0.0.0.0"
        else:
            assert not any(k.startswith("SKIN_ORACLE_TOKEN") for k in env), role
            assert all("secret" not in v for v in pod_spec(job).get("volumes", [])), role
    runtime = runtime_from_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_IP": "10.8.0.4",
                                "KERASTUNER_TUNER_ID": "chief"})
    assert runtime.bind_hosts == ("10.8.0.4", "127.0.0.1")


def test_the_docs_say_how_to_create_the_token_secret_and_what_a_missing_one_does():
    docs = (REPO / "docs/kubernetes.md").read_text()
    command = "kubectl -n skin create secret generic skin-oracle-token"
    assert command in docs
    assert command in (REPO / "k8s/tuning/kustomization.yaml").read_text()
    assert "skin-oracle-token" in (REPO / "Makefile").read_text()  # kind-deploy makes one
    section = docs[docs.index("### The oracle token"):]
    assert "exit 2" in section[:3000] or "exits 2" in section[:3000]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_runs_as_its_own_service_account(overlay):
    jobs = skin_jobs(overlay)
    accounts = {sa["metadata"]["name"]: sa for sa in objects(overlay, "ServiceAccount")}
    names = {role: pod_spec(job)["serviceAccountName"] for role, job in jobs.items()}
    assert len(set(names.values())) == len(jobs) == 4, names
    suffix = "-" + experiment(overlay).name
    for role, name in names.items():
        assert name == f"skin-{role}{suffix}" and name in accounts
        assert accounts[name].get("automountServiceAccountToken") is False
    if overlay == "tuning":
        gsas = {name: accounts[name]["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
                for name in names.values()}
        assert len(set(gsas.values())) == 4
        for name, gsa in gsas.items():  # per role, shared by the experiments
            assert gsa.startswith(f"{name.removesuffix(suffix)}@"), gsa
        docs = (REPO / "docs/kubernetes.md").read_text()
        for role, prefix in (("stage", "data/"), ("worker", "trials/"), ("chief", "tuner/"),
                             ("retrain", "models/")):
            assert f"skin-{role}@" in docs and prefix in docs


def _egress(overlay: str, pod_labels: dict) -> list[dict]:
    """Every egress rule of the policies that select a pod."""
    rules = []
    for policy in objects(overlay, "NetworkPolicy"):
        if selects(policy["spec"]["podSelector"], pod_labels):
            rules.extend(policy["spec"].get("egress", []))
    return rules


def _ports(rule: dict) -> set:
    return {(p.get("port"), p.get("protocol", "TCP")) for p in rule.get("ports", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_skin_pod_is_isolated_both_ways(overlay):
    for role, job in skin_jobs(overlay).items():
        labels = job["spec"]["template"]["metadata"]["labels"]
        types = set()
        for policy in objects(overlay, "NetworkPolicy"):
            if selects(policy["spec"]["podSelector"], labels):
                types |= set(policy["spec"]["policyTypes"])
        assert types == {"Ingress", "Egress"}, role


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_egress_is_what_each_role_needs(overlay):
    jobs = skin_jobs(overlay)
    chief_labels = jobs["chief"]["spec"]["template"]["metadata"]["labels"]
    exp = experiment(overlay)
    oracle_port = exp.chief.oracle_port
    for role, job in jobs.items():
        rules = _egress(overlay, job["spec"]["template"]["metadata"]["labels"])
        assert all(rule.get("to") and rule.get("ports") for rule in rules), role  # no open rule
        peers = [(peer, _ports(rule)) for rule in rules for peer in rule["to"]]
        # DNS, to the cluster DNS pods only
        dns = [p for p, ports in peers if (53, "UDP") in ports]
        assert dns and all(p["podSelector"] == KUBE_DNS for p in dns)
        # The Google APIs over HTTPS, and the metadata server
        public = [p for p, ports in peers if (443, "TCP") in ports and "ipBlock" in p
                  and PRIVATE_RANGES <= set(p["ipBlock"].get("except", []))]
        assert public, role
        assert any(p.get("ipBlock", {}).get("cidr") == "169.254.169.254/32"
                   and (80, "TCP") in ports for p, ports in peers), role
        # The oracle: workers only
        to_oracle = [p for p, ports in peers if "podSelector" in p
                     and selects(p["podSelector"], chief_labels) and (oracle_port, "TCP") in ports]
        assert bool(to_oracle) == (role == "worker"), role
        # The Kubernetes API (any address, its ports): the chief only
        api = [p for p, ports in peers if "ipBlock" in p and not p["ipBlock"].get("except")
               and ports & {(443, "TCP"), (6443, "TCP")}]
        assert bool(api) == (role == "chief"), role
        # Nothing else: every peer is one of the above (plus kind's in-cluster bucket)
        fake_gcs = {**pod_labels(one(overlay, "Deployment", "fake-gcs-server-" + exp.name))} \
            if overlay == "kind" else {}
        for peer, ports in peers:
            if "podSelector" in peer and not selects(peer["podSelector"], chief_labels) and \
                    peer["podSelector"] != KUBE_DNS:
                assert overlay == "kind" and selects(peer["podSelector"], fake_gcs) and \
                    ports == {(4443, "TCP")}, (role, peer)


# --- preemptions, hangs, deadlines (issue 13) ---------------------------------------------------

def _rule_for(rules: list[dict], code: int) -> str | None:
    """The action of the first rule whose onExitCodes match ``code`` (what the controller does)."""
    for rule in rules:
        req = rule.get("onExitCodes")
        if req and (code in req["values"]) == (req["operator"] == "In"):
            return rule["action"]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_preemption_spends_no_retry_and_a_hang_does(overlay):
    from skin.errors import EXIT_RELEASED, EXIT_WATCHDOG

    for role, job in skin_jobs(overlay).items():
        spec = job["spec"]
        rules = spec["podFailurePolicy"]["rules"]
        # The API server's rules for podFailurePolicy: restartPolicy Never, In-values sorted,
        # unique and never 0, each rule one requirement.
        assert pod_spec(job)["restartPolicy"] == "Never", role
        for rule in rules:
            assert ("onExitCodes" in rule) != ("onPodConditions" in rule), (role, rule)
            values = rule.get("onExitCodes", {}).get("values", [1])
            assert values == sorted(set(values)) and 0 not in values, (role, rule)
        # A preempted pod (DisruptionTarget, whatever its exit) is ignored before any Count.
        disruption = next(i for i, r in enumerate(rules) if r.get("onPodConditions"))
        first_count = next(i for i, r in enumerate(rules) if r["action"] == "Count")
        assert disruption < first_count, role
        if role in ("chief", "worker"):
            assert _rule_for(rules, EXIT_RELEASED) == "Ignore", role
        if role == "worker":
            assert _rule_for(rules, EXIT_WATCHDOG) == "Count", role  # a hung node counts
            # Valid with backoffLimitPerIndex: no FailIndex needed, Ignore and Count allowed.
            assert {r["action"] for r in rules} <= {"FailJob", "FailIndex", "Ignore", "Count"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_fits_a_release(overlay):
    from skin.tuning.preempt import DEFAULT_DEADLINE_S

    jobs = skin_jobs(overlay)
    for role in ("chief", "worker"):
        grace = pod_spec(jobs[role])["terminationGracePeriodSeconds"]
        # The worker releases within DEFAULT_DEADLINE_S (then its deadline thread does it),
        # inside GKE's 15 s for a spot node's pods; a drain gives the whole period.
        assert DEFAULT_DEADLINE_S + 5 <= grace <= 60, (role, grace)
    assert DEFAULT_DEADLINE_S + 5 <= 15


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_job_has_a_deadline_from_the_budget_and_a_ttl(overlay):
    from skin.infra.deadlines import job_deadlines

    derived = job_deadlines(experiment(overlay))
    jobs = skin_jobs(overlay)
    for role, key in (("stage", "stage"), ("chief", "chief"), ("worker", "workers"),
                      ("retrain", "retrain")):
        spec = jobs[role]["spec"]
        assert spec["activeDeadlineSeconds"] == derived[key], (overlay, role)
        assert 86400 <= spec["ttlSecondsAfterFinished"] <= 30 * 86400, (overlay, role)
    # The search's Jobs outlive the stage they wait for.
    assert derived["chief"] == derived["workers"] > derived["stage"]


def test_the_deadlines_follow_keras_tuners_hyperband_and_print_a_patch(capsys):
    from skin.infra.deadlines import hyperband_epochs, main

    assert hyperband_epochs(3, 3) == 11  # 3 trials of 1 epoch, 1 continued to 3, 2 of 3
    assert hyperband_epochs(12, 4) == 72  # k8s/tuning/experiment.yaml's comment
    assert main(["--config", str(REPO / "k8s/tuning/experiment.yaml"),
                 "--epoch-seconds", "60"]) == 0
    patch = yaml.safe_load(capsys.readouterr().out)["patches"]
    values = {p["target"]["name"]: yaml.safe_load(p["patch"])[0]["value"] for p in patch}
    assert values["skin-workers"] == 36 * 60 * 2 + 3600 and values["skin-stage"] == 3600
    assert main(["--config", str(REPO / "k8s/tuning/experiment.yaml"),
                 "--epoch-seconds", "0"]) == 2


def _affinity_excludes_spot(spec: dict) -> bool:
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    spot = {"cloud.google.com/gke-spot": "true", "cloud.google.com/gke-preemptible": "true"}
    on_demand = {"cloud.google.com/gke-nodepool": "gpu"}
    fits = [any(selects({"matchExpressions": t["matchExpressions"]}, labels) for t in terms)
            for labels in ({k: v} for k, v in spot.items())]
    return not any(fits) and any(selects({"matchExpressions": t["matchExpressions"]}, on_demand)
                                 for t in terms)


def test_tuning_keeps_the_chief_and_retrain_off_spot_nodes_and_lets_workers_on():
    jobs = skin_jobs("tuning")
    for role in ("chief", "retrain"):
        spec = pod_spec(jobs[role])
        assert _affinity_excludes_spot(spec), role
        assert not any(t.get("key") == "cloud.google.com/gke-spot"
                       for t in spec.get("tolerations", [])), role
    workers = pod_spec(jobs["worker"])
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
            "effect": "NoSchedule"} in workers["tolerations"]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in workers["tolerations"]
    assert "affinity" not in workers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_retrain_that_lost_the_race_for_latest_is_not_run_again(overlay):
    """Exit 7: its version is complete and another moved LATEST first; a rerun would train
    again and race again, so the Job fails with that code instead of retrying."""
    from skin.errors import EXIT_PUBLISH_RACE

    for role, job in skin_jobs(overlay).items():
        rules = job["spec"]["podFailurePolicy"]["rules"]
        expected = "FailJob" if role == "retrain" else None
        assert _rule_for(rules, EXIT_PUBLISH_RACE) == expected, role


# === issue 15: several experiments in one namespace ===========================================
# (h15b; a separate block so that other branches' manifest tests merge beside it)

def _kustomization(overlay: str) -> dict:
    return yaml.safe_load((REPO / "k8s" / overlay / "kustomization.yaml").read_text())


def _workers_literal(kustomization: dict) -> int:
    (gen,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "skin-experiment"]
    (value,) = [lit.split("=", 1)[1] for lit in gen["literals"] if lit.startswith("workers=")]
    return int(value)


def _worker_counts(overlay: str) -> set[int]:
    """Every place a rendered overlay says how many workers there are."""
    jobs = skin_jobs(overlay)
    spec = jobs["worker"]["spec"]
    return {spec["completions"], spec["parallelism"],
            *(experiment(overlay, role).workers for role in jobs)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_carries_its_experiments_name(overlay):
    k = _kustomization(overlay)
    (labels,) = [entry for entry in k["labels"] if "skin/experiment" in entry["pairs"]]
    name = labels["pairs"]["skin/experiment"]
    assert k["nameSuffix"] == f"-{name}"
    assert labels["includeSelectors"] is True and labels["includeTemplates"] is True
    assert len(name) <= 40  # docs/kubernetes.md: Job and Service names stay DNS labels
    for doc in render(overlay):
        meta = doc["metadata"]
        assert meta["name"].endswith(f"-{name}") or \
            meta["name"].startswith(f"skin-experiment-{name}-"), meta["name"]  # + content hash
        assert meta["labels"]["skin/experiment"] == name, (doc["kind"], meta["name"])
        if doc["kind"] in ("Job", "Service", "Deployment"):
            assert len(meta["name"]) <= 63, meta["name"]
    for obj in workloads(overlay):
        assert pod_labels(obj)["skin/experiment"] == name, obj["metadata"]["name"]
    # The pods run the experiment of that name (its bucket prefix); the file does not say.
    assert "name" not in yaml.safe_load((REPO / "k8s" / overlay / "experiment.yaml").read_text())
    for role in skin_jobs(overlay):
        assert experiment(overlay, role).name == name, role


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_worker_count_is_written_once(overlay):
    workers = _workers_literal(_kustomization(overlay))
    assert _worker_counts(overlay) == {workers}
    assert "workers" not in yaml.safe_load(
        (REPO / "k8s" / overlay / "experiment.yaml").read_text())
    # Only the replacements write it: no patch or resource in the overlay names a number.
    text = (REPO / "k8s" / overlay / "kustomization.yaml").read_text()
    assert not re.search(r"/spec/(parallelism|completions)", text)


def _second_experiment(tmp_path: Path) -> str:
    """docs/kubernetes.md's three commands for a second experiment, on a copy of k8s/, with
    `kubectl kustomize` for the apply; returns the new overlay's folder."""
    docs = (REPO / "docs/kubernetes.md").read_text()
    section = docs[docs.index("### A second experiment"):]
    block = re.search(r"\n\n((?: {4}\S.*\n)+)", section).group(1)
    commands = [line.strip() for line in block.splitlines()]
    assert len(commands) == 3 and commands[2].startswith("kubectl apply -k "), commands
    shutil.copytree(REPO / "k8s", tmp_path / "k8s")
    for command in commands[:2]:
        subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True)
    return str(tmp_path / commands[2].removeprefix("kubectl apply -k "))


def _selectors(doc: dict) -> list[dict]:
    """Every label selector of an object that picks pods in its own namespace."""
    spec = doc.get("spec", {})
    if doc["kind"] == "Service":
        return [{"matchLabels": spec["selector"]}]
    if doc["kind"] == "Deployment":
        return [spec["selector"]]
    if doc["kind"] == "NetworkPolicy":
        peers = [peer for rule in spec.get("ingress", []) for peer in rule.get("from", [])] + \
            [peer for rule in spec.get("egress", []) for peer in rule.get("to", [])]
        return [spec["podSelector"]] + [p["podSelector"] for p in peers
                                        if "podSelector" in p and "namespaceSelector" not in p]
    return []


def test_two_experiments_render_side_by_side_in_one_namespace(tmp_path):
    second = _second_experiment(tmp_path)
    names = {overlay: experiment(overlay).name for overlay in ("tuning", second)}
    assert names["tuning"] == "skin-cnn" and names[second] not in ("", "skin-cnn")
    # No object in common: applying one does not change the other, deleting one
    # (kubectl delete -k) leaves the other whole.
    keys = {overlay: {(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"])
                      for d in render(overlay)} for overlay in names}
    assert not keys["tuning"] & keys[second]
    assert {ns for k in keys.values() for _, ns, _ in k} == {namespace()["metadata"]["name"]}
    # Every selector picks its own experiment's pods and none of the other's.
    pods = {overlay: [pod_labels(w) for w in workloads(overlay)] for overlay in names}
    for overlay, other in (("tuning", second), (second, "tuning")):
        for doc in render(overlay):
            assert doc["metadata"]["labels"]["skin/experiment"] == names[overlay]
            for selector in _selectors(doc):
                assert not any(selects(selector, labels) for labels in pods[other]), \
                    (overlay, doc["kind"], doc["metadata"]["name"], selector)
        # Workers dial their own chief; the chief un-suspends its own retrain.
        jobs = skin_jobs(overlay)
        service = one(overlay, "Service", pod_env(jobs["worker"])["KERASTUNER_ORACLE_IP"])
        assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(jobs["chief"]))
        assert pod_env(jobs["chief"])["SKIN_RETRAIN_JOB"] == jobs["retrain"]["metadata"]["name"]
    # Each in its own bucket prefix, with its own worker count written once.
    assert experiment("tuning").root_uri != experiment(second).root_uri
    assert _worker_counts("tuning") == {_workers_literal(_kustomization("tuning"))}
    assert _worker_counts(second) == {_workers_literal(_kustomization(second))} != \
        _worker_counts("tuning")
    for doc in render(second):
        kubernetes_validate.validate(doc, f"{K8S_VERSIONS[-1]}.0", strict=True)


def test_the_docs_say_how_to_run_a_second_experiment():
    docs = (REPO / "docs/kubernetes.md").read_text()
    section = docs[docs.index("### A second experiment"):][:4000]
    for words in ("nameSuffix", "skin/experiment", "workers=", "kubectl delete -k",
                  "k8s/namespace.yaml", "skin-oracle-token"):
        assert words in section, words
    # Workload Identity binds the experiment's ServiceAccounts, as the overlay names them.
    accounts = {sa["metadata"]["name"] for sa in objects("tuning", "ServiceAccount")}
    assert accounts == {f"skin-{role}-skin-cnn" for role in ("stage", "chief", "worker", "retrain")}
    assert "EXPERIMENT=skin-cnn" in docs and "[skin/skin-$role-$EXPERIMENT]" in docs


def test_the_deadlines_take_the_overlays_worker_count(capsys):
    """The overlays' experiment files no longer say `workers`: the derivation takes it."""
    from skin.infra.deadlines import main

    config = str(REPO / "k8s/tuning/experiment.yaml")
    for workers, search_epochs in ((2, 36), (4, 18)):  # 72 hyperband epochs over the workers
        assert main(["--config", config, "--epoch-seconds", "60",
                     "--workers", str(workers)]) == 0
        patch = yaml.safe_load(capsys.readouterr().out)["patches"]
        values = {p["target"]["name"]: yaml.safe_load(p["patch"])[0]["value"] for p in patch}
        assert values["skin-workers"] == search_epochs * 60 * 2 + 3600
    assert main(["--config", config, "--workers", "0"]) == 2
    assert "--workers: 0 is not valid" in capsys.readouterr().err
