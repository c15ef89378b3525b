"""(c') The pipeline's worker in this process, no Ray: `ShardProcessor.process` shard after shard.

A diagnostic of where the worker's time goes: the model (`Runner.run`), `_consume` (hash,
columns, Parquet) and of it `ShardWriter.add_rows`, and how long the model thread waits on
its queues. The worker is configured the way the driver configures it (`pipeline.cluster.shape_for`
gives its decoders, decode mode and torch threads); stage times come from `timed_worker_stages`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Iterator
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
    """Seconds spent per stage, and the threads each stage ran on."""

    spent: dict[str, float] = field(default_factory=lambda: {"model": 0.0, "write": 0.0, "consume": 0.0})
    threads: dict[str, set[int]] = field(default_factory=lambda: {"model": set(), "consume": set()})


@contextlib.contextmanager
def timed_worker_stages(proc: Any) -> Iterator[StageTimes]:
    """Time the worker's stages by wrapping them, in this process only, for the `with` block.

    Wraps `proc.runner.run` (model) and `proc._consume` (hash, columns, Parquet) on the instance,
    and `ShardWriter.add_rows` (Parquet writing) on the class; restores all three on exit.
    A stopgap that reaches into worker internals: to be replaced by the shard processor's own
    per-stage stats object once it has one (issue 11). This function is the one place to swap.
    """
    from pipeline import worker as W

    times = StageTimes()

    def wrap(fn: Any, key: str, note_thread: bool = True) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            if note_thread:
                times.threads[key].add(threading.get_ident())
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times.spent[key] += time.perf_counter() - t
        return timed

    orig_add_rows = W.ShardWriter.add_rows
    proc.runner.run = wrap(proc.runner.run, "model")
    proc._consume = wrap(proc._consume, "consume")
    W.ShardWriter.add_rows = wrap(orig_add_rows, "write", note_thread=False)  # type: ignore[method-assign]
    try:
        yield times
    finally:
        W.ShardWriter.add_rows = orig_add_rows  # type: ignore[method-assign]
        del proc.runner.run, proc._consume  # the instance attributes: the class's methods again


def worker_config(spec: dict[str, Any], out: str) -> Any:
    """The `WorkerConfig` the driver gives each worker for this spec (its shape from `shape_for`)."""
    from pipeline.driver import model_spec
    from pipeline.worker import WorkerConfig

    cfg = job_config(spec, out)
    shape = pipeline_shape(spec)
    return WorkerConfig(output=out, model=model_spec(cfg), resize=cfg.resize, max_image_pixels=cfg.max_image_pixels,
                        batch_size=cfg.batch_size, decode_threads=shape.decode_threads, decode_mode=shape.decode_mode,
                        prefetch=cfg.prefetch, row_group_rows=cfg.row_group_rows, torch_threads=shape.torch_threads)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from pipeline import worker as W
    from pipeline.driver import run_fingerprint
    from pipeline.protocol import ShardTask

    out = str(Path(spec["work"]) / "out-inproc")
    shutil.rmtree(out, ignore_errors=True)
    fp = run_fingerprint(job_config(spec, out))
    wcfg = dataclasses.replace(worker_config(spec, out), fingerprint=fp)
    t_load = time.perf_counter()
    proc = W.ShardProcessor(wcfg)
    load_s = time.perf_counter() - t_load
    rows = 0
    with timed_worker_stages(proc) as times:
        t0 = time.perf_counter()
        for url in shard_urls(spec["corpus"]):
            r = proc.process(ShardTask(url, Path(url).stem, 1))
            if not r.ok:
                raise RuntimeError(f"inproc shard failed: {r}")
            rows += json.loads(r.manifest)["rows"]
        secs = time.perf_counter() - t0
    proc.close()
    return {"images": rows, "seconds": round(secs, 3), "img_s": round(rows / secs, 2),
            "model_load_s": round(load_s, 2), "decode_mode": wcfg.decode_mode, **_shares(times, secs),
            "maxrss_mib": maxrss_mib()}


def _shares(times: StageTimes, secs: float) -> dict[str, Any]:
    """Shares of the wall time. The worker's threads: reader+decode pool -> model (the calling
    thread) -> [writer]. Whatever thread `_consume` runs on, `Runner.run`'s share of the wall is
    how busy the model is; the rest of the calling thread's time it waits for decoded batches
    (or, in a worker that writes in the model's thread, writes)."""
    spent = times.spent
    in_model_thread = bool(times.threads["consume"] & times.threads["model"])
    busy = spent["consume"] if in_model_thread else spent["model"]
    return {"share_model": round(spent["model"] / secs, 3), "share_write": round(spent["write"] / secs, 3),
            "share_consume": round(spent["consume"] / secs, 3), "consume_in_model_thread": in_model_thread,
            "share_model_thread_idle": round(1 - busy / secs, 3)}
