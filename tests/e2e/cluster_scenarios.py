"""Scenarios that need a Ray of their own (run in a subprocess by test_cluster_faults.py).

    python -m tests.e2e.cluster_scenarios node_loss WORKDIR MODEL_DIR
    python -m tests.e2e.cluster_scenarios oom WORKDIR MODEL_DIR

Each prints one JSON line with what happened; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def node_loss(workdir: str, model: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import JobConfig
    from pipeline.driver import run_job
    from pipeline.verify import verify
    from tests import corpus

    fast = {"health_check_period_ms": 300, "health_check_failure_threshold": 3, "health_check_timeout_ms": 300}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast})
    doomed = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    corpus.make_shards(f"{workdir}/in", n_shards=6, per_shard=4, seed=51)
    os.environ["WINTOK_FAILPOINTS"] = "shard_start=sleep:1.5"
    out = f"{workdir}/out"
    removed: dict = {}

    def remove_busy_node() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            names = [n["name"] if isinstance(n, dict) else n for n in ray.util.list_named_actors(True)]
            for name in names:
                if not name.startswith("wintok-worker-"):
                    continue
                try:
                    actor = ray.get_actor(name)
                    on_doomed = ray.get(actor.node_id.remote(), timeout=5) == doomed.node_id
                except Exception:  # noqa: BLE001 - not ready yet
                    continue
                manifests = os.listdir(f"{out}/_manifest") if os.path.isdir(f"{out}/_manifest") else []
                if on_doomed and len(manifests) >= 1:
                    removed["at_manifests"] = len(manifests)
                    removed["t"] = time.time()
                    cluster.remove_node(doomed, allow_graceful=False)
                    return
            time.sleep(0.1)

    t = threading.Thread(target=remove_busy_node, daemon=True)
    t.start()
    cfg = JobConfig(inputs=(f"{workdir}/in/*.tar",), output=out, model=model, workers=2, batch_size=4,
                    decode_threads=1, max_retries=3, retry_backoff=0.1, progress=False)
    summary = run_job(cfg)
    end = time.time()
    t.join()
    report = verify(out)
    result = {"summary": summary.to_dict(), "removed": removed, "verify_problems": report.problems,
              "recovery_seconds": round(end - removed.get("t", end), 2)}
    ray.shutdown()
    cluster.shutdown()
    return result


def oom(workdir: str, model: str) -> dict:
    import psutil

    # the threshold leaves Ray and a loaded worker ample room (15% of the machine; they use ~1.5 GiB)
    # and the failpoint's allocation (30%) goes well past it: only the poisoned shard trips it
    used = psutil.virtual_memory().percent / 100
    os.environ["RAY_memory_usage_threshold"] = f"{min(0.95, used + 0.15):.3f}"
    os.environ["RAY_memory_monitor_refresh_ms"] = "100"
    import ray

    from pipeline.config import JobConfig
    from pipeline.driver import run_job
    from pipeline.verify import verify
    from tests import corpus

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    corpus.make_shards(f"{workdir}/in", n_shards=3, per_shard=3, seed=52)
    gb = psutil.virtual_memory().total / 2**30
    mb = int(gb * 0.30 * 1024)
    # the first worker is killed while it starts, then every attempt at shard 00001 kills its worker
    os.environ["WINTOK_FAILPOINTS"] = f"worker_start=once-alloc:{mb};shard_start@00001=alloc:{mb}"
    os.environ["WINTOK_FAILPOINT_MARK"] = f"{workdir}/start-mark"
    out = f"{workdir}/out"
    cfg = JobConfig(inputs=(f"{workdir}/in/*.tar",), output=out, model=model, workers=1, batch_size=4,
                    decode_threads=1, max_retries=2, retry_backoff=0.1, progress=False)
    t0 = time.time()
    summary = run_job(cfg)
    failed = {}
    if os.path.exists(f"{out}/_failed/00001.json"):
        failed = json.load(open(f"{out}/_failed/00001.json"))
    result = {"summary": summary.to_dict(), "failed_record": failed, "verify_problems": verify(out).problems,
              "seconds": round(time.time() - t0, 2), "threshold": os.environ["RAY_memory_usage_threshold"]}
    ray.shutdown()
    return result


if __name__ == "__main__":
    scenario, workdir, model = sys.argv[1:4]
    res = {"node_loss": node_loss, "oom": oom}[scenario](workdir, model)
    print("RESULT " + json.dumps(res), flush=True)
