"""skin.infra.storage.Storage against the real emulator (gs://) and the local disk."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest

from conftest import free_port
from skin.errors import PreconditionFailedError, RetryableError
from skin.infra.emulator import Emulator
from skin.infra.storage import Storage, is_gcs, join


@pytest.fixture(params=["gs", "local"])
def root(request, tmp_path) -> str:
    """A folder URI on each backend: a fresh emulator bucket, or a temp dir."""
    if request.param == "gs":
        return "gs://" + request.getfixturevalue("bucket") + "/exp"
    return str(tmp_path / "root")


@pytest.mark.parametrize("uri, parts, expected", [
    ("gs://b", ("a", "b.txt"), "gs://b/a/b.txt"),
    ("gs://b/", ("/a/", "b"), "gs://b/a/b"),
    ("gs://b/p", (), "gs://b/p"),
    ("gs://b/p", ("", "x"), "gs://b/p/x"),
    ("/tmp/x", ("a", "b"), "/tmp/x/a/b"),
    ("rel", ("a",), "rel/a"),
])
def test_join(uri, parts, expected):
    assert join(uri, *parts) == expected


@pytest.mark.parametrize("uri, expected", [
    ("gs://b/k", True), ("/tmp/gs://x", False), ("gs:/b", False), ("data", False)])
def test_is_gcs(uri, expected):
    assert is_gcs(uri) is expected


def test_bytes_text_json_round_trip(storage, root):
    storage.write_bytes(join(root, "a.bin"), b"\x00\x01binary\xff")
    storage.write_text(join(root, "t/b.txt"), "héllo\n")
    storage.write_json(join(root, "t/c.json"), {"k": [1, 2.5, "x"], "n": None})
    assert storage.read_bytes(join(root, "a.bin")) == b"\x00\x01binary\xff"
    assert storage.read_text(join(root, "t/b.txt")) == "héllo\n"
    assert storage.read_json(join(root, "t/c.json")) == {"k": [1, 2.5, "x"], "n": None}
    storage.write_bytes(join(root, "a.bin"), b"replaced")
    assert storage.read_bytes(join(root, "a.bin")) == b"replaced"
    assert storage.exists(join(root, "a.bin"))
    assert not storage.exists(join(root, "nope.bin"))
    assert storage.stat(join(root, "t/b.txt")).size == len("héllo\n".encode())


def test_list_is_sorted_full_uris_below_a_folder(storage, root):
    for key in ("data/b", "data/a", "data/sub/c", "data2/x", "other"):
        storage.write_text(join(root, key), key)
    assert storage.list(join(root, "data")) == [
        join(root, "data/a"), join(root, "data/b"), join(root, "data/sub/c")]
    assert storage.list(join(root, "data") + "/") == storage.list(join(root, "data"))
    assert storage.list(join(root, "missing")) == []
    assert len(storage.list(root)) == 5


def test_delete_and_missing_objects(storage, root):
    uri = join(root, "x/y.txt")
    storage.write_text(uri, "1")
    storage.delete(uri)
    storage.delete(uri)  # missing is fine
    assert not storage.exists(uri)
    for call in (storage.read_bytes, storage.stat):
        with pytest.raises(FileNotFoundError, match=r"x/y\.txt: not found"):
            call(uri)
    with pytest.raises(FileNotFoundError, match="y.txt"):
        storage.download_file(uri, "/tmp/never-written")


def test_missing_bucket_is_not_found(storage, emulator):
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket-x/k"):
        storage.read_bytes("gs://no-such-bucket-x/k")
    assert storage.list("gs://no-such-bucket-x/k") == []
    assert not storage.exists("gs://no-such-bucket-x/k")


def test_upload_dir_download_dir_round_trip(storage, root, tmp_path):
    src = tmp_path / "src"
    files = {"a.txt": b"a", "sub/b.bin": os.urandom(3000), "sub/deeper/c": b"", "d e.txt": b"sp"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    sent = storage.upload_dir(src, join(root, "up"))
    assert sent == sum(len(d) for d in files.values())
    assert storage.list(join(root, "up")) == sorted(join(root, "up", r) for r in files)
    got = storage.download_dir(join(root, "up"), tmp_path / "dst")
    assert got == sent
    for rel, data in files.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data
    assert storage.delete_prefix(join(root, "up")) == len(files)
    assert storage.list(join(root, "up")) == []


def test_large_object_uses_resumable_upload(storage, bucket, tmp_path):
    # google-cloud-storage switches to a resumable upload above 8 MiB.
    data = os.urandom(9 * 1024 * 1024 + 17)
    (tmp_path / "big").write_bytes(data)
    uri = f"gs://{bucket}/big/blob"
    storage.upload_file(tmp_path / "big", uri)
    assert storage.stat(uri).size == len(data)
    assert storage.download_file(uri, tmp_path / "back") == len(data)
    assert (tmp_path / "back").read_bytes() == data
    storage.write_bytes(uri + "2", data)
    assert storage.read_bytes(uri + "2") == data


def test_local_writes_are_atomic_and_leave_no_temp_files(storage, tmp_path):
    target = tmp_path / "deep/dir/file.json"
    storage.write_json(str(target), {"a": 1})
    storage.write_json(str(target), {"a": 2})
    assert storage.read_json(str(target)) == {"a": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_threads_share_one_storage(storage, bucket):
    errors = []

    def work(t):
        try:
            for i in range(10):
                uri = f"gs://{bucket}/threads/{t}/{i}"
                storage.write_text(uri, f"{t}-{i}")
                assert storage.read_text(uri) == f"{t}-{i}"
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(storage.list(f"gs://{bucket}/threads")) == 60


def test_unreachable_storage_raises_retryable_error_naming_the_uri(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    dead = Storage(tries=3, backoff_s=0.01)
    with pytest.raises(RetryableError, match=r"gs://b/k: storage unavailable after 3 tries"):
        dead.read_bytes("gs://b/k")
    with pytest.raises(RetryableError, match="gs://b/k"):
        dead.write_text("gs://b/k", "x")


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards to the emulator, but answers the first ``failures`` object requests with an error.

    Only object requests (``/o/`` in the path) fail: the google client also fetches bucket
    metadata in a background thread, at a moment of its own choosing.
    """

    def __init__(self, upstream: str, failures: int, status: int):
        self.upstream, self.failures, self.status = upstream, failures, status
        self.seen = 0  # object requests
        self.lock = threading.Lock()
        self.failed_paths: list[str] = []  # requests answered with the error
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def _forward(self):
        srv: _FlakyProxy = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fail = False
        if "/o/" in self.path or "/o?" in self.path:  # an object request
            with srv.lock:
                srv.seen += 1
                fail = srv.seen <= srv.failures
        if fail:
            srv.failed_paths.append(self.path)
            self.send_response(srv.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host",)}
        req = urllib.request.Request(srv.upstream + self.path, data=body, method=self.command,
                                     headers=headers)
        try:
            resp = urllib.request.urlopen(req)
        except urllib.error.HTTPError as e:
            resp = e
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [503, 429, 500])
def test_transient_errors_are_retried(emulator, bucket, monkeypatch, status):
    Storage().write_text(f"gs://{bucket}/k", "value")
    proxy = _FlakyProxy(emulator.endpoint, failures=2, status=status)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.server_port}")
        flaky = Storage(tries=3, backoff_s=0.01)
        assert flaky.read_text(f"gs://{bucket}/k") == "value"
        assert len(proxy.failed_paths) == 2
        proxy.failures = proxy.seen + 5  # more failures than tries
        with pytest.raises(RetryableError, match=f"gs://{bucket}/k2"):
            flaky.write_text(f"gs://{bucket}/k2", "v")
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_4xx_is_not_retried(emulator, bucket, monkeypatch):
    Storage().write_text(f"gs://{bucket}/k", "value")
    proxy = _FlakyProxy(emulator.endpoint, failures=1, status=403)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.server_port}")
        with pytest.raises(Exception) as info:
            Storage(tries=3, backoff_s=0.01).read_text(f"gs://{bucket}/k")
        assert not isinstance(info.value, (RetryableError, FileNotFoundError))
        assert proxy.seen == 1 and len(proxy.failed_paths) == 1  # one try, no retries
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_emulator_context_manager_and_port_zero(tmp_path):
    with Emulator(bucket="ctx-bucket", data_dir=tmp_path / "gcs") as emu:
        assert emu.endpoint.startswith("http://127.0.0.1:")
        assert emu.port > 0
        assert "ctx-bucket" in emu.buckets()
        emu.ensure_bucket("ctx-bucket")  # idempotent
        with Emulator() as other:
            assert other.port != emu.port
    assert not emu.running
    with pytest.raises(RuntimeError, match="not running"):
        emu.endpoint  # noqa: B018 - reading the property raises


def test_emulator_refuses_a_busy_port():
    with Emulator() as emu:
        with pytest.raises(OSError, match="could not start"):
            Emulator(port=emu.port).start()


def test_emulator_as_a_process(monkeypatch):
    proc = subprocess.Popen(
        [sys.executable, "-m", "skin.infra.emulator", "--port", "0", "--bucket", "proc-bucket"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:"), proc.stderr.read()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        s = Storage()
        s.write_text("gs://proc-bucket/hello", "from another process")
        assert s.read_text("gs://proc-bucket/hello") == "from another process"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_emulator_keeps_its_bucket_in_data_dir_across_restarts(tmp_path, monkeypatch):
    with Emulator(bucket="kept", data_dir=tmp_path / "gcs") as emu:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.endpoint)
        Storage().write_text("gs://kept/a/b.json", "{}")
        generation = Storage().stat("gs://kept/a/b.json").version
    assert (tmp_path / "gcs" / "kept" / "a" / "b.json").read_text() == "{}"
    with Emulator(data_dir=tmp_path / "gcs") as emu:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.endpoint)
        assert emu.buckets() == ["kept"]
        assert Storage().read_text("gs://kept/a/b.json") == "{}"
        assert Storage().stat("gs://kept/a/b.json").version == generation


def test_skin_run_without_fake_gcs_server_says_how_to_start_one(tmp_path):
    """No binary for this platform (as on macOS): exit 2 with what to do instead."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SKIN_", "KERASTUNER_")) and k != "STORAGE_EMULATOR_HOST"}
    env["SKIN_FAKE_GCS_SERVER"] = str(tmp_path / "no-such-fake-gcs-server")
    proc = subprocess.run(
        [sys.executable, "-m", "skin.cli", "run", "--config", "skin/experiments/quickstart.yaml",
         "--out", str(tmp_path / "out"), "--metrics-port", "0"],
        env=env, capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no-such-fake-gcs-server" in proc.stderr
    assert "fsouza/fake-gcs-server" in proc.stderr
    assert "STORAGE_EMULATOR_HOST=http://127.0.0.1:4443" in proc.stderr
    assert not (tmp_path / "out" / "logs" / "stage.log").exists()  # nothing ran


# -- generation preconditions (the real server enforces them; so does the local backend) ------

def test_create_if_absent_and_conditional_replace(storage, root):
    uri = join(root, "lock.json")
    first = storage.write_text(uri, "one", if_generation_match=0)
    assert first > 0
    with pytest.raises(PreconditionFailedError, match="lock.json: precondition failed"):
        storage.write_text(uri, "two", if_generation_match=0)  # it exists now
    data, generation = storage.read_versioned(uri)
    assert (data, generation) == (b"one", first)
    second = storage.write_text(uri, "two", if_generation_match=first)
    assert second != first and storage.stat(uri).version == second
    with pytest.raises(PreconditionFailedError):  # a writer holding the old generation
        storage.write_text(uri, "stale", if_generation_match=first)
    assert storage.read_text(uri) == "two"
    third = storage.write_json(uri, {"n": 3})  # unconditional writes still replace
    assert storage.read_versioned(uri) == (b'{\n  "n": 3\n}\n', third)


def test_conditional_write_on_a_missing_object_fails_unless_create(storage, root):
    uri = join(root, "absent.json")
    with pytest.raises(PreconditionFailedError):
        storage.write_text(uri, "x", if_generation_match=12345)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_versioned(uri)


def test_only_one_of_many_racing_creators_wins(storage, root):
    """Eight threads create the same object at once: exactly one succeeds."""
    uri = join(root, "race.json")
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def create(i: int) -> None:
        barrier.wait()
        try:
            storage.write_text(uri, f"writer {i}", if_generation_match=0)
            outcomes.append(f"won {i}")
        except PreconditionFailedError:
            outcomes.append("lost")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 7
    assert storage.read_text(uri) == "writer " + winners[0].split()[1]
