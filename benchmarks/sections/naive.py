"""(d) The usual AR-repo loader: torch DataLoader over `wds.WebDataset(...).decode('pil')`.

PIL resize + centre crop, num_workers = CPU count (or --loader-workers), a synchronous model
loop (the pipeline's `Runner.run`), rows in a list -> pandas -> Parquet at the end.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import maxrss_mib, naive_transform, steady
from benchmarks.corpus import shard_urls


def _naive_map(sample: tuple[str, Any], size: int) -> tuple[str, Any]:
    key, im = sample
    return key, naive_transform(im, size)


def _rows(keys: list[str], outs: dict[str, Any]) -> list[dict[str, Any]]:
    import numpy as np

    rows = []
    for i, k in enumerate(keys):
        row = {"key": k, "pixel_ids": outs["pixel_ids"][i].astype(np.uint16).reshape(-1),
               "semantic_pooled": outs["semantic_pooled"][i].astype(np.float16)}
        if "teacher_embedding" in outs:
            row["teacher_embedding"] = outs["teacher_embedding"][i].astype(np.float16)
        rows.append(row)
    return rows


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd
    import webdataset as wds
    from torch.utils.data import DataLoader

    from pipeline.shard.encode import ModelSpec, Runner

    urls = shard_urls(spec["corpus"])
    out = Path(spec["work"]) / "out-naive"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    workers = spec.get("loader_workers") or os.cpu_count() or 1
    t0 = time.perf_counter()
    runner = Runner(ModelSpec(model=spec["preset"], teacher=spec.get("teacher")))
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
          .decode("pil").to_tuple("__key__", "jpg;jpeg;png;webp")
          .map(functools.partial(_naive_map, size=runner.image_size)))
    loader = DataLoader(ds, batch_size=spec["batch_size"], num_workers=workers,
                        pin_memory=runner.device.type == "cuda")
    rows: list[dict[str, Any]] = []
    events: list[tuple[float, int]] = []
    t_model = 0.0
    for keys, pixels in loader:
        tm = time.perf_counter()
        outs = runner.run(pixels.numpy())
        t_model += time.perf_counter() - tm
        events.append((time.perf_counter(), len(keys)))
        rows += _rows(keys, outs)
    t_write = time.perf_counter()
    pd.DataFrame(rows).to_parquet(out / "part-0.parquet")
    secs = time.perf_counter() - t0
    events[-1] = (time.perf_counter(), events[-1][1])  # the final write belongs to the steady part
    n = len(rows)
    if n != spec["corpus"]["images"]:
        raise RuntimeError(f"naive loop saw {n} images of {spec['corpus']['images']}")
    return {"images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 2), "loader_workers": workers,
            "steady_img_s": steady(events), "first_batch_s": round(events[0][0] - t0, 2),
            "share_model": round(t_model / secs, 3), "write_s": round(time.perf_counter() - t_write, 2),
            "maxrss_mib": maxrss_mib()}
