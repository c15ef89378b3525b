"""One writer per OUTPUT: `_lease.json`, made by an exclusive create, kept by heartbeats, fencing.

Create. Local: the record is written to a temporary name and hard-linked to `_lease.json`
(the link fails if the file exists), so a full disk or a crash never leaves an empty lease.
S3: `If-None-Match: *`. Of two runs starting together exactly one gets the lease.

Every change after that is a compare-and-swap against the version that was read:
S3: `PutObject`/`DeleteObject` with `If-Match: <ETag>` (botocore >= 1.35.x, AWS since
2024-11; moto honours it). Local: read, compare the bytes, write a temporary file and
`os.replace` it, all under `flock` on the OUTPUT folder (every wintok run takes that lock,
also in other containers of the same kernel; NFS maps it to server-side locks). Where the
lock is refused, or on other fsspec stores, it is read-compare-write without a lock.

Fencing. The record holds a token, `<run_id>/<generation>` (the generation goes up on each
takeover). Workers get the token with their config and call `check_fence` right before a
shard's data files and again before its manifest are written: a run that lost the lease
writes no manifest. The heartbeat (every ttl/4) notices a takeover when its CAS fails and
sets `Lease.lost`; the driver checks it every loop and stops with `LeaseLost` (exit 2).

Takeover. A holder silent for `ttl` seconds is stale. Before that only a provably dead holder
is taken over: same boot id and same pid namespace as this process (both read from /proc)
and its pid gone, or alive with another start time (the pid was reused); or `--break-lease`.
Same host name proves nothing (containers share it). Without /proc only the TTL counts.
A lease that is empty or not JSON names no holder: it is taken over once the file itself is
older than the TTL (this code never writes one; an old version could leave it on a full disk).

Residual windows. (1) A worker that passed `check_fence` and then pauses longer than the TTL
before its manifest PUT lands commits that one shard after a takeover (the new run writes the
same bytes for the same fingerprint, and refuses a different one without --overwrite).
(2) Staleness compares `heartbeat_at` (holder's clock) with the reader's clock: clocks must
agree to well within the TTL. (3) Without a working lock (some network filesystems, other
fsspec stores) a heartbeat may overwrite a takeover made between its read and its write;
the taker then finds the lease lost at its next check and stops: one writer still remains.
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

from .io import Storage
from .lease_file import LEASE_FILE, LeaseError, LeaseFile, LeaseHeld, LeaseLost

__all__ = ["LEASE_FILE", "Lease", "LeaseError", "LeaseHeld", "LeaseLost", "check_fence", "proc_identity",
           "provably_dead"]
log = logging.getLogger("wintok")


# --------------------------------------------------------------------------- process identity
def _start_time(pid: int) -> int:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def proc_identity() -> dict[str, Any]:
    """Boot id, pid namespace and start time of this process; {} where /proc cannot tell."""
    try:
        if int(os.readlink("/proc/self")) != os.getpid():  # /proc of another pid namespace
            return {}
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot_id = f.read().strip()
        return {"boot_id": boot_id, "pidns": os.readlink("/proc/self/ns/pid"), "start_time": _start_time(os.getpid())}
    except (OSError, ValueError, IndexError):
        return {}


def provably_dead(rec: dict[str, Any], me: dict[str, Any] | None = None) -> bool:
    """True only if the holder ran on this kernel, in this pid namespace, and its process is gone."""
    me = proc_identity() if me is None else me
    pid, start = rec.get("pid"), rec.get("start_time")
    if not me or not isinstance(pid, int) or not isinstance(start, int) or pid <= 0:
        return False
    if rec.get("boot_id") != me["boot_id"] or rec.get("pidns") != me["pidns"]:
        return False
    try:
        return _start_time(pid) != start  # alive, but another process: the pid was reused
    except FileNotFoundError:
        return True
    except (OSError, ValueError, IndexError):
        return False


# --------------------------------------------------------------------------- records
def _parse(data: bytes | None) -> dict[str, Any] | None:
    try:
        rec = json.loads(data or b"")
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and rec.get("run_id") else None


def _describe(rec: dict[str, Any]) -> str:
    return f"run {rec.get('run_id')} on {rec.get('host')}, pid {rec.get('pid')}"


def check_fence(storage: Storage, token: str) -> None:
    """Raise LeaseLost unless the lease of `storage` still carries `token` (what workers call
    before they make a shard visible). A lease that cannot be read raises its OSError: the
    shard fails and is retried, nothing is committed without a positive check."""
    try:
        rec = _parse(storage.read_bytes(LEASE_FILE))
    except FileNotFoundError:
        rec = None
    if rec is not None and rec.get("token") == token:
        return
    holder = _describe(rec) if rec else "nobody (the lease file is gone or damaged)"
    raise LeaseLost(f"lost the lease on {storage.url}: it is now held by {holder}; this run (lease {token}) "
                    "stopped and commits nothing more. Let that run finish, then rerun to resume")


# --------------------------------------------------------------------------- the lease
class Lease:
    """`with Lease(storage, ttl):` holds OUTPUT; `token` fences commits; `check()` raises once lost."""

    def __init__(self, storage: Storage, ttl: float = 60.0, break_lease: bool = False) -> None:
        self.storage, self.ttl, self.break_lease = storage, ttl, break_lease
        self.file = LeaseFile(storage)
        self.run_id = uuid.uuid4().hex[:12]
        self.generation = 1
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.identity = proc_identity()
        self.version: Any = None
        self.lost = threading.Event()
        self.lost_message = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return f"{self.run_id}/{self.generation}"

    def _record(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "generation": self.generation, "token": self.token,
                           "host": self.host, "pid": self.pid, **self.identity, "ttl": self.ttl,
                           "heartbeat_at": time.time()}).encode()

    def _takeover_reason(self, rec: dict[str, Any] | None) -> str | None:
        """Why the lease found may be taken over now, or None if it may not."""
        if rec is None:
            try:
                age = self.file.age()
            except FileNotFoundError:
                return "the damaged lease is gone"
            if self.break_lease or age > self.ttl:
                return f"taking over a damaged (empty or not JSON) lease written {age:.0f} s ago"
            raise LeaseHeld(f"{self.storage.url_of(LEASE_FILE)} is damaged (empty or not JSON) and {age:.0f} s old: "
                            f"rerun after {self.ttl:.0f} s, or with --break-lease if no run is writing there")
        age = time.time() - float(rec.get("heartbeat_at", 0))
        if self.break_lease:
            return (f"--break-lease: taking over the lease of {_describe(rec)} (heartbeat {age:.0f} s ago); "
                    "if that run is alive it stops at its next commit")
        if provably_dead(rec, self.identity):
            return f"taking over the lease of {_describe(rec)}: that process is gone"
        if age > float(rec.get("ttl", self.ttl)):
            return f"taking over the stale lease of {_describe(rec)} (no heartbeat for {age:.0f} s)"
        return None

    def _held(self, rec: dict[str, Any]) -> LeaseHeld:
        age = time.time() - float(rec.get("heartbeat_at", 0))
        return LeaseHeld(
            f"{self.storage.url} is being written by another run ({_describe(rec)}, heartbeat {age:.0f} s ago). "
            f"Wait for it to finish; if it died, rerun after its lease expires "
            f"({float(rec.get('ttl', self.ttl)):.0f} s), or with --break-lease if you know it is dead")

    def acquire(self) -> None:
        for _ in range(5):
            self.generation = 1
            version = self.file.create(self._record())
            if version is not None:
                return self._held_now(version)
            got = self.file.read()
            if got is None:
                continue  # released in between: try again
            data, version = got
            rec = _parse(data)
            if rec is not None and rec.get("run_id") == self.run_id:
                self.generation = int(rec.get("generation", 1))  # our create went through, its response was lost
                return self._held_now(version)
            why = self._takeover_reason(rec)
            if why is None:
                raise self._held(rec or {})
            self.generation = int((rec or {}).get("generation", 0)) + 1
            new = self.file.swap(version, self._record())
            if new is not None:
                log.warning("%s", why)
                return self._held_now(new)
        raise LeaseHeld(f"could not take the lease on {self.storage.url}: another run took it first")

    def _held_now(self, version: Any) -> None:
        self.version = version
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                new = self.file.swap(self.version, self._record())
                if new is None:  # changed since our last write: taken over, or our own write whose answer was lost
                    got = self.file.read()
                    rec = _parse(got[0]) if got else None
                    if rec is not None and rec.get("token") == self.token:
                        self.version = got[1]  # type: ignore[index]
                        continue
                    return self._lose(rec)
                self.version = new
            except Exception as e:  # noqa: BLE001 - a failed beat is retried at the next one
                log.warning("lease heartbeat failed: %s", e)

    def _lose(self, rec: dict[str, Any] | None) -> None:
        holder = _describe(rec) if rec else "nobody (the lease file is gone or damaged)"
        self.lost_message = (f"lost the lease on {self.storage.url} to {holder} (this run paused or could not "
                             f"heartbeat for longer than the lease TTL, {self.ttl:.0f} s, or it was broken with "
                             "--break-lease); it stopped and commits nothing more. Let that run finish, then rerun "
                             "to resume")
        log.error("%s", self.lost_message)
        self.lost.set()

    def check(self, fresh: bool = False) -> None:
        """Raise LeaseLost if the heartbeat found the lease taken over (`fresh`: or the file says so now)."""
        if self.lost.is_set():
            raise LeaseLost(self.lost_message)
        if fresh:
            check_fence(self.storage, self.token)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.version is not None and not self.lost.is_set():
            try:
                if not self.file.delete(self.version):
                    log.warning("did not remove %s: it is no longer this run's", self.storage.url_of(LEASE_FILE))
            except OSError as e:
                log.warning("could not remove the lease %s: %s", self.storage.url_of(LEASE_FILE), e)
        self.version = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
