"""The lease file's storage operations: exclusive create, read with a version, compare-and-swap
and compare-and-delete (S3: If-None-Match / If-Match on the ETag; local: flock on the OUTPUT
folder around read-compare-replace). The protocol on top, and its guarantees: `pipeline.lease`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

from .io import OBJECT_STORES, Storage
from .layout import LEASE_FILE
from .retry import service_error

log = logging.getLogger("wintok")


class LeaseError(RuntimeError):
    """The lease cannot be taken or kept; the message is one line that says what to do."""


class LeaseHeld(LeaseError):
    """Another live run holds the OUTPUT."""


class LeaseLost(LeaseError):
    """This run's lease was taken over: it must stop writing at once."""


def _precondition_failed(e: BaseException) -> bool:
    status, code = service_error(e)
    return code == "PreconditionFailed" or status == 412 or "PreconditionFailed" in str(e) or "412" in str(e)


class LeaseFile:
    """Create / read-with-version / compare-and-swap / compare-and-delete of one small file."""

    def __init__(self, storage: Storage) -> None:
        self.storage, self.fs = storage, storage.fs
        self.path = storage.path(LEASE_FILE)
        self.local = storage.protocol == "file"
        self.s3 = storage.protocol in ("s3", "s3a")

    def _retry(self, fn: Any, what: str) -> Any:
        return self.storage._retry(fn, what, LEASE_FILE, upload=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.local:
            yield
            return
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LeaseHeld(f"{self.storage.url}: another process holds the lease lock for over 10 s; "
                                        "retry in a moment") from None
                    time.sleep(0.01)
                except OSError as e:  # no locks on this filesystem: unlocked read-compare-write
                    log.debug("flock on %s refused (%s): lease updates are not locked", self.path, e)
                    break
            yield
        finally:
            os.close(fd)  # also drops the lock

    def create(self, data: bytes) -> Any | None:
        """The new version, or None if the file exists."""
        if self.local:
            return self._create_local(data)
        try:
            if self.s3:
                return self._retry(lambda: self.fs.pipe_file(self.path, data, mode="create"), "creating")["ETag"]
            if self.storage.protocol in OBJECT_STORES:
                self._retry(lambda: self.fs.pipe_file(self.path, data, mode="create"), "creating")
                return data
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
            return data
        except FileExistsError:
            return None
        except OSError as e:
            if _precondition_failed(e):
                return None
            raise

    def _create_local(self, data: bytes) -> bytes | None:
        folder = os.path.dirname(self.path)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        try:
            os.makedirs(folder, exist_ok=True)
            _write_file(tmp, data)
            with self._locked():
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    return None
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    if os.path.lexists(self.path):  # no hard links here: we hold the lock, so no race
                        return None
                    os.replace(tmp, self.path)
            return data
        except OSError as e:
            raise LeaseError(f"cannot create the lease {self.storage.url_of(LEASE_FILE)}: {e.strerror or e}; "
                             "free space on OUTPUT's filesystem (or make it writable, or choose another OUTPUT) "
                             "and rerun") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def read(self) -> tuple[bytes, Any] | None:
        """(content, version), or None if there is no lease."""
        try:
            if self.s3:
                return self._retry(self._get_s3, "reading")
            data = self.storage.read_bytes(LEASE_FILE)
        except FileNotFoundError:
            return None
        return data, data

    def _get_s3(self) -> tuple[bytes, str]:
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path)

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        return sync(self.fs.loop, get)

    def age(self) -> float:
        """Seconds since the file was last written (by the filesystem's clock)."""
        info = self.fs.info(self.path)
        when = info.get("mtime") or info.get("LastModified") or info.get("created")
        stamp = when.timestamp() if hasattr(when, "timestamp") else float(when or 0)
        return time.time() - stamp

    def swap(self, version: Any, data: bytes) -> Any | None:
        """Replace the file if it is still at `version`: the new version, or None if it changed."""
        if self.s3:
            try:
                return self._retry(lambda: self.fs.pipe_file(self.path, data, IfMatch=version), "updating")["ETag"]
            except (FileNotFoundError, OSError) as e:
                if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                    return None
                raise
        with self._locked():
            got = self.read()
            if got is None or got[1] != version:
                return None
            if self.local:
                tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
                try:
                    _write_file(tmp, data)
                    os.replace(tmp, self.path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            else:
                self.storage.put_bytes(data, LEASE_FILE)
            return data

    def delete(self, version: Any) -> bool:
        """Remove the file if it is still at `version`."""
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                self._retry(lambda: self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version),
                            "deleting")
                return True
            except (FileNotFoundError, OSError) as e:
                if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                    return False
                raise
        with self._locked():
            got = self.read()
            if got is None or got[1] != version:
                return False
            self.storage.delete(LEASE_FILE)
            return True


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
