"""Scaling: the pipeline section on N and factor*N images (same shard size): wall-time ratio,
marginal rate and the worker's peak RSS, early and late in the long run.

Runs in the parent process (it starts the two pipeline children itself). Its spec: preset,
scaling_images, factor, shard_size, pool, seed, work, batch_size, decode_threads, workers,
harness (the `Harness` fields), section_timeout, deadline (time.monotonic() or None).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from benchmarks import log
from benchmarks.common import image_size
from benchmarks.corpus import corpus
from benchmarks.harness import Harness, short


def run(spec: dict[str, Any]) -> dict[str, Any]:
    harness = Harness(**spec["harness"])
    preset, factor = spec["preset"], spec["factor"]
    rows = []
    for n in (spec["scaling_images"], spec["scaling_images"] * factor):
        left = spec["deadline"] - time.monotonic() if spec.get("deadline") else float("inf")
        if left < 30:
            rows.append({"ok": False, "error": "skipped: --budget spent", "images_planned": n})
            continue
        info = corpus(Path(spec["work"]), n, spec["shard_size"], spec["pool"], spec["seed"], os.cpu_count() or 1)
        p = {"section": "pipeline", "preset": preset, "teacher": None, "corpus": info, "images": n,
             "batch_size": spec["batch_size"], "decode_threads": spec["decode_threads"],
             "workers": spec["workers"], "work": spec["work"], "tag": f"scale{n}", "image_size": image_size(preset)}
        log(f"running scaling {preset} on {n} images ...")
        res = harness.best_of(p, max(30.0, min(spec["section_timeout"], left)))
        res.update(images_planned=n, shards=info["shards"])
        rows.append(res)
        log(f"  scaling {n}: {short(res)}")
    return {"preset": preset, "runs": rows, "factor": factor, **_compare(*rows)}


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The long run (b) against the short one (a)."""
    if not (a.get("ok") and b.get("ok")):
        return {}
    sc: dict[str, Any] = {"time_ratio": round(b["seconds"] / a["seconds"], 2)}
    wa, wb = (r["memory_mib"].get("max_single_rss_model_worker") for r in (a, b))
    if wa and wb:
        sc["worker_peak_rss_ratio"] = round(wb / wa, 3)
    sc["marginal_img_s"] = round((b["images"] - a["images"]) / (b["seconds"] - a["seconds"]), 2)
    series = b.get("worker_rss_series") or []
    if len(series) >= 4:
        mid = (series[0][0] + series[-1][0]) / 2  # halves of the worker's life
        sc["worker_rss_first_half_max"] = max(v for t, v in series if t <= mid)
        sc["worker_rss_second_half_max"] = max((v for t, v in series if t > mid), default=None)
    return sc
