"""skin.infra.kube against a loopback HTTP server that speaks just enough of the Kubernetes API.

The real kubernetes client sends real requests; the server answers GET and
PATCH of one Job, or a status the test chooses, and records what it got.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from kubernetes import client

from skin.errors import EXIT_CONFIG, EXIT_RETRYABLE, ConfigError, RetryableError, exit_code_for
from skin.infra.kube import api_client, unsuspend_job, unsuspend_patch

NAMESPACE, NAME = "skin", "skin-retrain"
JOB_PATH = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{NAME}"


def job_doc(suspend: bool) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {"suspend": suspend, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "retrain", "image": "skin"}]}}},
    }


class FakeJobAPI:
    """One Job at JOB_PATH; `failures` is a list of HTTP statuses to answer first."""

    def __init__(self, suspend: bool = True, failures: list[int] | None = None):
        self.suspend = suspend
        self.failures = list(failures or [])
        self.requests: list[tuple[str, str, str, object]] = []  # method, path, content-type, body
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                api.requests.append((method, self.path.split("?")[0],
                                     self.headers.get("Content-Type", ""), body))
                if api.failures:
                    status = api.failures.pop(0)
                    self._answer(status, {"kind": "Status", "apiVersion": "v1",
                                          "status": "Failure", "code": status})
                    return
                if self.path.split("?")[0] != JOB_PATH:
                    self._answer(404, {"kind": "Status", "apiVersion": "v1", "code": 404,
                                       "status": "Failure", "reason": "NotFound"})
                    return
                if method == "PATCH":
                    api.suspend = body["spec"]["suspend"]
                self._answer(200, job_doc(api.suspend))

            def do_GET(self):
                self._handle("GET")

            def do_PATCH(self):
                self._handle("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeJobAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def client(self) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    @property
    def methods(self) -> list[str]:
        return [r[0] for r in self.requests]


def test_the_patch_only_clears_suspend():
    assert unsuspend_patch() == {"spec": {"suspend": False}}


def test_a_suspended_job_is_patched_once_with_a_strategic_merge_patch():
    with FakeJobAPI(suspend=True) as api:
        assert unsuspend_job(NAMESPACE, NAME, api=api.client()) is True
    assert api.methods == ["GET", "PATCH"]
    method, path, content_type, body = api.requests[1]
    assert path == JOB_PATH
    assert content_type.startswith("application/strategic-merge-patch+json")
    assert body == unsuspend_patch()
    assert api.suspend is False


def test_a_running_job_is_left_alone():
    # A restarted chief calls again after the search ended: nothing to do, no patch.
    with FakeJobAPI(suspend=False) as api:
        assert unsuspend_job(NAMESPACE, NAME, api=api.client()) is False
    assert api.methods == ["GET"]


@pytest.mark.parametrize("status, match", [
    (404, "not found; expected SKIN_RETRAIN_JOB"),
    (403, "Role granting get and patch on jobs/skin-retrain"),
    (401, "refused"),
    (422, "rejected"),
])
def test_client_side_failures_are_config_errors(status, match):
    with FakeJobAPI(failures=[status]) as api:
        with pytest.raises(ConfigError, match=match) as err:
            unsuspend_job(NAMESPACE, NAME, api=api.client(), backoff_s=0)
    assert exit_code_for(err.value) == EXIT_CONFIG
    assert api.methods == ["GET"]  # never retried


def test_a_missing_job_is_a_config_error_naming_it():
    with FakeJobAPI() as api:
        with pytest.raises(ConfigError, match="Job skin/other: not found"):
            unsuspend_job(NAMESPACE, "other", api=api.client())


def test_transient_server_errors_are_retried():
    with FakeJobAPI(suspend=True, failures=[503, 429]) as api:
        assert unsuspend_job(NAMESPACE, NAME, api=api.client(), attempts=3, backoff_s=0) is True
    assert api.methods == ["GET", "GET", "GET", "PATCH"]


def test_a_server_that_keeps_failing_is_retryable():
    with FakeJobAPI(failures=[500] * 5) as api:
        with pytest.raises(RetryableError, match="get failed 2 times") as err:
            unsuspend_job(NAMESPACE, NAME, api=api.client(), attempts=2, backoff_s=0)
    assert exit_code_for(err.value) == EXIT_RETRYABLE
    assert len(api.requests) == 2


def test_an_unreachable_api_server_is_retryable():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = 0
    with pytest.raises(RetryableError, match="Job skin/skin-retrain: get failed 2 times"):
        unsuspend_job(NAMESPACE, NAME, api=client.ApiClient(configuration), attempts=2,
                      backoff_s=0, timeout_s=5)


def test_missing_namespace_or_name_is_a_config_error():
    with pytest.raises(ConfigError, match="POD_NAMESPACE"):
        unsuspend_job("", NAME, api=client.ApiClient())
    with pytest.raises(ConfigError, match="SKIN_RETRAIN_JOB"):
        unsuspend_job(NAMESPACE, "", api=client.ApiClient())


@pytest.fixture
def outside_a_cluster(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)


def test_without_credentials_the_client_is_a_config_error(outside_a_cluster, monkeypatch,
                                                           tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no credentials"):
        api_client()


def test_the_default_client_reads_the_kubeconfig(outside_a_cluster, monkeypatch, tmp_path):
    with FakeJobAPI(suspend=True) as api:
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
            "users": [{"name": "fake", "user": {"token": "t0ken"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        assert unsuspend_job(NAMESPACE, NAME) is True
    assert api.methods == ["GET", "PATCH"]
