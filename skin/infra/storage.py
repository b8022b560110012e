"""One small storage API over ``gs://`` buckets and local paths.

Everything this project shares between processes and pods goes through
:class:`Storage`: ``gs://bucket/key`` URIs use the real google-cloud-storage
client (anonymous credentials and project ``local`` when
``STORAGE_EMULATOR_HOST`` points at an emulator), anything else is a local
path. ``tf.io.gfile`` is deliberately not used for bucket I/O: it ignores
``STORAGE_EMULATOR_HOST``.

Errors are typed by intent:

- a missing object is a :class:`FileNotFoundError` naming the URI;
- a conditional write (``if_generation_match``: the generation the writer last
  saw, 0 = only if absent) that finds the object changed is a
  :class:`skin.errors.PreconditionFailedError` (HTTP 412), never retried;
- transient failures (HTTP 5xx except 501, 429, connection errors, timeouts)
  are retried a few times with exponential backoff and then raised as
  :class:`skin.errors.RetryableError` naming the URI, so a role exits 75 and
  Kubernetes retries the pod.

Generations: every write returns the object's new generation (GCS's
``generation``; locally the file's ``st_mtime_ns``, made to grow on every
conditional write, the check and the rename done under an ``flock`` of the
folder, which is atomic between the processes of one machine). A conditional
write retried after a lost answer may fail its precondition against its own
first try: callers treat a failed precondition as "someone else wrote", which
is the safe reading.

The retry and error policy is :mod:`skin.infra.gcs`'s. The google library's own retry
policy is switched off on every call (``retry=None``): its default retries for up to two minutes, which would hide
an unreachable bucket far longer than a pod's restart would.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from skin.errors import PreconditionFailedError
from skin.infra import gcs

log = logging.getLogger(__name__)

GS = "gs://"
_T = TypeVar("_T")

# (connect, read) seconds per HTTP request; long enough for a 100 MB shard on a slow link.
_TIMEOUT = (10.0, 120.0)
# Parallel transfers in upload_dir/download_dir (below requests' pool size of 10).
_TRANSFER_THREADS = 8


def is_gcs(uri: str | os.PathLike) -> bool:
    """True for ``gs://`` URIs."""
    return isinstance(uri, str) and uri.startswith(GS)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a ``gs://`` URI or a local path (``/`` separated for gs)."""
    if is_gcs(uri):
        out = str(uri).rstrip("/")
        for part in parts:
            part = str(part).strip("/")
            if part:
                out += "/" + part
        return out
    return os.path.join(os.fspath(uri), *(str(p) for p in parts))


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_gcs(uri):
        raise ValueError(f"{uri!r} is not a gs:// URI")
    bucket, _, key = uri[len(GS):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket name")
    return bucket, key


@dataclass(frozen=True)
class ObjectInfo:
    """Size and version of one object (``version``: GCS generation, or mtime_ns locally)."""

    uri: str
    size: int
    version: int


class Storage:
    """Bytes, text, JSON, files and folders on ``gs://`` or local paths.

    One instance per process; safe to share between threads (one lazily
    created google client, which is thread-safe for these calls).
    """

    def __init__(self, *, tries: int = 4, backoff_s: float = 0.25, client: Any = None):
        if tries < 1:
            raise ValueError("tries must be >= 1")
        self.tries = tries
        self.backoff_s = backoff_s
        self._client = client
        self._lock = threading.Lock()

    # -- client and retries -------------------------------------------------

    @property
    def client(self):
        """The google-cloud-storage client, created on first use."""
        with self._lock:
            if self._client is None:
                self._client = gcs.make_client()
            return self._client

    def _call(self, uri: str, what: str, fn: Callable[[], _T],
              generation: int | None = None) -> _T:
        """Run one bucket operation under skin.infra.gcs's retry and error policy."""
        return gcs.call(uri, what, fn, tries=self.tries, backoff_s=self.backoff_s,
                        generation=generation)

    def _blob(self, uri: str):
        bucket, key = split_gcs(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"{uri!r} names no object (empty key or trailing '/')")
        return self.client.bucket(bucket).blob(key)

    # -- bytes --------------------------------------------------------------

    def read_bytes(self, uri: str | os.PathLike) -> bytes:
        """The object's content; :class:`FileNotFoundError` when missing."""
        uri = _norm(uri)
        if is_gcs(uri):
            blob = self._blob(uri)
            return self._call(uri, "read", lambda: blob.download_as_bytes(
                retry=None, timeout=_TIMEOUT))
        try:
            return Path(uri).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{uri}: not found") from None

    def read_versioned(self, uri: str | os.PathLike) -> tuple[bytes, int]:
        """The object's content and the generation that content is (for a conditional write
        back); :class:`FileNotFoundError` when missing."""
        uri = _norm(uri)
        if is_gcs(uri):
            blob = self._blob(uri)
            data = self._call(uri, "read", lambda: blob.download_as_bytes(
                retry=None, timeout=_TIMEOUT))
            return data, int(blob.generation or 0)
        path = Path(uri)
        with _folder_lock(path.parent, shared=True):
            try:
                return path.read_bytes(), path.stat().st_mtime_ns
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise FileNotFoundError(f"{uri}: not found") from None

    def write_bytes(self, uri: str | os.PathLike, data: bytes, *,
                    if_generation_match: int | None = None) -> int:
        """Write (replace) the object; its new generation. Local writes are atomic (temp
        file + rename).

        ``if_generation_match``: write only if the object is at that generation (0: only if
        it does not exist), else :class:`PreconditionFailedError`. Keep such objects small
        (one request): fake-gcs-server checks the precondition of single-request uploads
        only.
        """
        uri = _norm(uri)
        if is_gcs(uri):
            blob = self._blob(uri)
            extra = {} if if_generation_match is None else {
                "if_generation_match": int(if_generation_match)}
            self._call(uri, "write", lambda: blob.upload_from_string(
                bytes(data), content_type="application/octet-stream", retry=None,
                timeout=_TIMEOUT, **extra), generation=if_generation_match)
            return int(blob.generation or 0)
        path = Path(uri)
        if if_generation_match is None:
            _atomic_write(path, lambda f: f.write(data))
            return path.stat().st_mtime_ns
        path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_lock(path.parent):
            try:
                current = path.stat().st_mtime_ns
            except FileNotFoundError:
                current = 0
            if current != if_generation_match:
                raise PreconditionFailedError(uri, if_generation_match)
            _atomic_write(path, lambda f: f.write(data))
            new = path.stat().st_mtime_ns
            if new <= current:  # a coarse clock: generations still have to grow
                new = current + 1
                os.utime(path, ns=(new, new))
            return new

    # -- text and JSON --------------------------------------------------------

    def read_text(self, uri: str | os.PathLike) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str | os.PathLike, text: str, *,
                   if_generation_match: int | None = None) -> int:
        return self.write_bytes(uri, text.encode("utf-8"), if_generation_match=if_generation_match)

    def read_json(self, uri: str | os.PathLike) -> Any:
        text = self.read_text(uri)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{_norm(uri)}: not valid JSON ({e})") from None

    def write_json(self, uri: str | os.PathLike, obj: Any, *,
                   if_generation_match: int | None = None) -> int:
        return self.write_text(uri, json.dumps(obj, indent=2, sort_keys=False) + "\n",
                               if_generation_match=if_generation_match)

    # -- objects ------------------------------------------------------------

    def exists(self, uri: str | os.PathLike) -> bool:
        """True when the object (a file, locally) exists."""
        uri = _norm(uri)
        if is_gcs(uri):
            blob = self._blob(uri)
            try:
                return self._call(uri, "exists", lambda: blob.exists(retry=None,
                                                                     timeout=_TIMEOUT))
            except FileNotFoundError:  # the bucket itself is missing
                return False
        return Path(uri).is_file()

    def stat(self, uri: str | os.PathLike) -> ObjectInfo:
        """Size and version of one object; :class:`FileNotFoundError` when missing."""
        uri = _norm(uri)
        if is_gcs(uri):
            blob = self._blob(uri)
            self._call(uri, "stat", lambda: blob.reload(retry=None, timeout=_TIMEOUT))
            return ObjectInfo(uri, int(blob.size or 0), int(blob.generation or 0))
        try:
            st = Path(uri).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"{uri}: not found") from None
        if not Path(uri).is_file():
            raise FileNotFoundError(f"{uri}: not a file")
        return ObjectInfo(uri, st.st_size, st.st_mtime_ns)

    def list_info(self, prefix_uri: str | os.PathLike) -> list[ObjectInfo]:
        """Every object below the folder ``prefix_uri``, sorted by URI.

        ``prefix_uri`` is a folder: ``gs://b/data`` lists ``gs://b/data/...``,
        never ``gs://b/data2``. A missing folder (or bucket) lists as empty.
        """
        prefix_uri = _norm(prefix_uri)
        if is_gcs(prefix_uri):
            bucket_name, key = split_gcs(prefix_uri)
            prefix = key.rstrip("/") + "/" if key.strip("/") else ""

            def fetch() -> list[ObjectInfo]:
                blobs = self.client.list_blobs(bucket_name, prefix=prefix or None, retry=None,
                                               timeout=_TIMEOUT)
                return [ObjectInfo(f"{GS}{bucket_name}/{b.name}", int(b.size or 0),
                                   int(b.generation or 0))
                        for b in blobs if not b.name.endswith("/")]

            try:
                infos = self._call(prefix_uri, "list", fetch)
            except FileNotFoundError:
                return []
            return sorted(infos, key=lambda i: i.uri)
        root = Path(prefix_uri)
        if not root.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.startswith(".tmp-"):  # our in-flight atomic writes
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(path, st.st_size, st.st_mtime_ns))
        return sorted(out, key=lambda i: i.uri)

    def list(self, prefix_uri: str | os.PathLike) -> list[str]:
        """Full URIs of the objects below the folder ``prefix_uri``, sorted."""
        return [i.uri for i in self.list_info(prefix_uri)]

    def delete(self, uri: str | os.PathLike) -> None:
        """Delete one object; a missing one is fine."""
        uri = _norm(uri)
        if is_gcs(uri):
            blob = self._blob(uri)
            try:
                self._call(uri, "delete", lambda: blob.delete(retry=None, timeout=_TIMEOUT))
            except FileNotFoundError:
                pass
            return
        try:
            Path(uri).unlink()
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix_uri: str | os.PathLike) -> int:
        """Delete every object below the folder ``prefix_uri``; returns how many."""
        uris = self.list(prefix_uri)
        for uri in uris:
            self.delete(uri)
        return len(uris)

    # -- files and folders ----------------------------------------------------

    def upload_file(self, local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
        """Copy a local file to ``uri`` (a bucket object or another local path)."""
        local_path, uri = Path(local_path), _norm(uri)
        if not local_path.is_file():
            raise FileNotFoundError(f"{local_path}: not found")
        if is_gcs(uri):
            blob = self._blob(uri)
            self._call(uri, "upload", lambda: blob.upload_from_filename(
                str(local_path), content_type="application/octet-stream", retry=None,
                timeout=_TIMEOUT))
            return
        with open(local_path, "rb") as src:
            _atomic_write(Path(uri), lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def download_file(self, uri: str | os.PathLike, local_path: str | os.PathLike) -> int:
        """Copy ``uri`` to a local file atomically; returns the bytes written."""
        uri, local_path = _norm(uri), Path(local_path)
        if is_gcs(uri):
            blob = self._blob(uri)

            def fetch() -> int:
                _atomic_write(local_path, lambda f: blob.download_to_file(
                    f, retry=None, timeout=_TIMEOUT))
                return local_path.stat().st_size

            return self._call(uri, "download", fetch)
        try:
            src = open(uri, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{uri}: not found") from None
        with src:
            _atomic_write(local_path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        return local_path.stat().st_size

    def upload_dir(self, local_dir: str | os.PathLike, prefix_uri: str | os.PathLike) -> int:
        """Copy every file below ``local_dir`` to ``prefix_uri/<relative path>``; returns bytes."""
        local_dir, prefix_uri = Path(local_dir), _norm(prefix_uri)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir}: not a folder")
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        jobs = [(p, join(prefix_uri, *p.relative_to(local_dir).parts)) for p in files]
        self._parallel(lambda job: self.upload_file(*job), jobs)
        return sum(p.stat().st_size for p in files)

    def download_dir(self, prefix_uri: str | os.PathLike, local_dir: str | os.PathLike) -> int:
        """Copy every object below ``prefix_uri`` into ``local_dir``; returns bytes written."""
        prefix_uri, local_dir = _norm(prefix_uri), Path(local_dir)
        base = prefix_uri.rstrip("/") if is_gcs(prefix_uri) else os.path.normpath(prefix_uri)
        jobs = []
        for uri in self.list(prefix_uri):
            rel = uri[len(base):].lstrip("/" + os.sep)
            target = local_dir.joinpath(*rel.replace(os.sep, "/").split("/"))
            if not target.resolve().is_relative_to(local_dir.resolve()):
                raise ValueError(f"{uri}: object name escapes {local_dir}")
            jobs.append((uri, target))
        local_dir.mkdir(parents=True, exist_ok=True)
        return sum(self._parallel(lambda job: self.download_file(*job), jobs))

    def _parallel(self, fn: Callable[[Any], _T], jobs: list) -> list[_T]:
        if len(jobs) <= 1:
            return [fn(job) for job in jobs]
        with concurrent.futures.ThreadPoolExecutor(min(_TRANSFER_THREADS, len(jobs))) as pool:
            return list(pool.map(fn, jobs))


def _norm(uri: str | os.PathLike) -> str:
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("empty storage URI")
    return uri


@contextlib.contextmanager
def _folder_lock(folder: Path, shared: bool = False):
    """flock on ``folder/.tmp-lock`` (skipped by listings, like our temp files)."""
    try:
        fd = os.open(folder / ".tmp-lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        yield  # no folder: nothing to read, nothing to guard
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
