"""k8s/monitoring: the kustomization renders, its objects have the right shape, and the
dashboard and the alerts only use metrics that skin.metrics.chief and skin.metrics.worker export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from skin.metrics.chief import ChiefMetrics
from skin.metrics.worker import WorkerMetrics

MONITORING = Path(__file__).resolve().parents[1] / "k8s/monitoring"
DASHBOARD = MONITORING / "dashboards/skin-search.json"
KUSTOMIZE = shutil.which("kubectl") or shutil.which("kustomize")
K8S_VERSION = "1.32"

# The Prometheus Operator fields we use (monitoring.coreos.com/v1); a typo fails here.
PODMONITOR_SPEC = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                   "podTargetLabels", "sampleLimit"}
POD_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                "metricRelabelings", "honorLabels"}
RELABEL = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement",
           "action"}
RULE = {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}


def render() -> list[dict]:
    if KUSTOMIZE is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    argv = [KUSTOMIZE, "kustomize", str(MONITORING)] if KUSTOMIZE.endswith("kubectl") \
        else [KUSTOMIZE, "build", str(MONITORING)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    return kinds


def test_the_kustomization_follows_the_house_style():
    k = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert (MONITORING / "kustomization.yaml").read_text().startswith("#")  # says what it is for
    assert "commonLabels" not in k
    assert all(entry.get("includeSelectors") is False for entry in k["labels"])
    for resource in k["resources"]:
        assert (MONITORING / resource).is_file(), resource


def test_rendered_objects():
    kinds = by_kind(render())
    assert sorted((k, len(v)) for k, v in kinds.items()) == \
        [("ConfigMap", 1), ("PodMonitor", 2), ("PrometheusRule", 1)]
    for docs in kinds.values():
        for d in docs:
            labels = d["metadata"]["labels"]
            assert labels["app.kubernetes.io/part-of"] == "skin"
            assert labels["app.kubernetes.io/component"] == "monitoring"

    [cm] = kinds["ConfigMap"]
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    assert cm["metadata"]["name"] == "skin-grafana-dashboard"  # stable: no hash suffix
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["skin-search.json"]) == json.loads(DASHBOARD.read_text())

    roles = {}
    for pm in kinds["PodMonitor"]:
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        spec = pm["spec"]
        assert set(spec) <= PODMONITOR_SPEC, set(spec) - PODMONITOR_SPEC
        selector = spec["selector"]["matchLabels"]
        # The labels transformer must not have touched the selector (includeSelectors: false).
        assert selector["app.kubernetes.io/component"] in ("chief", "worker")
        [endpoint] = spec["podMetricsEndpoints"]
        assert set(endpoint) <= POD_ENDPOINT
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        for relabel in endpoint["relabelings"]:
            assert set(relabel) <= RELABEL
        [role] = [r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "role"]
        roles[selector["app.kubernetes.io/component"]] = role
        # Several experiments share the namespace: each series says whose it is.
        [experiment] = [r for r in endpoint["relabelings"] if r["targetLabel"] == "experiment"]
        assert experiment["sourceLabels"] == ["__meta_kubernetes_pod_label_skin_experiment"]
    assert roles == {"chief": "chief", "worker": "worker"}

    [rule] = kinds["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        for r in group["rules"]:
            assert set(r) <= RULE
            assert r["labels"]["severity"] in ("info", "warning", "critical")
            assert r["annotations"]["summary"] and r["annotations"]["description"]
            if "for" in r:
                assert re.fullmatch(r"\d+[smh]", r["for"])


def test_the_dashboard_is_portable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "skin-search"
    assert "id" not in dash  # Grafana assigns it; a fixed one clashes on import
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # The experiments of the chosen namespaces, from the PodMonitors' `experiment` target label;
    # All is a regex that also matches series without it (a local Prometheus).
    experiment = variables["experiment"]
    assert "experiment)" in experiment["query"]["query"] and "$namespace" in experiment["definition"]
    assert experiment["includeAll"] and experiment["allValue"] == ".*"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    text = DASHBOARD.read_text()
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', text)) - {"skin-search"}
    assert uids == {"${datasource}"}, "a hard-coded datasource uid"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'namespace=~"$namespace"' in target["expr"], (panel["title"], target["expr"])
            # several experiments in one namespace: the PodMonitors' `experiment` label
            assert 'experiment=~"$experiment"' in target["expr"], (panel["title"], target["expr"])
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24


def exported_names() -> set[str]:
    """Every sample name the chief and a worker expose (histograms with their series)."""
    chief, worker = CollectorRegistry(), CollectorRegistry()
    # Series of a worker appear once it reports (no last-report time before one).
    ChiefMetrics(chief, workers=1).worker_report("tuner0", epoch=1, epochs_budget=2)
    WorkerMetrics(worker, "tuner0")
    names = set()
    for registry in (chief, worker):
        text = generate_latest(registry).decode()
        names |= {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    return names


def test_dashboard_and_alerts_use_only_exported_metrics():
    used = set(re.findall(r"\bskin_[a-z0-9_]+", DASHBOARD.read_text()))
    used |= set(re.findall(r"\bskin_[a-z0-9_]+", (MONITORING / "prometheusrule.yaml").read_text()))
    used = {u for u in used if u != "skin_search"}  # the dashboard's uid
    assert used, "no metrics found"
    missing = used - exported_names()
    assert not missing, f"not exported by the chief or a worker: {sorted(missing)}"
