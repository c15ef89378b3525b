"""A Ray started by someone else on the machine (or a stale current-cluster file) must not stop a
local run: without --address / RAY_ADDRESS the pipeline starts a fresh local Ray of its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests import corpus

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def ray_tmp():
    # a short private temp dir: Ray's current-cluster file and sockets live there (socket paths
    # must stay under ~107 bytes, so not under pytest's long tmp_path)
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(ray_tmp: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=REPO, RAY_TMPDIR=ray_tmp, TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    return env


def _tokenize(tmp_path, ray_tmp: str, model: str) -> subprocess.CompletedProcess:
    corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=2, seed=81)
    cmd = [sys.executable, "-m", "pipeline.cli", "tokenize", f"{tmp_path}/in/{{00000..00001}}.tar",
           str(tmp_path / "out"), "--model", model, "--workers", "1", "--batch-size", "2", "--no-progress"]
    return subprocess.run(cmd, env=_env(ray_tmp), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_stale_current_cluster_file_does_not_stop_a_local_run(tmp_path, ray_tmp, tiny_model_dir):
    # what a killed `ray start` leaves: the file names a GCS that no longer answers
    os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write("127.0.0.1:1")
    r = _tokenize(tmp_path, ray_tmp, tiny_model_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "num_cpus and num_gpus must not be provided" not in r.stderr
    assert sorted(os.listdir(tmp_path / "out" / "_manifest")) == ["00000.json", "00001.json"]
    from tests.e2e.helpers import record

    record("stale Ray cluster file", "ray_current_cluster names a dead GCS", "a fresh local Ray; both shards "
           "committed", "1", 0, 0, "-")


def test_live_foreign_cluster_does_not_stop_a_local_run(tmp_path, ray_tmp, tiny_model_dir):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # someone else's cluster on this machine, with its current-cluster file where ray.init looks;
    # --block keeps it in the foreground so the test can stop exactly it (never `ray stop`,
    # which would stop every Ray on the machine)
    foreign = subprocess.Popen([ray_bin, "start", "--head", "--num-cpus=1", "--block", "--include-dashboard=false",
                                "--port=0"], env=_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        cluster_file = os.path.join(ray_tmp, "ray", "ray_current_cluster")
        deadline = time.time() + 90
        while not os.path.exists(cluster_file) and time.time() < deadline and foreign.poll() is None:
            time.sleep(0.2)
        assert os.path.exists(cluster_file), "the foreign Ray did not start"
        r = _tokenize(tmp_path, ray_tmp, tiny_model_dir)
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(os.listdir(tmp_path / "out" / "_manifest")) == ["00000.json", "00001.json"]
        assert foreign.poll() is None, "the run stopped the foreign cluster"
        from tests.e2e.helpers import record

        record("foreign Ray on the machine", "`ray start --head` by someone else", "a fresh local Ray; both "
               "shards committed; the foreign cluster kept running", "1", 0, 0, "-")
    finally:
        os.killpg(foreign.pid, signal.SIGTERM)
        try:
            foreign.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(foreign.pid, signal.SIGKILL)
            foreign.wait()
