"""An embedded GCS emulator (gcp-storage-emulator) for local runs and tests.

    with Emulator(bucket="skin-experiments") as emu:
        os.environ.update(emu.environ())      # STORAGE_EMULATOR_HOST
        Storage().write_text("gs://skin-experiments/x", "hi")

The server runs in a daemon thread of this process, in memory unless a
``data_dir`` is given. ``port=0`` takes a free port (``.endpoint`` then says
which). It is the same HTTP API the real google-cloud-storage client speaks,
so :class:`skin.storage.Storage` runs unchanged against it.

As a process of its own (``skin run`` and multi-process tests use this)::

    python -m skin.emulator --port 0 --bucket skin-experiments

prints the endpoint (``http://127.0.0.1:PORT``) as its first line of stdout
and serves until SIGTERM or SIGINT.

The emulator's HTTP server handles one request at a time (HTTP/1.0, a
connection per request); that is plenty for a handful of local processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0


class Emulator:
    """gcp-storage-emulator in a background thread; a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, bucket: str | None = None,
                 *, data_dir: str | Path | None = None, quiet: bool = True):
        self.host = host
        self.port = port
        self.bucket = bucket
        self.data_dir = Path(data_dir) if data_dir else None
        self._server = None
        if quiet:
            # The emulator logs every request at INFO; keep its warnings and errors.
            for name in ("gcp_storage_emulator", "api.object", "api.bucket"):
                logging.getLogger(name).setLevel(logging.WARNING)
            # ...and its "Resource not found" ERROR lines: a 404 is an answer, not a fault.
            logging.getLogger("gcp_storage_emulator.storage").setLevel(logging.CRITICAL)

    @property
    def endpoint(self) -> str:
        """``http://host:port`` (the value for ``STORAGE_EMULATOR_HOST``)."""
        if self._server is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    def environ(self) -> dict[str, str]:
        """The environment that points google-cloud-storage (and our Storage) here."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "Emulator":
        if self._server is not None:
            return self
        from gcp_storage_emulator.server import create_server

        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port:
            _check_port_free(self.host, self.port)
        server = create_server(self.host, self.port, in_memory=self.data_dir is None,
                               data_dir=str(self.data_dir) if self.data_dir else None)
        # Server.start() waits forever if the port cannot be bound (the thread dies before
        # it signals); start the API thread ourselves and watch it instead.
        api = server._api
        api.daemon = True
        api.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not api.is_running.wait(0.05):
            if not api.is_alive() or time.monotonic() > deadline:
                raise OSError(f"storage emulator could not start on {self.host}:{self.port} "
                              "(port in use?)")
        httpd = getattr(api, "_httpd", None)
        if httpd is None:  # pragma: no cover - a future emulator version
            server.stop()
            raise RuntimeError("unsupported gcp-storage-emulator version: no _httpd on its "
                               "API thread")
        self.port = httpd.server_address[1]
        self._server = server
        self._wait_ready(deadline)
        if self.bucket:
            self.ensure_bucket(self.bucket)
        log.info("storage emulator at %s", self.endpoint)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> "Emulator":
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

    def _wait_ready(self, deadline: float) -> None:
        while True:
            try:
                status, _ = self._request("GET", "/storage/v1/b?project=local", timeout=2.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise OSError(f"storage emulator at {self.endpoint} does not answer")
            time.sleep(0.05)

    def ensure_bucket(self, name: str) -> None:
        """Create the bucket unless it exists."""
        status, body = self._request("POST", "/storage/v1/b?project=local", {"name": name})
        if status not in (200, 409):
            raise RuntimeError(f"emulator: creating bucket {name!r} failed: HTTP {status} "
                               f"{body[:200]!r}")

    def buckets(self) -> list[str]:
        status, body = self._request("GET", "/storage/v1/b?project=local")
        if status != 200:
            raise RuntimeError(f"emulator: listing buckets failed: HTTP {status}")
        return sorted(b["name"] for b in json.loads(body or b"{}").get("items", []))


def _check_port_free(host: str, port: int) -> None:
    # The emulator binds inside its thread, where a failure only prints a traceback.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"storage emulator could not start on {host}:{port} "
                          f"({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m skin.emulator",
        description="Run a GCS emulator until SIGTERM; prints its endpoint first.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--bucket", action="append", default=[],
                        help="bucket to create (repeatable)")
    parser.add_argument("--data-dir", default=None, help="keep objects here (default: memory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Emulator(args.host, args.port, data_dir=args.data_dir) as emu:
        for bucket in args.bucket:
            emu.ensure_bucket(bucket)
        print(emu.endpoint, flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
