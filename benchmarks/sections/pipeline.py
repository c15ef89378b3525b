"""(c) This pipeline end to end: `pipeline.driver.run_job(JobConfig(...))` on a local Ray.

Ray is started the pipeline's own way (`pipeline.cluster.start_ray`) before the clock starts.
The steady rate comes from the commit records: the shards committed after the first one.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import job_config, maxrss_mib, steady


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import ray

    from pipeline.cluster import start_ray, worker_shape
    from pipeline.driver import run_job

    out = str(Path(spec["work"]) / f"out-pipeline-{spec.get('tag', 'x')}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = job_config(spec, out)
    t_ray = time.perf_counter()
    start_ray(cfg)
    ray_s = time.perf_counter() - t_ray
    mode = worker_shape(cfg, spec["corpus"]["shards"]).decode_mode  # what the driver picks on this Ray
    t0 = time.perf_counter()
    summary = run_job(cfg)
    secs = time.perf_counter() - t0
    if not summary.ok or summary.images != spec["corpus"]["images"]:
        raise RuntimeError(f"pipeline run incomplete: {summary}")
    ray.shutdown()
    return {"images": summary.images, "seconds": round(secs, 3), "img_s": round(summary.images / secs, 2),
            "workers": summary.workers, "ray_start_s": round(ray_s, 2),
            "summary_wall_s": round(summary.wall_seconds, 2), "decode_mode": mode,
            **manifest_rates(Path(out)), "maxrss_mib": maxrss_mib()}


def manifest_rates(out: Path) -> dict[str, Any]:
    """Steady-state rate from the commit records (OUTPUT/_manifest/<stem>.json, the documented
    output layout): the shards committed after the first one."""
    events, busy, rows = [], 0.0, 0
    for f in (out / "_manifest").glob("*.json"):
        m = json.loads(f.read_text())
        events.append((dt.datetime.fromisoformat(m["finished_at"]).timestamp(), int(m["rows"])))
        busy += float(m.get("seconds") or 0.0)
        rows += int(m["rows"])
    return {"steady_img_s": steady(events), "shards": len(events),
            "worker_busy_img_s": round(rows / busy, 2) if busy else None}
