"""Setting up and tearing down a kind-sim cluster: the podman network, the pods' addresses,
the fake Kubernetes API over TLS with a token per ServiceAccount; and the one ``podman`` call.

:class:`NetworkSetup` is a part of :class:`skin.kindsim.simulator.Simulator` (it uses the
simulator's ``cluster``, ``opts``, ``network``, ``env``, ``pods``, ``lock`` and ``events``).
"""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
import subprocess

from skin.kindsim.apiserver import FakeKubeAPI, Rbac
from skin.kindsim.pods import Cluster


def podman(*args: str, timeout: float = 120, check: bool = False, env=None) \
        -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          check=check, env=env)


class NetworkSetup:
    """The simulator's setup and teardown."""

    def _setup(self) -> None:
        for w in self.cluster.workloads:
            for c in w["spec"]["template"]["spec"].get("containers", []):
                if c.get("image") and not podman("image", "exists", self._image(c["image"]),
                                                 env=self.env).returncode == 0:
                    raise RuntimeError(
                        f"{w['kind']} {w['metadata']['name']}: image {self._image(c['image'])} "
                        "is not in podman's store (make images, or --image FROM=TO)")
        out = podman("network", "create", self.network, env=self.env)
        if out.returncode != 0:
            raise RuntimeError(f"podman network create: {out.stderr.strip()}")
        info = json.loads(podman("network", "inspect", self.network, env=self.env).stdout)[0]
        subnet = info["subnets"][0]
        gateway = subnet["gateway"]
        self.cluster.assign_addresses(subnet["subnet"].split("/")[0].rsplit(".", 1)[0])
        for warning in self.cluster.check_services():
            self.say(f"WARNING {warning}")
        self._start_api(gateway)
        self.say(f"network {self.network} ({subnet['subnet']}); Kubernetes API at "
                 f"https://{gateway}:{self.cluster.kube_api[1]}; pods: " + ", ".join(
                     f"{s.key}={s.ip}" for s in self.cluster.slots.values()))
        for name, (svc, slot) in self.cluster.service_targets().items():
            for port in svc["spec"].get("ports") or []:
                if slot is not None and port.get("name") == "metrics":
                    self.say(f"Service {name} metrics: http://{slot.ip}:{port['port']}/metrics "
                             f"(skin status --address {slot.ip}:{port['port']} --watch)")

    def _start_api(self, gateway: str) -> None:
        """The fake API over TLS, and a service account token folder per ServiceAccount."""
        tls = self.opts.out / "apiserver"
        shutil.rmtree(tls, ignore_errors=True)
        tls.mkdir()
        key, cert = tls / "tls.key", tls / "ca.crt"
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=kubernetes", "-keyout", str(key), "-out", str(cert),
             "-addext", f"subjectAltName=IP:{gateway},DNS:kubernetes.default.svc"],
            capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            raise RuntimeError(f"openssl: cannot make the API server's certificate: "
                               f"{made.stderr.strip()}")
        tokens = {}
        accounts = {(Cluster.namespace(sa), sa["metadata"]["name"])
                    for sa in self.cluster.by_kind.get("ServiceAccount", {}).values()}
        # Every namespace has its ServiceAccount "default".
        accounts |= {(Cluster.namespace(w), "default") for w in self.cluster.workloads}
        for ns, name in sorted(accounts):
            token = secrets.token_urlsafe(32)
            tokens[token] = (ns, name)
            folder = tls / f"sa-{name}"
            folder.mkdir()
            (folder / "token").write_text(token)
            (folder / "namespace").write_text(ns)
            shutil.copy(cert, folder / "ca.crt")
            for f in folder.iterdir():
                f.chmod(0o644)
            folder.chmod(0o755)
            self.cluster.sa_dirs[name] = str(folder)
        tls.chmod(0o755)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        api_log = self._api_log = open(self.opts.out / "apiserver.log", "w")
        jobs = [w for w in self.cluster.workloads if w["kind"] == "Job"]
        self.api = FakeKubeAPI(
            jobs, tokens=tokens, rbac=Rbac(self.cluster.objects),
            on_unsuspend=lambda ns, name: self.events.put(("unsuspend", name)),
            log=lambda line: (api_log.write(line + "\n"), api_log.flush(),
                              self.say(f"API {line[:160]}")))
        # On every address: the bridge's gateway appears only with the first container.
        port = self.api.serve("0.0.0.0", 0, context)
        self.cluster.kube_api = (gateway, port)

    def _teardown(self) -> None:
        if self.api is not None:
            self.api.close()
            self._api_log.close()
        if self.opts.keep:
            self.say(f"--keep: pods and network {self.network} left in place "
                     f"(podman pod ps; podman network rm -f {self.network})")
            return
        with self.lock:
            names = [p.name for p in self.pods.values()]
        for name in names:
            self._save_logs(name)
            self._remove_pod(name)
        podman("network", "rm", "-f", self.network, env=self.env)

    def _remove_pod(self, name: str) -> None:
        """The pod, and its volumes with it (an emptyDir lives as long as its pod)."""
        podman("pod", "rm", "-f", "-t", "0", name, env=self.env)
        shutil.rmtree(self.opts.out / "volumes" / name, ignore_errors=True)
