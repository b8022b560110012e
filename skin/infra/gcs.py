"""google-cloud-storage for :class:`skin.infra.storage.Storage`: the client, and the retry and
error policy every bucket call runs under.

- a missing object (404) is a :class:`FileNotFoundError` naming the URI;
- a failed precondition (412) is a :class:`skin.errors.PreconditionFailedError`, never
  retried;
- transient failures (HTTP 5xx except 501, 429, connection errors, timeouts, a checksum
  mismatch on download) are retried with jittered exponential backoff, then raised as
  :class:`skin.errors.RetryableError` naming the URI (the role exits 75);
- anything else is raised as it is.

The google library is imported on first use, so ``import skin.infra.storage`` stays light.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from skin.errors import ConfigError, PreconditionFailedError, RetryableError

log = logging.getLogger("skin.storage")

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"  # google-cloud-storage's own variable
_T = TypeVar("_T")
_RETRYABLE: tuple[type[BaseException], ...] | None = None


def make_client():
    """A google-cloud-storage client: anonymous, project ``local``, with an emulator
    (``STORAGE_EMULATOR_HOST``); else the default credentials (none: ConfigError)."""
    from google.cloud import storage as gcs

    if os.environ.get(EMULATOR_ENV):
        from google.auth.credentials import AnonymousCredentials

        return gcs.Client(project="local", credentials=AnonymousCredentials())
    import google.auth.exceptions

    try:
        return gcs.Client()
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise ConfigError(
            f"gs:// storage: no Google credentials found ({e}); set "
            "GOOGLE_APPLICATION_CREDENTIALS, run on GKE with workload identity, or set "
            f"{EMULATOR_ENV} for an emulator") from None


def call(uri: str, what: str, fn: Callable[[], _T], *, tries: int, backoff_s: float,
         generation: int | None = None) -> _T:
    """Run one bucket operation ``fn`` (``what`` on ``uri``) with retries; map its errors
    to our types (module docstring). ``generation``: the precondition, for the error."""
    global _RETRYABLE
    from google.api_core import exceptions as gexc

    if _RETRYABLE is None:
        _RETRYABLE = _retryable_exceptions()
    delay = backoff_s
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except gexc.NotFound:
            raise FileNotFoundError(f"{uri}: not found") from None
        except gexc.PreconditionFailed:
            raise PreconditionFailedError(uri, generation) from None
        except Exception as e:  # classified below, re-raised otherwise
            status = _invalid_response_status(e)
            if status == 404:
                raise FileNotFoundError(f"{uri}: not found") from None
            if status == 412:
                raise PreconditionFailedError(uri, generation) from None
            transient = isinstance(e, _RETRYABLE) or (
                status is not None and (status == 429 or (status >= 500 and status != 501)))
            if not transient:
                raise
            if attempt == tries:
                raise RetryableError(
                    f"{what} {uri}: storage unavailable after {tries} tries "
                    f"({type(e).__name__}: {short(e)})") from e
            sleep = delay * (1 + random.random() * 0.5)
            log.warning("%s %s failed (%s: %s); retry %d/%d in %.2fs", what, uri,
                        type(e).__name__, short(e), attempt, tries - 1, sleep)
            time.sleep(sleep)
            delay *= 2
    raise AssertionError("unreachable")


def _retryable_exceptions() -> tuple[type[BaseException], ...]:
    import requests
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc
    from google.cloud.storage.exceptions import DataCorruption

    return (
        DataCorruption,  # checksum mismatch on download: fetch again
        gexc.InternalServerError, gexc.BadGateway, gexc.ServiceUnavailable,
        gexc.GatewayTimeout, gexc.TooManyRequests, gexc.Unknown,
        requests.exceptions.ConnectionError, requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
        auth_exc.TransportError, ConnectionError, TimeoutError,
    )


def _invalid_response_status(exc: BaseException) -> int | None:
    """HTTP status of a google-cloud-storage media ``InvalidResponse``, else None."""
    from google.cloud.storage.exceptions import InvalidResponse

    if isinstance(exc, InvalidResponse):
        response = getattr(exc, "response", None)
        return getattr(response, "status_code", None)
    return None


def short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
