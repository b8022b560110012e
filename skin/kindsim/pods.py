"""Pods from the rendered objects, as the Job controller and the kubelet would make them.

:class:`Cluster` holds the rendered overlay (``kubectl kustomize k8s/kind``)
and builds, for one Deployment replica or one Job completion index, the Pod
that ``podman kube play`` runs. The pod template is taken as it is; added is
only what a cluster adds:

- the Job controller: the pod name, the ``job-name`` and
  ``batch.kubernetes.io/job-completion-index`` labels and annotation;
- the kubelet: every container's environment resolved (Service links,
  ``KUBERNETES_SERVICE_HOST``/``PORT``, ``envFrom``, ``valueFrom`` with
  ``fieldRef``, ``configMapKeyRef``, ``secretKeyRef``, ``$(VAR)`` expansion in
  values, commands and arguments), and Secret, projected and service-account
  token volumes written out as files (podman 4.3's ``kube play`` reads
  Secrets from its own store, so they are bind-mounted read-only instead);
  ``emptyDir`` volumes are fresh host folders of mode 0777 as the kubelet
  makes them (podman's own copy the image's folder with its owner, which a
  cluster would not; ``sizeLimit`` and ``medium`` are not enforced);
- cluster DNS: each Service's names (``svc``, ``svc.ns``, ``svc.ns.svc``,
  ``svc.ns.svc.cluster.local``) as ``hostAliases`` to the fixed address of the
  pod its selector matches (a Service has no virtual IP here, so clients dial
  the pod's port: :meth:`Cluster.check_services` warns where the two differ).

ConfigMaps and their volumes, security contexts and resources are
left to ``kube play``; ``containerPort``s without a ``hostPort`` are dropped
from what it gets (informational in Kubernetes, published on the host by
podman 4.3).
"""

from __future__ import annotations

import base64
import copy
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from skin.errors import ConfigError

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
WORKLOADS = ("Job", "Deployment")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_INDEXED = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


class PodConfigError(Exception):
    """The kubelet could not create a container (CreateContainerConfigError / FailedMount)."""


def render(overlay: str | os.PathLike) -> str:
    """``kubectl kustomize OVERLAY``: the YAML a user's ``kubectl apply -k`` would send."""
    try:
        out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                             text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError("kubectl: not installed; expected kubectl (for kustomize) on PATH") \
            from None
    if out.returncode != 0:
        raise ConfigError(f"kubectl kustomize {overlay}: failed: {out.stderr.strip()}")
    return out.stdout


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names replaced, ``$$`` is ``$``, the rest kept."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(one, text)


def _env_name(service: str) -> str:
    return service.upper().replace("-", "_")


def _labels_match(selector: dict, labels: dict) -> bool:
    if "matchLabels" in selector or "matchExpressions" in selector:
        for key, value in (selector.get("matchLabels") or {}).items():
            if labels.get(key) != value:
                return False
        for expr in selector.get("matchExpressions") or []:
            key, op, values = expr["key"], expr["operator"], expr.get("values") or []
            if (op == "In" and labels.get(key) not in values) \
                    or (op == "NotIn" and labels.get(key) in values) \
                    or (op == "Exists" and key not in labels) \
                    or (op == "DoesNotExist" and key in labels):
                return False
        return True
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@dataclass
class Slot:
    """One pod's place: a Deployment replica or a Job's completion index, with a fixed address."""

    kind: str
    name: str  # the workload's name
    index: int | None
    ip: str

    @property
    def key(self) -> str:
        return self.name if self.index is None else f"{self.name}/{self.index}"


@dataclass
class BuiltPod:
    """A pod ready for ``podman kube play``: its document and the files its volumes need."""

    name: str
    slot: Slot
    doc: dict  # the Pod
    config_maps: list[dict]  # the ConfigMaps its configMap volumes name (played with it)
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # host path -> (data, mode)
    env: dict[str, dict[str, str]] = field(default_factory=dict)  # container -> resolved env
    dirs: dict[str, int] = field(default_factory=dict)  # host folder -> mode (volumes)


class Cluster:
    """The rendered objects of one namespace-scoped overlay, and the pods they make."""

    def __init__(self, yaml_text: str):
        self.objects = [d for d in yaml.safe_load_all(yaml_text) if isinstance(d, dict)]
        if not self.objects:
            raise ConfigError("the rendered manifests hold no objects")
        self.by_kind: dict[str, dict[str, dict]] = {}
        for obj in self.objects:
            self.by_kind.setdefault(obj.get("kind", ""), {})[obj["metadata"]["name"]] = obj
        self.workloads = [o for o in self.objects if o.get("kind") in WORKLOADS]
        if not self.workloads:
            raise ConfigError("the rendered manifests hold no Job or Deployment to run")
        self.slots: dict[str, Slot] = {}
        self.kube_api: tuple[str, int] = ("", 0)  # the fake API server: set by the simulator
        self.sa_dirs: dict[str, str] = {}  # ServiceAccount -> host folder with token, ca.crt

    # --- objects -------------------------------------------------------------------------

    def add_secret(self, name: str, data: dict[str, str]) -> None:
        """A Secret the user creates by hand before ``kubectl apply`` (in the workloads'
        namespace), e.g. ``kubectl create secret generic NAME --from-literal=KEY=VALUE``."""
        if self.get("Secret", name) is not None:
            raise ConfigError(f"Secret {name}: already in the rendered manifests")
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": name, "namespace": self.namespace(self.workloads[0])},
                  "stringData": dict(data)}
        self.objects.append(secret)
        self.by_kind.setdefault("Secret", {})[name] = secret

    def get(self, kind: str, name: str) -> dict | None:
        return self.by_kind.get(kind, {}).get(name)

    @staticmethod
    def namespace(obj: dict) -> str:
        return obj["metadata"].get("namespace", "default")

    def template_labels(self, workload: dict) -> dict:
        return workload["spec"]["template"].get("metadata", {}).get("labels") or {}

    def assign_addresses(self, subnet_base: str, first: int = 10) -> None:
        """A fixed address per pod slot, kept across restarts (a Service follows its pod)."""
        from skin.kindsim.jobs import completion_indexes
        host = first
        for w in self.workloads:
            if w["kind"] == "Deployment":
                indexes: list[int | None] = [None] * min(1, int(w["spec"].get("replicas", 1)))
            else:
                indexes = completion_indexes(w["spec"])
            for n, index in enumerate(indexes):
                slot_index = index if index is not None else (n if len(indexes) > 1 else None)
                slot = Slot(w["kind"], w["metadata"]["name"], slot_index, f"{subnet_base}.{host}")
                self.slots[slot.key] = slot
                host += 1

    def service_targets(self) -> dict[str, tuple[dict, Slot | None]]:
        """Each Service and the slot of the (first) pod its selector matches."""
        out = {}
        for svc in self.by_kind.get("Service", {}).values():
            selector = svc.get("spec", {}).get("selector") or {}
            target = None
            for w in self.workloads:
                if self.namespace(w) == self.namespace(svc) \
                        and _labels_match(selector, self.template_labels(w)):
                    target = next((s for s in self.slots.values()
                                   if s.name == w["metadata"]["name"] and s.kind == w["kind"]),
                                  None)
                    break
            out[svc["metadata"]["name"]] = (svc, target)
        return out

    def check_services(self) -> list[str]:
        """Warnings: Services that select no pod, or whose port differs from the pod's."""
        warnings = []
        for name, (svc, slot) in self.service_targets().items():
            if slot is None:
                warnings.append(f"Service {name}: its selector matches no pod template here")
                continue
            w = self.get(slot.kind, slot.name)
            for port in svc["spec"].get("ports") or []:
                target = self._container_port(w, port.get("targetPort", port["port"]))
                if target is not None and target != port["port"]:
                    warnings.append(
                        f"Service {name}: port {port['port']} -> {target}; kind-sim resolves the "
                        f"Service name to the pod, so clients must dial {target}")
        return warnings

    @staticmethod
    def _container_port(workload: dict, target) -> int | None:
        if isinstance(target, int):
            return target
        if isinstance(target, str) and target.isdigit():
            return int(target)
        for c in workload["spec"]["template"]["spec"].get("containers") or []:
            for p in c.get("ports") or []:
                if p.get("name") == target:
                    return int(p["containerPort"])
        return None

    def host_aliases(self) -> list[dict]:
        aliases = []
        for name, (svc, slot) in self.service_targets().items():
            if slot is None:
                continue
            ns = self.namespace(svc)
            aliases.append({"ip": slot.ip, "hostnames": [
                name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]})
        return aliases

    def service_env(self, namespace: str) -> dict[str, str]:
        """The kubelet's Service links (``enableServiceLinks``) for Services of ``namespace``."""
        env: dict[str, str] = {}
        for name, (svc, slot) in sorted(self.service_targets().items()):
            if slot is None or self.namespace(svc) != namespace:
                continue
            ports = svc["spec"].get("ports") or []
            if not ports:
                continue
            prefix = _env_name(name)
            env[f"{prefix}_SERVICE_HOST"] = slot.ip
            env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
            env[f"{prefix}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{slot.ip}:{ports[0]['port']}"
            for p in ports:
                proto = p.get("protocol", "TCP")
                if p.get("name"):
                    env[f"{prefix}_SERVICE_PORT_{_env_name(p['name'])}"] = str(p["port"])
                base = f"{prefix}_PORT_{p['port']}_{proto}"
                env[base] = f"{proto.lower()}://{slot.ip}:{p['port']}"
                env[f"{base}_PROTO"] = proto.lower()
                env[f"{base}_PORT"] = str(p["port"])
                env[f"{base}_ADDR"] = slot.ip
        return env

    # --- the pod ---------------------------------------------------------------------------

    def build_pod(self, slot: Slot, pod_name: str, run_label: str, volume_root: Path) -> BuiltPod:
        """The Pod for ``slot`` as the Job controller creates it and the kubelet starts it.

        Raises :class:`PodConfigError` where the kubelet would not start the pod (a missing
        ConfigMap, Secret or key that is not optional).
        """
        workload = self.get(slot.kind, slot.name)
        ns = self.namespace(workload)
        template = copy.deepcopy(workload["spec"]["template"])
        meta = template.setdefault("metadata", {})
        labels = meta.setdefault("labels", {})
        annotations = meta.setdefault("annotations", {})
        if slot.kind == "Job":
            labels["job-name"] = labels["batch.kubernetes.io/job-name"] = slot.name
            if slot.index is not None and workload["spec"].get("completionMode") == "Indexed":
                labels[INDEX_KEY] = annotations[INDEX_KEY] = str(slot.index)
        annotations["kindsim.skin/run"] = run_label
        spec = template["spec"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "namespace": ns, "labels": labels,
                            "annotations": annotations},
               "spec": spec}
        spec["hostAliases"] = [*(spec.get("hostAliases") or []), *self.host_aliases()]
        built = BuiltPod(pod_name, slot, pod, [])

        volumes = []
        for vol in spec.get("volumes") or []:
            volumes.append(self._volume(vol, built, ns, volume_root))
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            sa_obj = self.get("ServiceAccount", sa) or {}
            automount = sa_obj.get("automountServiceAccountToken", True)
        mounts_sa = bool(automount) and sa in self.sa_dirs
        if mounts_sa:
            volumes.append({"name": "kube-api-access",
                            "hostPath": {"path": self.sa_dirs[sa], "type": "Directory"}})
        spec["volumes"] = volumes
        spec.pop("serviceAccount", None)

        for c in [*(spec.get("initContainers") or []), *spec.get("containers", [])]:
            env = self.container_env(c, pod, ns, slot.ip)
            built.env[c["name"]] = env
            c["env"] = [{"name": k, "value": v} for k, v in env.items()]
            c.pop("envFrom", None)
            for key in ("command", "args"):
                if key in c:
                    c[key] = [expand(str(a), env) for a in c[key]]
            # containerPort is informational in Kubernetes (pods reach each other on any port);
            # podman 4.3's kube play would publish each one on the host's same port.
            ports = [p for p in c.get("ports") or [] if p.get("hostPort")]
            if ports:
                c["ports"] = ports
            else:
                c.pop("ports", None)
            if mounts_sa and not any(m["mountPath"] == SA_DIR for m in c.get("volumeMounts") or []):
                c.setdefault("volumeMounts", []).append(
                    {"name": "kube-api-access", "mountPath": SA_DIR, "readOnly": True})
        return built

    def _volume(self, vol: dict, built: BuiltPod, ns: str, volume_root: Path) -> dict:
        name = vol["name"]
        if "configMap" in vol:
            cm = self.get("ConfigMap", vol["configMap"]["name"])
            if cm is None:
                if vol["configMap"].get("optional"):
                    return {"name": name, "emptyDir": {}}
                raise PodConfigError(f"volume {name}: configmap {vol['configMap']['name']!r} "
                                     "not found")
            if cm not in built.config_maps:
                built.config_maps.append(cm)
            return vol
        if "secret" in vol or "projected" in vol:
            folder = volume_root / built.name / name
            sources = vol["projected"].get("sources", []) if "projected" in vol else \
                [{"secret": {**vol["secret"], "name": vol["secret"].get("secretName")}}]
            default_mode = (vol.get("projected") or vol.get("secret"))\
                .get("defaultMode", 0o644)
            for source in sources:
                for path, (data, mode) in self._source_files(source, name, default_mode).items():
                    built.files[str(folder / path)] = (data, mode)
            built.dirs[str(folder)] = 0o755
            return {"name": name, "hostPath": {"path": str(folder), "type": "Directory"}}
        if "emptyDir" in vol:
            # The kubelet's emptyDir: a fresh folder, mode 0777, whatever the image holds at
            # the mount point (podman's volumes copy the image's folder and its owner).
            folder = volume_root / built.name / name
            built.dirs[str(folder)] = 0o777
            return {"name": name, "hostPath": {"path": str(folder), "type": "Directory"}}
        if "hostPath" in vol or "persistentVolumeClaim" in vol:
            return vol
        raise PodConfigError(f"volume {name}: type {sorted(set(vol) - {'name'})} is not "
                             "simulated (configMap, secret, projected, emptyDir, hostPath are)")

    def _source_files(self, source: dict, volume: str, default_mode: int) \
            -> dict[str, tuple[bytes, int]]:
        if "secret" in source or "configMap" in source:
            kind = "Secret" if "secret" in source else "ConfigMap"
            ref = source.get("secret") or source.get("configMap")
            obj = self.get(kind, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    return {}
                raise PodConfigError(f"volume {volume}: {kind.lower()} {ref.get('name')!r} "
                                     "not found")
            data = self._object_data(obj)
            items = ref.get("items")
            if items is None:
                return {k: (v, default_mode) for k, v in data.items()}
            out = {}
            for item in items:
                if item["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise PodConfigError(f"volume {volume}: {kind.lower()} {ref['name']!r} has "
                                         f"no key {item['key']!r}")
                out[item["path"]] = (data[item["key"]], item.get("mode", default_mode))
            return out
        if "serviceAccountToken" in source:
            raise PodConfigError(f"volume {volume}: projected serviceAccountToken is not "
                                 "simulated (automountServiceAccountToken is)")
        raise PodConfigError(f"volume {volume}: projected source {sorted(source)} is not "
                             "simulated")

    @staticmethod
    def _object_data(obj: dict) -> dict[str, bytes]:
        data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        if obj["kind"] == "Secret":
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            data.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
        else:
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def container_env(self, container: dict, pod: dict, ns: str, pod_ip: str = "") \
            -> dict[str, str]:
        """The environment the kubelet gives ``container`` (in the order it builds it)."""
        env: dict[str, str] = {}
        if pod["spec"].get("enableServiceLinks", True):
            env.update(self.service_env(ns))
        host, port = self.kube_api
        if host:
            env.update(KUBERNETES_SERVICE_HOST=host, KUBERNETES_SERVICE_PORT=str(port),
                       KUBERNETES_SERVICE_PORT_HTTPS=str(port))
        for source in container.get("envFrom") or []:
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            ref = source.get("configMapRef") or source.get("secretRef")
            obj = self.get(kind, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise PodConfigError(f"envFrom: {kind.lower()} {ref['name']!r} not found")
            for key, value in self._object_data(obj).items():
                env[source.get("prefix", "") + key] = value.decode()
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" in var:
                value = self._value_from(var["valueFrom"], pod, name, pod_ip)
                if value is None:
                    continue
                env[name] = value
            else:
                env[name] = expand(str(var.get("value", "")), env)
        return env

    def _value_from(self, source: dict, pod: dict, name: str, pod_ip: str) -> str | None:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            meta = pod["metadata"]
            simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                      "metadata.uid": meta["name"],
                      "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
                      "spec.nodeName": "kind-sim", "status.hostIP": self.kube_api[0],
                      "status.podIP": pod_ip, "status.podIPs": pod_ip}
            if path in simple:
                return simple[path]
            m = _FIELD_INDEXED.match(path)
            if m:
                return (meta.get(m.group(1)) or {}).get(m.group(2), "")
            raise PodConfigError(f"env {name}: fieldRef {path!r} is not supported")
        for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            if key in source:
                ref = source[key]
                obj = self.get(kind, ref.get("name", ""))
                data = self._object_data(obj) if obj else None
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    what = f"{kind.lower()} {ref.get('name')!r}"
                    raise PodConfigError(f"env {name}: {what} not found" if data is None else
                                         f"env {name}: {what} has no key {ref['key']!r}")
                return data[ref["key"]].decode()
        raise PodConfigError(f"env {name}: valueFrom {sorted(source)} is not supported")


def play_yaml(built: BuiltPod) -> str:
    """The document stream ``podman kube play`` gets: the pod's ConfigMaps, then the Pod."""
    return yaml.safe_dump_all([*built.config_maps, built.doc], sort_keys=False)
