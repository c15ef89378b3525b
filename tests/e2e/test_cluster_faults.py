"""Faults that need a Ray of their own: a lost node (ray.cluster_utils.Cluster, two nodes on one
host) and a worker killed by Ray's memory monitor. Each runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _scenario(name: str, tmp_path, model: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.cluster_scenarios", name, str(tmp_path), model],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_node_lost_while_busy(tmp_path, tiny_model_dir):
    res = _scenario("node_loss", tmp_path, tiny_model_dir)
    s = res["summary"]
    assert res["removed"], "the node was not removed"
    assert s["shards_done"] == 6 and s["shards_failed"] == 0
    assert s["images"] == 24 and s["sample_errors"] == 0
    assert res["verify_problems"] == []
    from tests.e2e.helpers import record

    record("node lost", "a node holding a busy worker removed (2-node Cluster)",
           "its shards re-dispatched to the other node", "<= 2", 0, 0, res["recovery_seconds"])


def test_worker_killed_for_memory_is_bounded(tmp_path, tiny_model_dir):
    res = _scenario("oom", tmp_path, tiny_model_dir)
    s = res["summary"]
    assert s["shards_done"] == 2 and s["shards_failed"] == 1, res
    assert s["failed_shards"]["00001"].startswith("oom: ") and "low on memory" in s["failed_shards"]["00001"], res
    assert s["worker_start_deaths"] == 1, res  # killed while loading the model: started again, not refused
    assert res["failed_record"]["reason"] == "oom" and res["failed_record"]["attempts"] == 3
    assert res["verify_problems"] == []
    from tests.e2e.helpers import record

    record("worker killed for memory", "Ray's memory monitor kills the first worker while it starts, then the "
           "worker on every try of one shard",
           "worker started again; 3 attempts, then failed with reason oom; the other shards committed", "3", 0, 0,
           f"gave up after {res['seconds']}")
