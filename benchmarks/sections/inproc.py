"""(c') The pipeline's worker in this process, no Ray: `ShardProcessor.process` shard after shard.

A diagnostic of where the worker's time goes: the model (the `encode` stage), the sink (error
records, columns, Parquet) and of it the sink's `add_rows`, and how long the model thread waits
on its queues. The worker is configured the way the driver configures it (`pipeline.cluster.shape_for`
gives its decoders, decode mode and torch threads); stage times are the stats its stages keep
(`ShardProcessor.stats`), summed over the shards by `StageTimes.add`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import job_config, maxrss_mib, pipeline_shape
from benchmarks.corpus import shard_urls


def child_env(spec: dict[str, Any]) -> dict[str, str]:
    """What the pipeline's CPU actors get (`pipeline.worker.make_actor_class` sets it for a model on
    the CPU; it is not exposed, so this one line mirrors it): torch's OpenMP threads do not spin."""
    return {} if pipeline_shape(spec).num_gpus else {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class StageTimes:
    """Seconds spent per stage over several shards, and the threads each stage ran on."""

    spent: dict[str, float] = field(default_factory=lambda: {"model": 0.0, "write": 0.0, "consume": 0.0})
    threads: dict[str, set[str]] = field(default_factory=lambda: {"model": set(), "consume": set()})

    def add(self, stats: dict[str, Any]) -> None:
        """One shard's `ShardProcessor.stats`: the model is the `encode` stage, consume the `sink`,
        write the sink's `add_rows` (Arrow rows and local Parquet)."""
        for key, stage in (("model", "encode"), ("consume", "sink"), ("write", "write")):
            self.spent[key] += stats[stage].busy
            if key in self.threads:
                self.threads[key].add(stats[stage].thread)


def worker_config(spec: dict[str, Any], out: str) -> Any:
    """The `WorkerConfig` the driver gives each worker for this spec (its shape from `shape_for`)."""
    from pipeline.driver import model_spec
    from pipeline.shard.processor import WorkerConfig

    cfg = job_config(spec, out)
    shape = pipeline_shape(spec)
    return WorkerConfig(output=out, model=model_spec(cfg), resize=cfg.resize, max_image_pixels=cfg.max_image_pixels,
                        batch_size=cfg.batch_size, decode_threads=shape.decode_threads, decode_mode=shape.decode_mode,
                        prefetch=cfg.prefetch, row_group_rows=cfg.row_group_rows, torch_threads=shape.torch_threads)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from pipeline.driver import run_fingerprint
    from pipeline.protocol import ShardTask
    from pipeline.shard.processor import ShardProcessor

    out = str(Path(spec["work"]) / "out-inproc")
    shutil.rmtree(out, ignore_errors=True)
    fp = run_fingerprint(job_config(spec, out))
    wcfg = dataclasses.replace(worker_config(spec, out), fingerprint=fp)
    t_load = time.perf_counter()
    proc = ShardProcessor(wcfg)
    load_s = time.perf_counter() - t_load
    rows = 0
    times = StageTimes()
    t0 = time.perf_counter()
    for url in shard_urls(spec["corpus"]):
        r = proc.process(ShardTask(url, Path(url).stem, 1))
        if not r.ok:
            raise RuntimeError(f"inproc shard failed: {r}")
        rows += json.loads(r.manifest)["rows"]
        times.add(proc.stats)
    secs = time.perf_counter() - t0
    proc.close()
    return {"images": rows, "seconds": round(secs, 3), "img_s": round(rows / secs, 2),
            "model_load_s": round(load_s, 2), "decode_mode": wcfg.decode_mode, **_shares(times, secs),
            "maxrss_mib": maxrss_mib()}


def _shares(times: StageTimes, secs: float) -> dict[str, Any]:
    """Shares of the wall time. The worker's threads: reader+decode pool -> model -> sink (the
    calling thread). Whatever thread the sink runs on, the model's share of the wall is how busy
    the model is; the rest of the model thread's time it waits for decoded batches (or, in a
    worker that writes in the model's thread, writes)."""
    spent = times.spent
    in_model_thread = bool(times.threads["consume"] & times.threads["model"])
    busy = spent["consume"] if in_model_thread else spent["model"]
    return {"share_model": round(spent["model"] / secs, 3), "share_write": round(spent["write"] / secs, 3),
            "share_consume": round(spent["consume"] / secs, 3), "consume_in_model_thread": in_model_thread,
            "share_model_thread_idle": round(1 - busy / secs, 3)}
