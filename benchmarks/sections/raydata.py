"""(e) Ray Data: read_webdataset -> map_batches(decode) -> map_batches(model actor pool) -> write_parquet.

The same local Ray as the pipeline section (`pipeline.cluster.start_ray`), as many model
actors as the pipeline has workers on it (`pipeline.cluster.worker_shape`), each with the
pipeline worker's GPU share or one CPU, the same `Runner` and the pipeline's `decode_image`.
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import job_config, maxrss_mib, steady
from benchmarks.corpus import shard_urls


class _RayModel:
    """Ray Data actor: the same Runner as the pipeline's worker."""

    def __init__(self, preset: str, teacher: str | None) -> None:
        from pipeline.shard.encode import ModelSpec, Runner

        self.runner = Runner(ModelSpec(model=preset, teacher=teacher))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        outs = self.runner.run(batch["pixels"])
        res = {"key": batch["key"], "pixel_ids": outs["pixel_ids"].astype(np.uint16),
               "semantic_pooled": outs["semantic_pooled"].astype(np.float16),
               "t_done": np.full(len(batch["key"]), time.time())}
        if "teacher_embedding" in outs:
            res["teacher_embedding"] = outs["teacher_embedding"].astype(np.float16)
        return res


def _ray_decode(batch: dict[str, Any], size: int) -> dict[str, Any]:
    import numpy as np

    from pipeline.preprocess import PreprocessConfig, decode_image

    pre = PreprocessConfig(image_size=size)
    return {"key": np.asarray(batch["__key__"]),
            "pixels": np.stack([decode_image(bytes(b), pre).pixels for b in batch["jpg"]])}


def _quiet_progress() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ctx.enable_operator_progress_bars = False
    except AttributeError:
        pass


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.dataset as pads
    import ray

    from pipeline.cluster import start_ray, worker_shape

    out = Path(spec["work"]) / "out-raydata"
    shutil.rmtree(out, ignore_errors=True)
    cfg = job_config(spec, str(out))
    t_ray = time.perf_counter()
    start_ray(cfg)  # the same local Ray as the pipeline section
    ray_s = time.perf_counter() - t_ray
    _quiet_progress()
    shape = worker_shape(cfg, spec["corpus"]["shards"])
    model_res = {"num_gpus": shape.num_gpus} if shape.num_gpus else {"num_cpus": 1}
    B = spec["batch_size"]
    t0 = time.perf_counter()
    ds = ray.data.read_webdataset(shard_urls(spec["corpus"]), decoder=None, suffixes=["jpg"])
    ds = ds.map_batches(functools.partial(_ray_decode, size=spec["image_size"]), batch_size=B,
                        batch_format="numpy")
    pool = ({"compute": ray.data.ActorPoolStrategy(size=shape.actors)} if hasattr(ray.data, "ActorPoolStrategy")
            else {"concurrency": shape.actors})
    ds = ds.map_batches(_RayModel, fn_constructor_args=(spec["preset"], spec.get("teacher")), batch_size=B,
                        batch_format="numpy", **pool, **model_res)
    ds.write_parquet(str(out))
    secs = time.perf_counter() - t0
    t_done = pads.dataset(str(out), format="parquet").to_table(columns=["t_done"]).column("t_done").to_pylist()
    n = len(t_done)
    counts: dict[float, int] = {}
    for t in t_done:
        counts[t] = counts.get(t, 0) + 1
    ray.shutdown()
    if n != spec["corpus"]["images"]:
        raise RuntimeError(f"ray data wrote {n} rows of {spec['corpus']['images']}")
    return {"images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 2), "actors": shape.actors,
            "steady_img_s": steady(list(counts.items())), "ray_start_s": round(ray_s, 2),
            "maxrss_mib": maxrss_mib()}
