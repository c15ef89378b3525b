"""A real two-raylet Ray cluster on this host (`ray start --head` + `ray start --address`, one CPU
each, see ray_processes.py), one per module: `wintok tokenize --address` spreads shards over both
nodes; `wintok submit` runs the same job through the head's Jobs server (S3 credentials from the
nodes' own environment, none in the submission); losing the second node mid-run (its raylet
killed) leaves every sample exactly once. The default run has the first (~50 s with the cluster's
start on 2 cores); `-m slow` runs the submitted job and the node losses (~3 min more)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from tests import corpus
from tests.e2e.conftest import FAKE_AWS
from tests.e2e.helpers import ids_by_key, read_output, record
from tests.e2e.ray_processes import REPO, RayStartCluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    # the nodes' own environment holds the S3 credentials (as `export AWS_...; ray start` does)
    c = RayStartCluster(env=FAKE_AWS)
    try:
        c.add_node("second")
        c.wait_nodes(2)
        yield c
    finally:
        c.shutdown()


def _wintok(cluster: RayStartCluster, *args: str, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    e = cluster.client_env(env)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=timeout)


def _summary(stdout: str) -> dict:
    """The --json summary; Ray's own lines (`(raylet) The node ... is dead`) may come before it on the
    stdout of a driver that joined a cluster."""
    return json.loads(stdout[stdout.rfind('{\n "shards_planned"'):])


def _nodes_of(output: str) -> dict[str, str]:
    return {stem: m["node"] for stem, m in read_output(output)["manifests"].items()}


def _exactly_once(output: str, n_samples: int) -> None:
    out = read_output(output)
    ids = ids_by_key(out["rows"])  # asserts no key twice
    errors = sum(t.num_rows for t in out["errors"].values())
    assert len(ids) + errors == n_samples and errors == 0


def test_tokenize_address_spreads_shards_over_both_nodes(cluster, tmp_path, tiny_model_dir):
    corpus.make_shards(tmp_path / "in", n_shards=6, per_shard=2, seed=141)
    out = str(tmp_path / "out")
    # each shard takes >= 1 s: the first worker up cannot take them all before the other is ready
    r = _wintok(cluster, "tokenize", f"{tmp_path}/in/*.tar", out, "--model", tiny_model_dir, "--address", cluster.address,
                "--workers", "2", "--batch-size", "2", "--decode-threads", "1", "--no-progress", "--json",
                env={"WINTOK_FAILPOINTS": "shard_start=sleep:1"})
    assert r.returncode == 0, r.stderr[-3000:]
    s = _summary(r.stdout)
    assert s["shards_done"] == 6 and s["images"] == 12 and s["workers"] == 2
    nodes = _nodes_of(out)
    assert set(nodes.values()) == {cluster.node_id("head"), cluster.node_id("second")}, nodes
    _exactly_once(out, 12)
    assert _wintok(cluster, "verify", out).returncode == 0


def _job_file(tmp_path, name: str, inputs: str, output: str, model: str, **kw) -> str:
    job = {"inputs": [inputs], "output": output, "model": model, "workers": 2, "batch_size": 2,
           "decode_threads": 1, "retry_backoff": 0.1, **kw}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def _status(cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster.dashboard).get_job_status(job_id).value)


def _wait_job(cluster, job_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _status(cluster, job_id) in ENDED:
            r = _wintok(cluster, "submit", "--status", job_id, "--address", cluster.dashboard, "--json", timeout=60)
            return json.loads(r.stdout)
        time.sleep(1)
    raise TimeoutError(f"job {job_id} did not end in {timeout:g} s")


@pytest.mark.slow  # ~65 s on 2 cores (the job's runtime env, driver and workers start on the cluster)
def test_submit_runs_the_job_once_with_no_secret_in_the_submission(cluster, tmp_path, tiny_model_dir,
                                                                   s3_endpoint, s3fs_client):
    bucket = f"wintok-jobs-{uuid.uuid4().hex[:8]}"
    s3fs_client.mkdir(bucket)
    corpus.make_shards(tmp_path / "in", n_shards=3, per_shard=2, seed=142)
    out = f"s3://{bucket}/out"
    job = _job_file(tmp_path, "job", f"{tmp_path}/in/*.tar", out, tiny_model_dir, s3_endpoint_url=s3_endpoint)
    r = _wintok(cluster, "submit", job, "--address", cluster.dashboard, env=FAKE_AWS)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"wintok submit --logs {job_id} --follow --address {cluster.dashboard}" in r.stdout
    again = _wintok(cluster, "submit", job, "--address", cluster.dashboard, env=FAKE_AWS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"job {job_id} was submitted before" in again.stdout and "Traceback" not in again.stderr
    d = _wait_job(cluster, job_id)
    logs = _wintok(cluster, "submit", "--logs", job_id, "--follow", "--address", cluster.dashboard,
                   timeout=60).stdout  # an ended job: the whole log, then the command ends
    assert d["status"] == "SUCCEEDED", logs[-3000:]
    assert "shards: 3 done" in logs
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(cluster.dashboard)
    assert [j.submission_id for j in jobs.list_jobs()].count(job_id) == 1
    submitted = json.dumps(jobs.get_job_info(job_id).model_dump(), default=str)
    for secret in (FAKE_AWS["AWS_SECRET_ACCESS_KEY"], FAKE_AWS["AWS_SESSION_TOKEN"]):
        assert secret not in submitted
    v = _wintok(cluster, "verify", out, "--s3-endpoint-url", s3_endpoint, env=FAKE_AWS)
    assert v.returncode == 0, v.stdout + v.stderr[-2000:]
    assert len(s3fs_client.ls(f"{bucket}/out/_manifest")) == 3


def _ensure_second_node(cluster) -> str:
    if "second" not in cluster.nodes:  # a node-loss case killed it
        cluster.add_node("second")
        cluster.wait_nodes(2)
    return cluster.node_id("second")


@pytest.mark.slow
def test_stop_is_graceful_and_resubmit_takes_the_job_up_again(cluster, tmp_path, tiny_model_dir):
    _ensure_second_node(cluster)
    corpus.make_shards(tmp_path / "in", n_shards=12, per_shard=2, seed=144)
    out = str(tmp_path / "out")
    job = _job_file(tmp_path, "job", f"{tmp_path}/in/*.tar", out, tiny_model_dir)
    # a shard takes > 4 s: longer than Ray's default 3 s between SIGTERM and SIGKILL of a stopped job
    r = _wintok(cluster, "submit", job, "--address", cluster.dashboard, env={"WINTOK_FAILPOINTS": "shard_start=sleep:4"})
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.split("submitted job ", 1)[1].split()[0]
    deadline = time.time() + 180
    while not (os.path.isdir(f"{out}/_manifest") and os.listdir(f"{out}/_manifest")) and time.time() < deadline:
        time.sleep(0.2)
    stop = _wintok(cluster, "submit", "--stop", job_id, "--address", cluster.dashboard)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stderr[-2000:]
    d = _wait_job(cluster, job_id)
    logs = _wintok(cluster, "submit", "--logs", job_id, "--address", cluster.dashboard).stdout
    assert d["status"] == "STOPPED", logs[-3000:]
    # the driver had its stop_grace (the shards in flight, queued ones included, take ~8 s): they
    # finished, the rest was not started, the lease was released
    assert "SIGTERM: starting no new shard" in logs and "wintok: stopped by SIGTERM" in logs, logs[-3000:]
    assert "the lease is released" in logs and "abandoned" not in logs, logs[-3000:]
    assert not os.path.exists(f"{out}/_lease.json")
    committed = len(os.listdir(f"{out}/_manifest"))
    assert 4 <= committed < 12
    again = _wintok(cluster, "submit", job, "--address", cluster.dashboard)
    assert f"job {job_id} was submitted before (status STOPPED)" in again.stdout and "--resubmit" in again.stdout
    r = _wintok(cluster, "submit", job, "--address", cluster.dashboard, "--resubmit")
    assert r.returncode == 0 and f"submitted job {job_id}-2 " in r.stdout, r.stdout + r.stderr[-2000:]
    assert _wait_job(cluster, f"{job_id}-2")["status"] == "SUCCEEDED"
    logs = _wintok(cluster, "submit", "--logs", f"{job_id}-2", "--address", cluster.dashboard).stdout
    assert f"shards: {12 - committed} done, {committed} skipped" in logs, logs[-3000:]
    _exactly_once(out, 24)
    assert _wintok(cluster, "verify", out).returncode == 0


def _kill_second_node_once_busy(cluster, out: str, second: str, running, timeout: float = 180) -> dict:
    """Wait for the second node's first commit (its worker then runs the shard queued behind it),
    then kill that node's raylet and everything on it. `running()`: the run has not ended."""
    deadline = time.time() + timeout
    while time.time() < deadline and running():
        if os.path.isdir(f"{out}/_manifest"):
            try:
                if second in _nodes_of(out).values():
                    n = len(os.listdir(f"{out}/_manifest"))
                    cluster.kill_node("second")
                    return {"at_manifests": n, "t": time.time()}
            except (ValueError, OSError):  # a manifest being written
                pass
        time.sleep(0.1)
    raise AssertionError(f"the second node committed nothing before the run ended: {_nodes_of(out)}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tokenize", "submit"])
def test_losing_a_node_mid_run_keeps_every_sample_exactly_once(cluster, tmp_path, tiny_model_dir, how):
    second = _ensure_second_node(cluster)
    # 8 shards of >= 2 s: the head's worker alone would take 16 s, time for the other one to start
    corpus.make_shards(tmp_path / "in", n_shards=8, per_shard=2, seed=143)
    out = str(tmp_path / "out")
    slow = {"WINTOK_FAILPOINTS": "shard_start=sleep:2"}
    if how == "tokenize":
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "tokenize", f"{tmp_path}/in/*.tar", out, "--model", tiny_model_dir,
             "--address", cluster.address, "--workers", "2", "--batch-size", "2", "--decode-threads", "1",
             "--retry-backoff", "0.1", "--no-progress", "--json"],
            cwd=REPO, env=cluster.client_env(slow), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            killed = _kill_second_node_once_busy(cluster, out, second, lambda: proc.poll() is None)
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()[1][-3000:]) from None
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert _summary(stdout)["shards_done"] == 8
    else:
        job = _job_file(tmp_path, "job", f"{tmp_path}/in/*.tar", out, tiny_model_dir)
        r = _wintok(cluster, "submit", job, "--address", cluster.dashboard, env=slow)  # the failpoint travels along
        assert r.returncode == 0, r.stderr[-3000:]
        job_id = r.stdout.split("submitted job ", 1)[1].split()[0]
        killed = _kill_second_node_once_busy(cluster, out, second, lambda: _status(cluster, job_id) not in ENDED)
        d = _wait_job(cluster, job_id)
        assert d["status"] == "SUCCEEDED", _wintok(cluster, "submit", "--logs", job_id, "--address", cluster.dashboard).stdout
    recovery = time.time() - killed["t"]
    manifests = read_output(out)["manifests"]
    assert len(manifests) == 8 and second in {m["node"] for m in manifests.values()}
    assert max(m["attempts"] for m in manifests.values()) >= 2  # a shard was running there: done again
    _exactly_once(out, 16)
    assert _wintok(cluster, "verify", out).returncode == 0
    record(f"node lost ({how})", "the second raylet of a `ray start` cluster killed while its worker runs a shard",
           "its shards re-dispatched to the head's worker; 16 samples exactly once", ">= 2", 0, 0, recovery)
