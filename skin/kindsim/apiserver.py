"""Just enough of the Kubernetes API for the chief: GET and PATCH of a Job.

The chief un-suspends the retrain Job when the search ends (:mod:`skin.infra.kube`):
a GET of ``/apis/batch/v1/namespaces/NS/jobs/NAME``, then a PATCH
``{"spec": {"suspend": false}}``. This server answers those two calls for the
Jobs it holds, authenticates the bearer token (the service account token the
simulator mounts, as the kubelet does) and authorises the call with the rules
of the rendered Roles and RoleBindings (verbs, resources, resourceNames), so a
chief whose Role lacks ``patch`` gets the 403 a cluster would give it.
Everything else is 404. Every request is printed as one JSON line
``[method, path, content-type, body, status]``.

Used by ``make kind-sim`` (HTTPS, in-process, a callback per un-suspended
Job) and by ``make image-test`` (``python -m skin.kindsim.apiserver --job
NS/NAME``: plain HTTP, any token, the Job created suspended).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import ssl
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_JOB_PATH = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+)$")
_VERBS = {"GET": "get", "PATCH": "patch"}


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 merge patch (what a strategic merge patch of scalar fields amounts to)."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out


class Rbac:
    """Roles and RoleBindings (and the cluster-wide kinds) of the rendered objects."""

    def __init__(self, objects: list[dict]):
        self.objects = objects

    def allows(self, namespace: str, account: str, verb: str, group: str, resource: str,
               name: str) -> bool:
        roles = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
                 for o in self.objects if o.get("kind") in ("Role", "ClusterRole")}
        for binding in self.objects:
            if binding.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            bns = binding["metadata"].get("namespace", "")
            if binding["kind"] == "RoleBinding" and bns != namespace:
                continue
            if not any(s.get("kind") == "ServiceAccount" and s.get("name") == account
                       and s.get("namespace", bns) == namespace
                       for s in binding.get("subjects") or []):
                continue
            ref = binding["roleRef"]
            role = roles.get((ref["kind"], bns if ref["kind"] == "Role" else "", ref["name"]))
            for rule in (role or {}).get("rules") or []:
                if (_has(rule.get("apiGroups"), group) and _has(rule.get("resources"), resource)
                        and _has(rule.get("verbs"), verb)
                        and (not rule.get("resourceNames") or name in rule["resourceNames"])):
                    return True
        return False


def _has(values, wanted: str) -> bool:
    return bool(values) and ("*" in values or wanted in values)


class FakeKubeAPI:
    """The Jobs of the rendered objects behind GET and PATCH, with tokens and RBAC."""

    def __init__(self, jobs: list[dict], *, tokens: dict[str, tuple[str, str]] | None = None,
                 rbac: Rbac | None = None, on_unsuspend: Callable[[str, str], None] | None = None,
                 log: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.jobs = {(j["metadata"].get("namespace", "default"), j["metadata"]["name"]):
                     copy.deepcopy(j) for j in jobs}
        self.tokens = tokens  # token -> (namespace, service account); None: no authentication
        self.rbac = rbac
        self.on_unsuspend = on_unsuspend
        self.log = log
        self.requests: list[list] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def handle(self, method: str, path: str, headers, body) -> tuple[int, dict]:
        m = _JOB_PATH.match(path)
        if m is None:
            return 404, _status(404, "NotFound", f"{path} is not served by kind-sim")
        namespace, name = m.groups()
        if self.tokens is not None:
            auth = headers.get("Authorization") or ""
            scheme, _, token = auth.partition(" ")
            who = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            if who is None:
                return 401, _status(401, "Unauthorized", "Unauthorized")
            sa_namespace, account = who
            if self.rbac is not None and (sa_namespace != namespace or not self.rbac.allows(
                    namespace, account, _VERBS[method], "batch", "jobs", name)):
                return 403, _status(403, "Forbidden", (
                    f'jobs.batch "{name}" is forbidden: User "system:serviceaccount:'
                    f'{sa_namespace}:{account}" cannot {_VERBS[method]} resource "jobs" in API '
                    f'group "batch" in the namespace "{namespace}"'))
        with self.lock:
            job = self.jobs.get((namespace, name))
            if job is None:
                return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
            if method == "PATCH":
                if not isinstance(body, dict):
                    return 400, _status(400, "BadRequest", "expected a JSON object")
                was_suspended = bool(job["spec"].get("suspend"))
                job = self.jobs[(namespace, name)] = merge_patch(job, body)
                if was_suspended and not job["spec"].get("suspend") and self.on_unsuspend:
                    self.on_unsuspend(namespace, name)
            return 200, job

    def serve(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Serve in a background thread; returns the port."""
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _one(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                path = self.path.split("?")[0]
                status, doc = api.handle(method, path, self.headers, body)
                line = [method, path, self.headers.get("Content-Type"), body, status]
                with api.lock:
                    api.requests.append(line)
                api.log(json.dumps(line))
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._one("GET")

            def do_PATCH(self):
                self._one("PATCH")

        self.server = ThreadingHTTPServer((host, port), Handler)
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True,
                         name="kindsim-apiserver").start()
        return self.server.server_address[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m skin.kindsim.apiserver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--job", action="append", required=True, metavar="NS/NAME",
                   help="a Job to serve, created suspended (repeatable)")
    args = p.parse_args(argv)
    jobs = []
    for ref in args.job:
        namespace, _, name = ref.partition("/")
        jobs.append({"apiVersion": "batch/v1", "kind": "Job",
                     "metadata": {"name": name, "namespace": namespace},
                     "spec": {"suspend": True, "template": {"spec": {
                         "restartPolicy": "Never",
                         "containers": [{"name": name, "image": "skin"}]}}}})
    api = FakeKubeAPI(jobs)
    api.serve(args.host, args.port)
    print("listening", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
