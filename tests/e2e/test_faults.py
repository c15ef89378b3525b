"""Fault injection on a local Ray: dead workers, dead drivers, crashes before commit, poison
samples, concurrent runs, memory kills, bad models, leaked credentials. After each fault the
output must verify clean: nothing lost, nothing duplicated, nothing partial visible."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pipeline.cli import main as cli_main
from pipeline.driver import RunRefused, run_job
from pipeline.io import Storage
from pipeline.lease import Lease, LeaseHeld
from pipeline.verify import verify
from tests import corpus
from tests.e2e.helpers import file_states, ids_by_key, read_output, record, small_job

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_job = small_job


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_session, tiny_model_dir):
    """An undisturbed run of the corpus every fault test uses."""
    root = tmp_path_factory.mktemp("ref")
    corpus.make_shards(root / "in", n_shards=4, per_shard=5, seed=41, broken=True)
    cfg = _job([f"{root}/in/{{00000..00003}}.tar"], root / "out", tiny_model_dir)
    assert run_job(cfg).ok
    return root, read_output(str(root / "out"))


def _same_as_reference(out_dir, reference) -> None:
    out = read_output(str(out_dir))
    ref = reference[1]
    assert set(out["manifests"]) == set(ref["manifests"])
    a, b = ids_by_key(out["rows"]), ids_by_key(ref["rows"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for stem in ref["errors"]:
        assert out["errors"][stem].column("key").to_pylist() == ref["errors"][stem].column("key").to_pylist()
    report = verify(str(out_dir))
    assert report.clean(), report.render()


def _named_workers(ray):
    return [n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors(all_namespaces=True)
            if (n["name"] if isinstance(n, dict) else n).startswith("wintok-worker-")]


def _kill_when(predicate, action, timeout=60.0) -> threading.Thread:
    def loop():
        end = time.time() + timeout
        while time.time() < end:
            if predicate():
                action()
                return
            time.sleep(0.05)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_worker_killed_mid_shard(how, tmp_path, reference, ray_session, tiny_model_dir, monkeypatch):
    ray = ray_session
    monkeypatch.setenv("WINTOK_FAILPOINTS", "shard_start@00001=sleep:2")
    root = reference[0]
    out = tmp_path / "out"
    killed: list[str] = []
    killed_at: list[float] = []

    def busy() -> bool:
        return bool(_named_workers(ray)) and os.path.isdir(out / "_manifest") and \
            len(os.listdir(out / "_manifest")) >= 1 and not (out / "_manifest" / "00001.json").exists()

    def kill():
        for name in _named_workers(ray):
            actor = ray.get_actor(name, namespace=ray.get_runtime_context().namespace)
            if how == "ray.kill":
                ray.kill(actor, no_restart=True)
            else:
                os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
            killed.append(name)
            killed_at.append(time.time())

    t = _kill_when(busy, kill)
    summary = run_job(_job([f"{root}/in/{{00000..00003}}.tar"], out, tiny_model_dir))
    end = time.time()
    t.join()
    assert killed, "the fault was not injected"
    assert summary.ok
    _same_as_reference(out, reference)
    attempts = json.loads((out / "_manifest" / "00001.json").read_text())["attempts"]
    assert attempts >= 2
    record(f"worker killed mid-shard ({how})", "the busy actor killed while shard 00001 runs",
           "shard retried on a new actor, identical output", str(attempts), 0, 0, end - killed_at[0])


def test_crash_between_data_and_manifest(tmp_path, reference, ray_session, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WINTOK_FAILPOINTS", "before_manifest@00002=once-exit")
    monkeypatch.setenv("WINTOK_FAILPOINT_MARK", str(tmp_path / "mark"))
    root, out = reference[0], tmp_path / "out"
    cfg = _job([f"{root}/in/{{00000..00003}}.tar"], out, tiny_model_dir, max_retries=0)
    first = run_job(cfg)
    assert (tmp_path / "mark").exists(), "the fault was not injected"
    assert first.failed == 1 and "00002" in first.failures and first.failures["00002"].startswith("worker_died")
    assert (out / "shards" / "00002.parquet").exists() and not (out / "_manifest" / "00002.json").exists()
    report = verify(str(out))
    assert report.clean() and "shards/00002.parquet" in report.uncommitted
    t0 = time.time()
    again = run_job(cfg)
    assert again.done == 1 and again.skipped == 3 and again.ok
    _same_as_reference(out, reference)
    record("crash between data upload and manifest", "worker process exits after the data upload",
           "uncommitted data file; the rerun overwrote it and committed once", "1 + rerun", 0, 0, time.time() - t0)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_poison_sample_is_quarantined(tmp_path, ray_session, tiny_model_dir, monkeypatch, mode):
    """Threads: the worker dies once, the safe-mode retry decodes in child processes.
    Processes: only a decoding child dies; the first attempt records the sample."""
    samples = corpus.good_samples(7, seed=43)
    corpus.write_tar(str(tmp_path / "00000.tar"), samples)
    poison = samples[4]["key"]
    monkeypatch.setenv("WINTOK_FAILPOINTS", f"decode@{poison}=exit")
    out = tmp_path / "out"
    t0 = time.time()
    summary = run_job(_job([str(tmp_path / "00000.tar")], out, tiny_model_dir, max_retries=2, decode_mode=mode))
    assert summary.ok and summary.images == 6 and summary.errors_by_reason == {"decoder_crashed": 1}
    attempts = {"threads": 2, "processes": 1}[mode]
    assert json.loads((out / "_manifest" / "00000.json").read_text())["attempts"] == attempts
    outcome = {"threads": "worker died once; safe-mode retry recorded the sample as decoder_crashed",
               "processes": "the decoding child died, the sample was confirmed alone and recorded as "
                            "decoder_crashed; no worker died"}[mode]
    record(f"poison sample, decode {mode}", "decoding one image kills its process, every time", outcome,
           str(attempts), 0, 0, time.time() - t0)
    data = read_output(str(out))
    assert data["errors"]["00000"].column("key").to_pylist() == [poison]
    assert sorted(data["rows"]["00000"].column("key").to_pylist()) == sorted(s["key"] for s in samples if s["key"] != poison)
    assert verify(str(out)).clean()


def test_decode_processes_give_the_reference_output(tmp_path, reference, ray_session, tiny_model_dir):
    root, out = reference[0], tmp_path / "out"
    summary = run_job(_job([f"{root}/in/{{00000..00003}}.tar"], out, tiny_model_dir, decode_mode="processes",
                           batch_size=3))
    assert summary.ok and summary.done == 4
    _same_as_reference(out, reference)


def test_driver_sigkilled_half_way_then_resumed(tmp_path, reference, ray_session, tiny_model_dir):
    root, out = reference[0], tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    env = dict(os.environ, WINTOK_FAILPOINTS="shard_start=sleep:1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "pipeline.cli", "tokenize", f"{root}/in/{{00000..00003}}.tar", str(out),
           "--model", tiny_model_dir, "--address", address, "--workers", "1", "--batch-size", "4",
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "_manifest").is_dir() and len(os.listdir(out / "_manifest")) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = set(os.listdir(out / "_manifest"))
    assert 2 <= len(committed) < 4
    before = file_states(str(out / "_manifest"))
    t0 = time.time()
    summary = run_job(_job([f"{root}/in/{{00000..00003}}.tar"], out, tiny_model_dir))
    assert summary.ok and summary.done == 4 - len(committed) and summary.skipped == len(committed)
    record("driver SIGKILLed half way", f"SIGKILL after {len(committed)} of 4 commits",
           f"rerun redid exactly the {4 - len(committed)} uncommitted shards", "1", 0, 0, time.time() - t0)
    assert {p: s for p, s in file_states(str(out / "_manifest")).items() if p in before} == before
    _same_as_reference(out, reference)


def test_two_runs_on_one_output(tmp_path, ray_session, tiny_model_dir, s3_endpoint, s3fs_client):
    corpus.make_shards(tmp_path / "in", n_shards=1, per_shard=2, seed=44)
    cfg = _job([f"{tmp_path}/in/00000.tar"], tmp_path / "out", tiny_model_dir)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from pipeline.io import Storage; from pipeline.lease import Lease;"
        "l = Lease(Storage(sys.argv[2])); l.acquire(); print('held', flush=True); time.sleep(60)"),
        REPO, str(tmp_path / "out")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(LeaseHeld, match="another run"):
            run_job(cfg)
        assert not (tmp_path / "out" / "_manifest").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_job(cfg).ok  # the dead holder's lease is taken over
    assert not (tmp_path / "out" / "_lease.json").exists()
    # conditional create on S3 (If-None-Match: *): exactly one of two leases wins
    s3fs_client.mkdir("wintok-lease")
    storage = Storage("s3://wintok-lease/out", __import__("pipeline.io", fromlist=["s3_options"])
                      .s3_options(s3_endpoint))
    first, second = Lease(storage, ttl=600), Lease(storage, ttl=600)
    second.host = "another-host"
    first.acquire()
    try:
        with pytest.raises(LeaseHeld):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()


def test_bad_model_is_one_clear_error_before_work(tmp_path, ray_session, capsys):
    corpus.make_shards(tmp_path / "in", n_shards=1, per_shard=2, seed=45)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02not really a checkpoint")
    for model in (str(tmp_path / "missing-model"), str(broken)):
        rc = cli_main(["tokenize", f"{tmp_path}/in/00000.tar", str(tmp_path / "out"), "--model", model,
                       "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("wintok: error:") and len(err.splitlines()) == 1, err
        assert "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_worker_dying_while_starting_is_started_again(tmp_path, reference, ray_session, tiny_model_dir,
                                                     monkeypatch):
    """A worker process that dies while loading its model (as when it is killed for memory) is
    started again after a backoff; the run completes with the reference output."""
    monkeypatch.setenv("WINTOK_FAILPOINTS", "worker_start=once-exit")
    monkeypatch.setenv("WINTOK_FAILPOINT_MARK", str(tmp_path / "mark"))
    root, out = reference[0], tmp_path / "out"
    t0 = time.time()
    summary = run_job(_job([f"{root}/in/{{00000..00003}}.tar"], out, tiny_model_dir))
    assert (tmp_path / "mark").exists(), "the fault was not injected"
    assert summary.ok and summary.done == 4 and summary.failed == 0
    _same_as_reference(out, reference)
    record("worker dies while starting", "the worker process exits while loading the model (first start)",
           "started again after a backoff; identical output", "2 starts", 0, 0, time.time() - t0)


def test_worker_that_never_starts_refuses_the_run(tmp_path, ray_session, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WINTOK_FAILPOINTS", "worker_start=exit")
    corpus.make_shards(tmp_path / "in", n_shards=1, per_shard=2, seed=47)
    cfg = _job([f"{tmp_path}/in/00000.tar"], tmp_path / "out", tiny_model_dir, max_retries=1)
    with pytest.raises(RunRefused, match=r"each died 2 times while loading the model .*fewer workers") as err:
        run_job(cfg)
    assert len(str(err.value).splitlines()) == 1
    assert not os.path.exists(tmp_path / "out" / "_manifest") or not os.listdir(tmp_path / "out" / "_manifest")


def test_credentials_never_written(tmp_path, ray_session, tiny_model_dir, s3_endpoint, s3fs_client, capfd):
    secret, key = "wintok-TEST-secret-9f3a77", "AKIAWINTOKTESTKEY01"
    s3fs_client.mkdir("wintok-creds")
    corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=2, seed=46)
    cfg = _job([f"{tmp_path}/in/*.tar"], "s3://wintok-creds/out", tiny_model_dir, s3_endpoint_url=s3_endpoint,
               s3_key=key, s3_secret=secret, max_retries=0)
    assert secret not in repr(cfg) and key not in repr(cfg)
    assert run_job(cfg).ok
    blobs = [s3fs_client.cat_file(p) for p in s3fs_client.find("wintok-creds/out")]
    assert len(blobs) >= 5
    for blob in blobs:
        assert secret.encode() not in blob and key.encode() not in blob
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err and key not in captured.out + captured.err


def test_verify_finds_damage(tmp_path, reference):
    out = tmp_path / "out"
    import shutil

    shutil.copytree(reference[0] / "out", out)
    assert verify(str(out)).clean()
    assert cli_main(["verify", str(out)]) == 0
    with open(out / "shards" / "00001.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    os.remove(out / "errors" / next(iter(sorted(os.listdir(out / "errors")))))
    report = verify(str(out))
    assert not report.clean()
    assert any("00001.parquet" in p and "sha256" in p for p in report.problems)
    assert any("missing" in p for p in report.problems)
    assert cli_main(["verify", str(out)]) == 1
