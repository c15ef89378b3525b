"""Helpers shared by the sections: the job a spec describes, the pipeline's worker shape for it,
memory and rate bookkeeping, and the naive loader's transform.

A spec is the plain dict the CLI hands to a section (JSON, so it crosses into the child
process): section, preset, teacher, corpus (the corpus info), images, batch_size,
decode_threads, decode_mode, workers, loader_workers, work, compile, limit_seconds,
image_size, tag.
"""

from __future__ import annotations

import os
from typing import Any

MiB = 1 << 20


def job_config(spec: dict[str, Any], output: str) -> Any:
    """The `pipeline.config.JobConfig` the pipeline section runs for this spec."""
    from pipeline.config import JobConfig

    return JobConfig(inputs=(spec["corpus"]["glob"],), output=output, model=spec["preset"],
                     teacher=spec.get("teacher"), batch_size=spec["batch_size"],
                     decode_threads=spec["decode_threads"], workers=spec.get("workers"), progress=False,
                     overwrite=True, compile=spec.get("compile", False),
                     decode_mode=spec.get("decode_mode") or "auto")


def pipeline_shape(spec: dict[str, Any]) -> Any:
    """The pipeline's own worker shape for this spec on this machine (`pipeline.cluster.shape_for`).

    With the CPUs a local Ray gets (`pipeline.cluster.start_ray` starts it with os.cpu_count())
    and the CUDA devices torch sees; nothing here re-derives the pipeline's choices.
    """
    import torch

    from pipeline.cluster import shape_for

    return shape_for(job_config(spec, ""), spec["corpus"]["shards"], cpus=os.cpu_count() or 1,
                     gpus=torch.cuda.device_count())


def image_size(preset: str) -> int:
    from wintok_model.checkpoint import check_model

    return check_model(preset).image_size


def maxrss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cuda_peak(reset: bool = False) -> float | None:
    """torch.cuda.max_memory_allocated in MiB (None without CUDA); `reset` starts a new peak."""
    import torch

    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / MiB, 1)


def steady(events: list[tuple[float, int]]) -> float | None:
    """Images per second after the first unit of output: events are (time done, images in the unit)."""
    events = sorted(events)
    if len(events) < 2 or events[-1][0] <= events[0][0]:
        return None
    return round(sum(n for _, n in events[1:]) / (events[-1][0] - events[0][0]), 2)


def predecoded(urls: list[str], size: int, count: int) -> Any:
    """The first `count` images of the corpus decoded by the pipeline's own decoder: (count, S, S, 3)."""
    import numpy as np

    from pipeline.preprocess import PreprocessConfig, decode_image
    from pipeline.shard.samples import iter_samples

    pre = PreprocessConfig(image_size=size)
    out = []
    for url in urls:
        with open(url, "rb") as f:
            for s in iter_samples(f, url):
                out.append(decode_image(s.image, pre).pixels)
                if len(out) >= count:
                    return np.stack(out)
    return np.stack(out)


def naive_transform(im: Any, size: int) -> Any:
    """torchvision-free Resize(size) + CenterCrop(size) with PIL, as AR repos do; -> (S, S, 3) uint8."""
    import numpy as np
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
