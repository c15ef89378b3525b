"""Lease fencing on moto S3 (If-Match compare-and-swap) and a whole run that loses its lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from pipeline.io import Storage, s3_options
from pipeline.lease import LEASE_FILE, Lease, LeaseHeld, LeaseLost, check_fence
from pipeline.shard.sink import ShardSink
from tests import corpus
from tests.e2e.helpers import record

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_s3_lease_heartbeats_fences_and_never_overwrites_a_new_holder(s3_endpoint, s3fs_client):
    s3fs_client.mkdir("wintok-fence")
    storage = Storage("s3://wintok-fence/out", s3_options(s3_endpoint))
    first = Lease(storage, ttl=1.0)
    first.acquire()
    try:
        t_end = time.time() + 3.0  # heartbeats (conditional PUTs) keep it past several TTLs
        while time.time() < t_end:
            with pytest.raises(LeaseHeld):
                Lease(storage, ttl=1.0).acquire()
            time.sleep(0.3)
        check_fence(storage, first.token)
        stale_version = first.version
        second = Lease(storage, ttl=60.0, break_lease=True)
        second.acquire()
        # a heartbeat from the old holder's last version is refused by S3 (412), not written
        assert first.file.swap(stale_version, first._record()) is None
        assert first.lost.wait(2)
        with pytest.raises(LeaseLost, match=second.run_id):
            check_fence(storage, first.token)
        schema = pa.schema([pa.field("key", pa.string()), pa.field("sample_index", pa.int64())])
        w = ShardSink(storage, "s", "in/s.tar", schema, {"schema_version": 1})
        with pytest.raises(LeaseLost):
            w.commit(input_size=1, input_etag=None, attempts=1, seconds=0.0, run_fingerprint="x",
                     fence=lambda: check_fence(storage, first.token))
        w.cleanup()
        assert not storage.exists("_manifest/s.json") and not storage.exists("shards/s.parquet")
        first.release()  # lost: removes nothing
        check_fence(storage, second.token)
        second.release()
        assert not storage.exists(LEASE_FILE)
    finally:
        first.release()


def test_a_paused_run_that_lost_its_lease_commits_nothing_and_exits_2(tmp_path, tiny_model_dir):
    """The driver of a real run is SIGSTOPped past its TTL and taken over; resumed, it stops
    with one line naming the new holder, and neither it nor its workers commit anything after."""
    corpus.make_shards(tmp_path / "in", n_shards=8, per_shard=6, seed=71)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"lease_ttl: 2\nmodel: {tiny_model_dir}\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tokenize", "--job", str(job),
                             f"{tmp_path}/in/{{00000..00007}}.tar", str(out), "--workers", "1", "--no-progress"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    taker = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (out / "_manifest").is_dir() and os.listdir(out / "_manifest"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGSTOP)
        time.sleep(2.5)
        taker = Lease(Storage(str(out)), ttl=60.0)
        taker.acquire()  # stale after the TTL: taken over
        committed = sorted(os.listdir(out / "_manifest"))
        assert len(committed) < 8
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        last = [ln for ln in err.splitlines() if ln.startswith("wintok: error:")]
        assert len(last) == 1 and "lost the lease" in last[0] and taker.run_id in last[0], err[-3000:]
        time.sleep(1)
        assert sorted(os.listdir(out / "_manifest")) == committed  # nothing after the takeover
        check_fence(Storage(str(out)), taker.token)  # the lost run did not remove or overwrite it
        record("driver paused past its lease", "SIGSTOP 2.5 s (lease_ttl 2), lease taken over by a second run, "
               "SIGCONT", "the resumed run committed nothing more and exited 2 naming the new holder",
               "1", 0, 0, "stopped at its next check")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.communicate()
        if taker is not None:
            taker.release()
