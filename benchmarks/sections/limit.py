"""(a) The model alone: pre-decoded uint8 batches in memory -> `Runner.run`; and the bare `model.encode`.

On a CPU the limit is the faster of torch on every core and torch on one thread (what a
num_cpus=1 Ray actor gets: Ray sets OMP_NUM_THREADS=1), each tried twice, alternating: on a
small shared machine an OpenMP team loses badly whenever another process takes a core.
Also measures the dense matmul rate, the ceiling used for MFU on a CPU.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import cuda_peak, maxrss_mib, predecoded
from benchmarks.corpus import shard_urls


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pipeline.shard.encode import ModelSpec, Runner

    res: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    res.update(matmul_peak())
    runner = Runner(ModelSpec(model=spec["preset"], teacher=spec.get("teacher")))
    B = spec["batch_size"]
    batches = _batches(spec, runner.image_size)
    cuda = runner.device.type == "cuda"

    def timed(fn: Callable[[Any], Any], threads: int | None = None) -> tuple[float, int]:
        """Two warm-up calls, then at least 3 batches and limit_seconds: (seconds, images)."""
        if threads:
            torch.set_num_threads(threads)
        for i in range(2):
            fn(batches[i % len(batches)])
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < spec["limit_seconds"]:
            fn(batches[n % len(batches)])
            n += 1
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, n * B

    cuda_peak(reset=True)
    res.update(_best_threads(runner.run, timed, cpu=not cuda))
    res["cuda_peak_alloc_mib"] = cuda_peak()
    if runner.model is not None:
        res["bare_img_s"] = _bare_rate(runner, batches, timed)
    res["dtype"] = str(runner.dtype).replace("torch.", "")
    res["device"] = runner.device.type
    res["maxrss_mib"] = maxrss_mib()
    return res


def _batches(spec: dict[str, Any], size: int) -> list[Any]:
    """Batches of the corpus's first images, decoded by the pipeline (at most 4 distinct batches)."""
    import numpy as np

    B = spec["batch_size"]
    pool = predecoded(shard_urls(spec["corpus"]), size, min(spec["images"], 4 * B))
    return [pool[i:i + B] for i in range(0, len(pool) - B + 1, B)] or [np.resize(pool, (B, size, size, 3))]


def _best_threads(fn: Callable[[Any], Any], timed: Callable[..., tuple[float, int]], cpu: bool) -> dict[str, Any]:
    """`fn`'s rate by torch thread count (all cores / one, twice each on a CPU); the best one stays set."""
    import torch

    ncpu = os.cpu_count() or 1
    plan = [ncpu, 1, ncpu, 1] if cpu and ncpu > 1 else [None]
    rates: dict[str, list[float]] = {}
    best: tuple[float, float, int, int | None] = (0.0, 0.0, 0, None)
    for threads in plan:
        secs, n = timed(fn, threads)
        rates.setdefault(str(threads or torch.get_num_threads()), []).append(round(n / secs, 2))
        if n / secs > best[0]:
            best = (n / secs, secs, n, threads)
    torch.set_num_threads(best[3] or torch.get_num_threads())
    return {"images": best[2], "seconds": round(best[1], 3), "img_s": round(best[0], 2),
            "img_s_by_threads": rates, "best_threads": torch.get_num_threads()}


def _bare_rate(runner: Any, batches: list[Any], timed: Callable[..., tuple[float, int]]) -> float:
    """The bare model: normalised float input already on the device, no host round trip."""
    import torch

    dev_batches = [torch.from_numpy(b).to(runner.device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
                   for b in batches]
    autocast = torch.autocast(runner.device.type, dtype=runner.dtype, enabled=runner.dtype != torch.float32)
    idx = itertools.count()

    @torch.inference_mode()
    def bare(b: Any) -> None:
        x = dev_batches[next(idx) % len(dev_batches)]
        with autocast:
            runner.model.encode(x, with_quant=False)
        if runner.teacher is not None:
            runner.teacher(torch.from_numpy(b).to(runner.device))

    secs, n = timed(bare)
    return round(n / secs, 2)


def matmul_peak() -> dict[str, float]:
    """Measured dense matmul rate (the ceiling used for MFU): fp32 on CPU, bf16 on CUDA."""
    import torch

    if torch.cuda.is_available():
        n, dtype, dev = 8192, torch.bfloat16, "cuda"
    else:
        n, dtype, dev = 2048, torch.float32, "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 1.0:
        a @ b
        reps += 1
        if dev == "cuda":
            torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return {"matmul_tflops": round(2 * n**3 * reps / secs / 1e12, 4), "matmul_n": n, "matmul_dtype": str(dtype)}
