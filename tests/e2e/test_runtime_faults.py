"""Faults of the run itself, on a local Ray: a shard that stops making progress (the watchdog),
failures that cannot go away (no backoff), and SIGTERM (preemption). After each the output
must verify clean: nothing half-committed, nothing committed after the driver is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pipeline.config import JobConfig
from pipeline.driver import run_job
from pipeline.verify import verify
from tests import corpus
from tests.e2e.helpers import record, small_job

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _job(inputs, output, model, **kw) -> JobConfig:
    return small_job(inputs, output, model, **{"max_retries": 1, **kw})


def _files_of(out, stem: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
                  if f.startswith(stem))


def test_stuck_shard_times_out_and_its_queue_goes_on(tmp_path, ray_session, tiny_model_dir, monkeypatch):
    """Shard 00001 hangs at its start on every attempt; 00002 is queued behind it on the only
    worker. The watchdog fails 00001 (timeout) twice, the worker is replaced each time, and
    00002 runs on the replacement without being charged an attempt."""
    corpus.make_shards(tmp_path / "in", n_shards=4, per_shard=3, seed=51)
    monkeypatch.setenv("WINTOK_FAILPOINTS", "shard_start@00001=sleep:300")
    out = tmp_path / "out"
    t0 = time.monotonic()
    summary = run_job(_job([f"{tmp_path}/in/{{00000..00003}}.tar"], out, tiny_model_dir, shard_timeout=3))
    wall = time.monotonic() - t0
    assert wall < 120, f"the run took {wall:.0f} s: the hung shard was not bounded"
    assert summary.done == 3 and summary.failed == 1 and not summary.ok
    assert summary.failures["00001"].startswith("timeout: no progress for")
    rec = json.loads((out / "_failed" / "00001.json").read_text())
    assert rec["reason"] == "timeout" and rec["attempts"] == 2 and len(rec["history"]) == 2
    for stem in ("00000", "00002", "00003"):
        m = json.loads((out / "_manifest" / f"{stem}.json").read_text())
        assert m["attempts"] == 1 and m["rows"] == 3, (stem, m)
    assert _files_of(out, "00001") == ["_failed/00001.json"]  # nothing of it half-written
    report = verify(str(out))
    assert report.clean() and not report.uncommitted, report.render()
    record("shard that hangs", "shard 00001 sleeps 300 s at its start on every attempt (--shard-timeout 3)",
           "timed out twice, worker replaced each time; the shard queued behind it ran elsewhere; failed "
           "with reason timeout, the other 3 committed", "2", 0, 0, f"run ended after {wall:.2f}")


def test_negative_pax_size_fails_its_shard_at_once(tmp_path, ray_session, tiny_model_dir):
    """A pax header that gives a member a negative size (the parser used to move backwards and
    loop on it forever): the shard fails at once as shard_read, the others commit."""
    import io
    import tarfile

    corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=2, seed=55)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("000000.jpg")
        info.size = 0
        info.pax_headers = {"size": "-1536"}
        tf.addfile(info, io.BytesIO(b""))
    (tmp_path / "in" / "evil.tar").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    t0 = time.monotonic()
    summary = run_job(_job([f"{tmp_path}/in/00000.tar", f"{tmp_path}/in/evil.tar", f"{tmp_path}/in/00001.tar"],
                           out, tiny_model_dir, max_retries=3, shard_timeout=30))
    wall = time.monotonic() - t0
    assert summary.done == 2 and summary.failed == 1 and summary.images == 4
    rec = json.loads((out / "_failed" / "evil.json").read_text())
    assert rec["reason"] == "shard_read" and rec["attempts"] == 1 and "size" in rec["error"], rec
    assert verify(str(out)).clean()
    record("negative pax size", "a shard whose pax header gives a member size -1536",
           "failed at once as shard_read (no loop, no retry); the other 2 committed", "1", 0, 0,
           f"run ended after {wall:.2f}")


def test_shard_stuck_once_succeeds_on_retry(tmp_path, ray_session, tiny_model_dir, monkeypatch):
    """A decode that hangs in the middle of shard 00001 (its first sample read and decoded, the
    second never returns), on the first attempt only: the retry commits the whole shard."""
    plan = corpus.shard_plan(3, 3, seed=52)
    corpus.make_shards(tmp_path / "in", n_shards=3, per_shard=3, seed=52)
    monkeypatch.setenv("WINTOK_FAILPOINTS", f"decode@{plan[1][1]['key']}=once-sleep:300")
    monkeypatch.setenv("WINTOK_FAILPOINT_MARK", str(tmp_path / "mark"))
    out = tmp_path / "out"
    t0 = time.monotonic()
    summary = run_job(_job([f"{tmp_path}/in/{{00000..00002}}.tar"], out, tiny_model_dir, shard_timeout=3))
    assert (tmp_path / "mark").exists(), "the fault was not injected"
    assert time.monotonic() - t0 < 120
    assert summary.ok and summary.done == 3 and summary.images == 9
    m = json.loads((out / "_manifest" / "00001.json").read_text())
    assert m["attempts"] == 2 and m["rows"] == 3
    assert not (out / "_failed" / "00001.json").exists()
    assert verify(str(out)).clean()
    record("shard that hangs once", "one decode in shard 00001 sleeps 300 s on the first attempt (--shard-timeout 3)",
           "timed out, worker replaced, the retry committed the whole shard", "2", 0, 0,
           f"run ended after {time.monotonic() - t0:.2f}")


def test_permanent_failures_are_not_retried(tmp_path, ray_session, tiny_model_dir):
    """A missing input and a file that is not a tar fail at their first attempt, with their
    reason; the backoff is long enough that one retry would show in the run's time."""
    corpus.make_shards(tmp_path / "in", n_shards=1, per_shard=2, seed=53)
    (tmp_path / "in" / "notatar.tar").write_bytes(b"this is not a tar archive\n" * 100)
    inputs = [f"{tmp_path}/in/00000.tar", f"{tmp_path}/in/missing.tar", f"{tmp_path}/in/notatar.tar"]
    out = tmp_path / "out"
    t0 = time.monotonic()
    summary = run_job(_job(inputs, out, tiny_model_dir, max_retries=3, retry_backoff=100.0))
    wall = time.monotonic() - t0
    assert wall < 45, f"{wall:.0f} s: a permanent failure was retried (the first retry waits >= 50 s)"
    assert summary.done == 1 and summary.failed == 2
    for stem, reason in (("missing", "not_found"), ("notatar", "shard_read")):
        rec = json.loads((out / "_failed" / f"{stem}.json").read_text())
        assert rec["reason"] == reason and rec["attempts"] == 1 and len(rec["history"]) == 1, rec
        assert summary.failures[stem].startswith(reason)
    assert "missing.tar" in summary.failures["missing"]
    assert verify(str(out)).clean()
    record("failures that cannot go away", "a missing input and a file that is not a tar (--retry-backoff 100)",
           "each failed at its first attempt (not_found, shard_read), no backoff; the good shard committed",
           "1", 0, 0, f"run ended after {wall:.2f}")


def _descendants(pid: int) -> set[psutil.Process]:
    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


def test_sigterm_stops_cleanly(tmp_path, tiny_model_dir):
    """`wintok tokenize` on its own local Ray gets SIGTERM while a shard is in flight (sleeping
    longer than the stop grace): it exits within a bound with one clear line, releases the
    lease, stops its Ray, and nothing is committed after it exited."""
    corpus.make_shards(tmp_path / "in", n_shards=4, per_shard=2, seed=54)
    job = tmp_path / "job.yaml"
    job.write_text("stop_grace: 2\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(WINTOK_FAILPOINTS="shard_start=sleep:6", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "pipeline.cli", "tokenize", "--job", str(job),
           f"{tmp_path}/in/{{00000..00003}}.tar", str(out), "--model", tiny_model_dir, "--workers", "1",
           "--batch-size", "4", "--max-retries", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        procs: set[psutil.Process] = set()
        while time.time() < deadline and proc.poll() is None:
            procs |= _descendants(proc.pid)  # Ray's processes and the workers, as they appear
            if (out / "_manifest").is_dir() and os.listdir(out / "_manifest"):
                break  # 00000 is committed: 00001 is sleeping in the worker now
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        procs |= _descendants(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - t0
    exited = set(os.listdir(out / "_manifest"))
    err_text = err.decode()
    assert took < 40, f"took {took:.0f} s to stop"
    assert proc.returncode == 128 + signal.SIGTERM, err_text[-3000:]
    last = err_text.strip().splitlines()[-1]
    assert last.startswith("wintok: stopped by SIGTERM") and "rerun the same command" in last, err_text[-3000:]
    assert "Traceback" not in err_text, err_text[-3000:]
    assert not (out / "_lease.json").exists()
    time.sleep(8)  # longer than the abandoned shard's sleep: it would have committed by now
    assert set(os.listdir(out / "_manifest")) == exited
    assert len(exited) < 4
    report = verify(str(out))
    assert report.clean(), report.render()
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running after the driver exited: {[p.name() for p in alive]}"
    record("SIGTERM (preemption)", "SIGTERM to the driver while a shard sleeps past stop_grace (2 s)",
           f"exit 143 with one line; lease released, Ray stopped, nothing committed after exit; "
           f"{len(exited)} of 4 committed, the rest resume on rerun", "1", 0, 0, f"exited after {took:.2f}")
