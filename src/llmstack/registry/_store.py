"""Storage backends for the registry: the few primitives the registry needs, done atomically.

The registry needs four guarantees from storage, and each backend provides them its own way:

* ``create`` (exclusive create): claims a version number or a history slot. Exactly one of
  several racing writers succeeds; the others get ``FileExistsError``.
* ``update`` (compare-and-swap of one small object): switches an alias together with its history.
* whole-object visibility: a reader sees either the old or the new content, never half of it.
* streaming upload/download of large files.

Backends:

* :class:`LocalStore` (plain directories): ``os.link`` of a fully written temporary file (fails
  if the target exists: atomic exclusive create), ``os.replace`` for atomic overwrite, and an
  ``fcntl.flock`` per alias for compare-and-swap. Safe across threads and processes on one host
  (and on NFS only as far as NFS honours link/flock).
* :class:`FsspecStore` for ``s3://`` uses S3 conditional writes: ``PutObject`` with
  ``If-None-Match: *`` for exclusive create and ``If-Match: <etag>`` for compare-and-swap (AWS S3
  supports both since 2024; moto implements them, though moto's own check-then-store is not
  atomic under truly simultaneous requests). Anything written is read back to detect stores that
  silently ignore the condition.
* ``memory://`` lives inside one process, so a process-wide lock makes it atomic.
* Other fsspec protocols get a best effort (check, then write), with the same read-back check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

CHUNK = 8 * 1024 * 1024


class PreconditionFailed(Exception):
    """A conditional write lost: the object changed since it was read (internal, retried)."""


class Store:
    """Key/value view of a registry root; keys are ``/``-separated relative paths."""

    url: str
    is_local: bool = False

    def read(self, key: str) -> bytes:  # raises FileNotFoundError
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        """Atomically replace (or create) a small object."""
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> None:
        """Create a small object only if it does not exist (else ``FileExistsError``)."""
        raise NotImplementedError

    def update(self, key: str, fn: Callable[[bytes | None], bytes]) -> bytes:
        """Compare-and-swap: write ``fn(current)`` only if nobody wrote ``key`` meanwhile."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Immediate child names below ``prefix`` (files and directories); [] if none."""
        raise NotImplementedError

    def find(self, prefix: str) -> list[str]:
        """Every file below ``prefix``, as paths relative to ``prefix``."""
        raise NotImplementedError

    def open_write(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        raise NotImplementedError

    def open_read(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def delete_tree(self, prefix: str) -> None:
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """Where ``key`` lives on the local disk (local stores only)."""
        return None


class LocalStore(Store):
    """A registry rooted in a local directory."""

    is_local = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def _temp_for(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._temp_for(path, data)
        os.replace(tmp, path)

    def create(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._temp_for(path, data)
        try:
            os.link(tmp, path)  # atomic; FileExistsError if another writer got there first
        finally:
            tmp.unlink(missing_ok=True)

    def update(self, key: str, fn: Callable[[bytes | None], bytes]) -> bytes:
        import fcntl

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = path.read_bytes() if path.exists() else None
                new = fn(current)
                self.write(key, new)
                return new
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def list(self, prefix: str) -> list[str]:
        path = self._path(prefix) if prefix else self.root
        try:
            return sorted(entry.name for entry in os.scandir(path) if not entry.name.startswith(".tmp-"))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def find(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as fh:  # objects are written once, under a fresh upload id
            yield fh

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        with open(self._path(key), "rb") as fh:
            yield fh

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)


# memory:// is one dict per process; this lock makes create/update atomic within it.
_MEMORY_LOCK = threading.RLock()


class FsspecStore(Store):
    """A registry on any fsspec filesystem (``s3://``, ``memory://``, ``gcs://``, ...)."""

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/")
        protocol = self.fs.protocol
        self.protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        self._lock = _MEMORY_LOCK if self.protocol == "memory" else None

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)  # a single PUT: readers see all or nothing

    def create(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self._lock is not None:
            with self._lock:
                if self.fs.exists(path):
                    raise FileExistsError(path)
                self.fs.pipe_file(path, data)
            return
        if self.protocol in ("s3", "s3a"):
            self.fs.pipe_file(path, data, mode="create")  # If-None-Match: *
        else:  # best effort for stores without conditional writes
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                raise FileExistsError(path)
            self.fs.pipe_file(path, data)
        # Read back: a store that ignored the condition (or a racing writer on a server that checks
        # and stores non-atomically, like moto) shows someone else's bytes, and then we lost.
        if not self._reads_back(path, data):
            raise FileExistsError(path)

    def _reads_back(self, path: str, data: bytes) -> bool:
        """Whether ``path`` now holds exactly ``data``."""
        for attempt in range(5):
            try:
                return self.fs.cat_file(path) == data
            except FileNotFoundError:  # mid-replacement on a non-atomic server: look again
                time.sleep(0.05 * (attempt + 1))
        return False

    def update(self, key: str, fn: Callable[[bytes | None], bytes]) -> bytes:
        path = self._path(key)
        if self._lock is not None:
            with self._lock:
                current = self.fs.cat_file(path) if self.fs.exists(path) else None
                new = fn(current)
                self.fs.pipe_file(path, new)
                return new
        for _ in range(50):
            etag = None
            try:
                if self.protocol in ("s3", "s3a"):
                    self.fs.invalidate_cache(path)
                    etag = self.fs.info(path)["ETag"]
                current = self.fs.cat_file(path)
            except FileNotFoundError:
                current = None
            new = fn(current)
            try:
                if self.protocol in ("s3", "s3a"):
                    if current is None:
                        self.fs.pipe_file(path, new, mode="create")
                    else:
                        self.fs.pipe_file(path, new, IfMatch=etag)
                else:
                    self.fs.pipe_file(path, new)
            except (FileExistsError, OSError) as exc:
                if isinstance(exc, FileNotFoundError) or not _is_precondition(exc):
                    raise
                continue  # somebody wrote first: re-read and re-decide
            if self.protocol in ("s3", "s3a") and not self._reads_back(path, new):
                continue  # a non-atomic server let a racing writer overwrite us: re-read and re-decide
            return new
        raise PreconditionFailed(f"{path}: too many concurrent writers")

    def list(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = {str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries}
        names.discard("")
        return sorted(names)

    def find(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        strip = path.lstrip("/") + "/"
        return sorted(str(p).lstrip("/").removeprefix(strip) for p in found)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        with self.fs.open(self._path(key), "wb") as fh:
            yield fh

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        with self.fs.open(self._path(key), "rb") as fh:
            yield fh

    def size(self, key: str) -> int:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return int(self.fs.info(path)["size"])

    def delete_tree(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(prefix), recursive=True)


def _is_precondition(exc: BaseException) -> bool:
    text = str(exc).lower().replace("-", "")
    return isinstance(exc, FileExistsError) or "precondition" in text or "412" in text


def open_store(url: str, *, storage_options: dict[str, Any] | None = None) -> Store:
    """The right backend for ``url`` (a local path, ``file://`` or any fsspec URL)."""
    if url.startswith("file://"):
        return LocalStore(url.removeprefix("file://"))
    if "://" not in url and "::" not in url:
        return LocalStore(url)
    return FsspecStore(url, storage_options=storage_options)
