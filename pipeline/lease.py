"""One run at a time per OUTPUT: `_lease.json`, made by a conditional create, kept by heartbeats.

The lease is created with an exclusive create (local: O_EXCL; S3: If-None-Match: *), so of
two runs starting together exactly one gets it; the other stops with a message naming the
holder. A holder that stopped heartbeating for `ttl` seconds, or whose process is gone on
this same host, is stale: its lease is taken over, so a killed driver is resumed by simply
rerunning the command.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from .io import OBJECT_STORES, Storage

log = logging.getLogger("wintok")
LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the OUTPUT."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, storage: Storage, ttl: float = 60.0) -> None:
        self.storage, self.ttl = storage, ttl
        self.run_id = uuid.uuid4().hex[:12]
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": self.host, "pid": self.pid, "ttl": self.ttl,
                           "heartbeat_at": time.time()}).encode()

    def _create(self) -> bool:
        """Exclusive create; False if the lease file already exists."""
        path = self.storage.path(LEASE_FILE)
        fs = self.storage.fs
        if self.storage.protocol == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            return True
        try:
            if self.storage.protocol in OBJECT_STORES:
                fs.pipe_file(path, self._record(), mode="create")
            else:
                with fs.open(path, "xb") as f:
                    f.write(self._record())
        except FileExistsError:
            return False
        except OSError as e:
            if "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_text(LEASE_FILE))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _stale(self, rec: dict[str, Any]) -> bool:
        if not rec:
            return True
        if rec.get("host") == self.host and isinstance(rec.get("pid"), int) and not _pid_alive(rec["pid"]):
            return True
        return time.time() - float(rec.get("heartbeat_at", 0)) > float(rec.get("ttl", self.ttl))

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            rec = self._read()
            if rec is None:
                continue  # released in between: try again
            if rec and rec.get("run_id") == self.run_id:
                self._start_heartbeat()  # our create went through but its response was lost
                return
            if not self._stale(rec):
                age = time.time() - float(rec.get("heartbeat_at", 0))
                raise LeaseHeld(
                    f"{self.storage.url} is being written by another run (id {rec.get('run_id')} on "
                    f"{rec.get('host')}, pid {rec.get('pid')}, heartbeat {age:.0f} s ago). Wait for it to finish; "
                    f"if it died, rerun after its lease expires ({float(rec.get('ttl', self.ttl)):.0f} s)"
                )
            log.warning("taking over the stale lease of run %s on %s", rec.get("run_id"), rec.get("host"))
            self.storage.delete(LEASE_FILE)
        raise LeaseHeld(f"could not take the lease on {self.storage.url}: another run took it first")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl / 4):
                rec = self._read()
                if rec and rec.get("run_id") != self.run_id:
                    log.error("lost the lease on %s to run %s", self.storage.url, rec.get("run_id"))
                    return
                try:
                    self.storage.put_bytes(self._record(), LEASE_FILE)
                except OSError as e:
                    log.warning("lease heartbeat failed: %s", e)

        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        rec = self._read()
        if rec is not None and rec.get("run_id") == self.run_id:
            self.storage.delete(LEASE_FILE)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
