"""(b) Decode alone: read tar + decode + resize with the pipeline's functions, batches stacked.

As many decoders as the pipeline runs on this machine (its workers x their decoders, from
`pipeline.cluster.shape_for`), in the pipeline's decode mode: a thread pool over
`decode_image`, or the pipeline's process `Decoder.map` (chunks to child processes, pixels back
through shared memory). Also single-thread costs per image on a subset: reading the tar,
`decode_image` with and without JPEG draft mode, and the naive full PIL decode + resize.
"""

from __future__ import annotations

import io
import time
from collections import deque
from typing import Any

from benchmarks.common import maxrss_mib, naive_transform, pipeline_shape
from benchmarks.corpus import shard_urls


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from pipeline.preprocess import PreprocessConfig

    urls = shard_urls(spec["corpus"])
    count, mode = decoders(spec)
    pre = PreprocessConfig(image_size=spec["image_size"])
    B = spec["batch_size"]
    res = (_processes if mode == "processes" else _threads)(urls, pre, B, count)
    res.update(decode_threads=count, decode_mode=mode, maxrss_mib=maxrss_mib())
    res.update(subset_costs(urls, pre.image_size, min(200, res["images"])))
    return res


def decoders(spec: dict[str, Any]) -> tuple[int, str]:
    """The pipeline's decoders on this machine in all (workers x decoders per worker) and its decode mode."""
    shape = pipeline_shape(spec)
    return shape.actors * shape.decode_threads, shape.decode_mode


def _threads(urls: list[str], pre: Any, B: int, threads: int) -> dict[str, Any]:
    """`decode_image` in a pool of `threads`, at most 2 batches ahead, results taken in order."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from pipeline.preprocess import decode_image
    from pipeline.shard.samples import iter_samples

    n = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for url in urls:
            window: deque = deque()
            batch: list[np.ndarray] = []
            with open(url, "rb") as f:
                for s in iter_samples(f, url):
                    window.append(pool.submit(decode_image, s.image, pre))
                    while len(window) > 2 * B or (window and window[0].done()):
                        batch.append(window.popleft().result().pixels)
                        if len(batch) == B:
                            np.stack(batch)
                            n += len(batch)
                            batch = []
            while window:
                batch.append(window.popleft().result().pixels)
            if batch:
                np.stack(batch)
                n += len(batch)
    secs = time.perf_counter() - t0
    return {"images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 2)}


def _processes(urls: list[str], pre: Any, B: int, procs: int) -> dict[str, Any]:
    """The pipeline's process decoder (`Decoder.map`: chunks to `procs` children, pixels back
    through shared memory), each image copied into one batch buffer as the batch stage does."""
    import numpy as np

    from pipeline.shard.decode import Decoder
    from pipeline.shard.samples import iter_samples

    dec = Decoder("processes", procs, pre, 2 * B)
    batch = np.empty((B, pre.image_size, pre.image_size, 3), np.uint8)
    dec.warm()  # start the children before the clock
    n = 0
    t0 = time.perf_counter()
    try:
        for url in urls:
            with open(url, "rb") as f:
                for _, pixels in dec.map(iter_samples(f, url)):
                    batch[n % B] = pixels
                    n += 1
        secs = time.perf_counter() - t0
    finally:
        dec.close()
    return {"images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 2), "chunk": dec.backend.chunk_size}


def subset_costs(urls: list[str], size: int, n: int) -> dict[str, float]:
    """Single-thread per-image costs on `n` images: read, decode_image (draft / no draft), naive PIL."""
    from PIL import Image

    from pipeline.preprocess import PreprocessConfig, decode_image
    from pipeline.shard.samples import iter_samples

    raw: list[bytes] = []
    t0 = time.perf_counter()
    for url in urls:
        with open(url, "rb") as f:
            for s in iter_samples(f, url):
                raw.append(s.image)
                if len(raw) >= n:
                    break
        if len(raw) >= n:
            break
    out = {"read_tar_ms": round((time.perf_counter() - t0) / len(raw) * 1e3, 3)}
    for name, cfg in (("decode_image_ms", PreprocessConfig(image_size=size)),
                      ("decode_image_nodraft_ms", PreprocessConfig(image_size=size, use_draft=False))):
        t0 = time.perf_counter()
        for b in raw:
            decode_image(b, cfg)
        out[name] = round((time.perf_counter() - t0) / len(raw) * 1e3, 3)
    t0 = time.perf_counter()
    for b in raw:
        naive_transform(Image.open(io.BytesIO(b)), size)
    out["naive_pil_ms"] = round((time.perf_counter() - t0) / len(raw) * 1e3, 3)
    out["subset_images"] = len(raw)
    return out
