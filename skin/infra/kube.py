"""The one thing skin asks of the Kubernetes API: start the suspended retrain Job.

k8s/tuning creates the retrain Job with ``suspend: true`` so that it holds no
GPU while the search runs; when the search ends the chief calls
:func:`unsuspend_job` with ``SKIN_RETRAIN_JOB`` and its own namespace. The
chief's ServiceAccount may get and patch that one Job and nothing else
(k8s/base/rbac).

Failures are typed by what the caller should do about them:

- :class:`~skin.errors.ConfigError` (exit 2, the Job fails): no cluster
  credentials, the Job does not exist (404), or the ServiceAccount may not
  touch it (401/403). Running again would not help.
- :class:`~skin.errors.RetryableError` (exit 75, the pod is retried): the API
  server is unreachable, overloaded (429) or failing (5xx). A restarted chief
  resumes its finished search and tries again; un-suspending is idempotent.
"""

from __future__ import annotations

import logging
import os
import time

import urllib3
from kubernetes import client, config

from skin.errors import ConfigError, RetryableError

log = logging.getLogger(__name__)

# Statuses a later attempt may get past; every other 4xx is a fault of ours or of the manifests.
_RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


def unsuspend_patch() -> dict:
    """The patch body that starts a suspended Job (a strategic merge patch on ``spec``)."""
    return {"spec": {"suspend": False}}


def api_client() -> client.ApiClient:
    """A client for the cluster this process runs in, else the current kubeconfig context."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        source = "in-cluster service account"
    except config.ConfigException:
        try:
            # KUBECONFIG is read now, as kubectl does (the library reads it once, at import).
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                    client_configuration=configuration)
            source = "kubeconfig"
        except (config.ConfigException, OSError) as e:
            raise ConfigError(
                "Kubernetes API: no credentials; expected to run in a pod with a service account "
                f"token, or a kubeconfig (KUBECONFIG or ~/.kube/config): {e}") from None
    log.debug("Kubernetes API at %s (%s)", configuration.host, source)
    return client.ApiClient(configuration)


def unsuspend_job(namespace: str, name: str, *, api: client.ApiClient | None = None,
                  attempts: int = 3, backoff_s: float = 2.0, timeout_s: float = 30.0) -> bool:
    """Start the suspended Job ``namespace/name``; ``True`` if it was suspended until now.

    Idempotent: a Job that already runs (or has finished) is left as it is. ``api`` is
    the client to use (default: :func:`api_client`). Transient failures are retried
    ``attempts`` times with exponential backoff before :class:`RetryableError`.
    """
    if not namespace:
        raise ConfigError("SKIN_NAMESPACE/POD_NAMESPACE: not set; expected the namespace of the "
                          f"retrain Job {name!r} (the downward API's metadata.namespace)")
    if not name:
        raise ConfigError("SKIN_RETRAIN_JOB: not set; expected the name of the suspended "
                          "retrain Job")
    batch = client.BatchV1Api(api if api is not None else api_client())
    where = f"Job {namespace}/{name}"

    def call(what: str, fn, *args):
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, _request_timeout=timeout_s)
            except client.ApiException as e:
                if e.status == 404:
                    raise ConfigError(
                        f"{where}: not found; expected SKIN_RETRAIN_JOB to name the suspended "
                        "retrain Job in the chief's namespace (kubectl apply -k k8s/tuning "
                        "creates it)") from None
                if e.status in (401, 403):
                    raise ConfigError(
                        f"{where}: the API refused to {what} it (HTTP {e.status} {e.reason}); "
                        "expected the chief's ServiceAccount to hold a Role granting get and "
                        f"patch on jobs/{name}") from None
                if e.status not in _RETRYABLE_STATUSES:
                    raise ConfigError(f"{where}: the API rejected {what} (HTTP {e.status} "
                                      f"{e.reason}): {str(e.body or '')[:300]}") from None
                error = f"HTTP {e.status} {e.reason}"
            except (urllib3.exceptions.HTTPError, OSError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt == attempts:
                raise RetryableError(f"{where}: {what} failed {attempts} times ({error})")
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("%s: %s failed (%s); retrying in %.1f s", where, what, error, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    job = call("get", batch.read_namespaced_job, name, namespace)
    if not job.spec.suspend:
        log.info("%s is not suspended (already started); leaving it as it is", where)
        return False
    call("patch", batch.patch_namespaced_job, name, namespace, unsuspend_patch())
    log.info("%s un-suspended: the retrain starts", where)
    return True
