"""The OUTPUT lease: heartbeats keep it, a paused holder loses it and commits nothing after,
takeover before the TTL only for a provably dead holder, --break-lease, no empty lease file."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from pipeline.io import Storage
from pipeline.lease import LEASE_FILE, Lease, LeaseError, LeaseHeld, LeaseLost, check_fence, proc_identity
from pipeline.shard.sink import ShardSink

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# holds a lease (TTL 1 s) and "commits" every 0.2 s through the check the writer uses
HOLDER = r"""
import os, signal, sys, time
from pipeline.io import Storage
from pipeline.lease import Lease, LeaseLost, check_fence
storage = Storage(sys.argv[1])
lease = Lease(storage, ttl=1.0)
lease.acquire()
print("token", lease.token, flush=True)
i = 0
try:
    while True:
        check_fence(storage, lease.token)
        storage.put_bytes(b"x", f"commits/{i:05d}")
        i += 1
        print("tick", flush=True)
        if os.path.exists(sys.argv[2]):  # the test asks for a pause right after a commit: a known point
            os.unlink(sys.argv[2])
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(0.2)
except LeaseLost as e:
    noticed = lease.lost.wait(3)  # the heartbeat notices the takeover too
    print("lost", e, flush=True)
    print("heartbeat-noticed", noticed, flush=True)
    lease.release()
    sys.exit(2)
"""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _plant(out, **rec) -> None:
    os.makedirs(out, exist_ok=True)
    base = {"run_id": "planted00000", "generation": 3, "token": "planted00000/3", "host": os.uname().nodename,
            "pid": _dead_pid(), "ttl": 600, "heartbeat_at": time.time()}
    base.update(rec)
    with open(os.path.join(out, LEASE_FILE), "w") as f:
        json.dump({k: v for k, v in base.items() if v is not None}, f)


def test_heartbeat_keeps_the_lease_and_a_paused_holder_loses_it_and_commits_nothing(tmp_path):
    out = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": REPO}
    pause = str(tmp_path / "pause-now")
    child = subprocess.Popen([sys.executable, "-c", HOLDER, out, pause], env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = child.stdout.readline().split()
        assert first[0] == "token", first
        # heartbeats keep it through several TTLs: a second run is refused all along
        t_end = time.time() + 3.5
        while time.time() < t_end:
            with pytest.raises(LeaseHeld, match="being written by another run"):
                Lease(Storage(out), ttl=1.0).acquire()
            time.sleep(0.3)
        assert child.stdout.readline().strip() == "tick"
        open(pause, "w").close()  # it stops itself right after its next commit (not between check and write)
        deadline = time.time() + 20
        while time.time() < deadline and _state(child.pid) != "T":
            time.sleep(0.02)
        assert _state(child.pid) == "T", "the holder did not pause"
        before = sorted(os.listdir(os.path.join(out, "commits")))
        time.sleep(1.6)
        second = Lease(Storage(out), ttl=30.0)
        second.acquire()  # the TTL ran out: taken over (the holder is alive, so only after the TTL)
        try:
            child.send_signal(signal.SIGCONT)
            lines = child.communicate(timeout=20)[0].splitlines()
            assert child.returncode == 2, lines
            lost = next(ln for ln in lines if ln.startswith("lost "))
            assert second.run_id in lost and "commits nothing more" in lost
            assert "heartbeat-noticed True" in lines
            assert sorted(os.listdir(os.path.join(out, "commits"))) == before  # nothing after the takeover
            check_fence(Storage(out), second.token)  # the resumed holder did not overwrite the new lease
        finally:
            second.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not os.path.exists(os.path.join(out, LEASE_FILE))


def test_heartbeat_notices_a_takeover_and_signals(tmp_path, caplog):
    storage = Storage(str(tmp_path / "out"))
    first = Lease(storage, ttl=1.0)
    first.acquire()
    with caplog.at_level(logging.WARNING, logger="wintok"):
        breaker = Lease(storage, ttl=60.0, break_lease=True)
        breaker.acquire()  # a live holder, taken over only because of --break-lease
    assert any("--break-lease" in r.getMessage() and first.run_id in r.getMessage() for r in caplog.records)
    assert breaker.generation == 2 and breaker.token == f"{breaker.run_id}/2"
    assert first.lost.wait(2), "the heartbeat did not notice the takeover"
    with pytest.raises(LeaseLost, match=breaker.run_id):
        first.check()
    with pytest.raises(LeaseLost, match=breaker.run_id):
        check_fence(storage, first.token)
    first.release()  # must not remove the new holder's lease
    check_fence(storage, breaker.token)
    breaker.release()
    assert not storage.exists(LEASE_FILE)


def test_writer_commits_nothing_without_the_lease(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    schema = pa.schema([pa.field("key", pa.string()), pa.field("sample_index", pa.int64())])
    lease = Lease(storage, ttl=60.0)
    lease.acquire()

    def write(stem: str) -> None:
        w = ShardSink(storage, stem, f"in/{stem}.tar", schema, {"schema_version": 1})
        w.add_error("k", 0, "decode", "bad_image", "not an image")
        try:
            w.commit(input_size=1, input_etag=None, attempts=1, seconds=0.0, run_fingerprint="x",
                     fence=lambda: check_fence(storage, lease.token))
        finally:
            w.cleanup()

    write("a")
    assert storage.exists("_manifest/a.json")
    Lease(storage, ttl=60.0, break_lease=True).acquire()
    with pytest.raises(LeaseLost):
        write("b")
    assert storage.list("_manifest") == ["a.json"]
    assert storage.list("shards") == ["a.parquet"] and storage.list("errors") == ["a.parquet"]


@pytest.mark.parametrize("foreign", [{"pidns": "pid:[1]"}, {"boot_id": "another-boot"},
                                     {"pidns": None, "boot_id": None, "start_time": None}])
def test_live_holder_elsewhere_is_not_taken_over_before_the_ttl(tmp_path, foreign):
    """Same host name and a pid that does not exist here, but another pid namespace, another
    kernel, or no identity at all: nothing proves that run dead."""
    me = proc_identity()
    assert me, "this test needs /proc"
    out = str(tmp_path / "out")
    _plant(out, boot_id=me["boot_id"], pidns=me["pidns"], start_time=12345)
    rec = json.load(open(os.path.join(out, LEASE_FILE)))
    rec.update(foreign)
    json.dump({k: v for k, v in rec.items() if v is not None}, open(os.path.join(out, LEASE_FILE), "w"))
    with pytest.raises(LeaseHeld, match="planted00000"):
        Lease(Storage(out), ttl=600).acquire()
    _plant(out, heartbeat_at=time.time() - 601, **{k: v for k, v in foreign.items() if v is not None})
    late = Lease(Storage(out), ttl=600)
    late.acquire()  # after the TTL it is stale, wherever it ran
    late.release()


def test_dead_holder_here_is_taken_over_at_once(tmp_path, caplog):
    me = proc_identity()
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    from pipeline.lease import _start_time
    start = _start_time(holder.pid)
    holder.kill()
    holder.wait()
    _plant(out, pid=holder.pid, boot_id=me["boot_id"], pidns=me["pidns"], start_time=start)
    with caplog.at_level(logging.WARNING, logger="wintok"):
        lease = Lease(Storage(out), ttl=600)
        lease.acquire()
    assert lease.generation == 4 and any("process is gone" in r.getMessage() for r in caplog.records)
    lease.release()
    # a live process with that pid but another start time: the pid was reused, the holder is dead
    _plant(out, pid=os.getpid(), boot_id=me["boot_id"], pidns=me["pidns"], start_time=me["start_time"] + 1)
    lease = Lease(Storage(out), ttl=600)
    lease.acquire()
    lease.release()
    # the same process, alive: held
    _plant(out, pid=os.getpid(), boot_id=me["boot_id"], pidns=me["pidns"], start_time=me["start_time"])
    with pytest.raises(LeaseHeld):
        Lease(Storage(out), ttl=600).acquire()


def test_damaged_lease_is_stale_only_after_the_ttl(tmp_path):
    """A 0-byte or non-JSON `_lease.json` names no holder: it may be a create in progress of an
    older version, so it is taken over once the file is older than the TTL (or with --break-lease)."""
    out = tmp_path / "out"
    out.mkdir()
    for content in (b"", b"{not json"):
        (out / LEASE_FILE).write_bytes(content)
        with pytest.raises(LeaseHeld, match="damaged"):
            Lease(Storage(str(out)), ttl=60).acquire()
        broken = Lease(Storage(str(out)), ttl=60, break_lease=True)
        broken.acquire()
        broken.release()
        (out / LEASE_FILE).write_bytes(content)
        os.utime(out / LEASE_FILE, (time.time() - 120, time.time() - 120))
        old = Lease(Storage(str(out)), ttl=60)
        old.acquire()
        check_fence(Storage(str(out)), old.token)
        old.release()
    assert os.listdir(out) == []


@pytest.fixture()
def full_dir(tmp_path, monkeypatch):
    """A folder on a filesystem with no space left: a 64 KiB tmpfs, filled (root), or else
    os.write raising ENOSPC at the OS boundary."""
    d = tmp_path / "full"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                      capture_output=True).returncode == 0:
        try:
            with open(d / "filler", "wb") as f:
                with pytest.raises(OSError) as e:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
                assert e.value.errno == errno.ENOSPC
        except OSError:
            pass  # close() flushing into the full disk
        yield d
        subprocess.run(["umount", str(d)], check=True)
        return

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pipeline.lease_file.os.write", no_space)
    (d / "filler").write_bytes(b"")
    yield d


def test_create_on_a_full_disk_leaves_no_empty_lease(full_dir):
    out = full_dir / "out"
    out.mkdir()
    with pytest.raises(LeaseError, match="No space left on device.*free space") as e:
        Lease(Storage(str(out)), ttl=60).acquire()
    assert "\n" not in str(e.value)
    assert os.listdir(out) == []  # neither a 0-byte _lease.json nor a temporary file
