#!/usr/bin/env python
"""Throughput harness: the model's limit, decode alone, this pipeline, and two peers, on one corpus.

Not a test: a script anyone can run. One run builds (or reuses) a corpus of real JPEGs in
webdataset tars under benchmarks/_work/, then measures, on the same images and the same model:

  limit     the model alone on pre-decoded uint8 batches in memory (`Runner.run`), plus the
            bare `model.encode` on tensors already on the device (used for MFU)
  decode    read tar + decode + resize only (`iter_samples` + `decode_image` in a thread pool
            of --decode-threads, the pipeline's count), batches stacked as the worker does
  inproc    the pipeline's `ShardProcessor` in this process, no Ray (diagnostic: where the
            worker's time goes: model, Parquet writing, waiting for decoded batches)
  pipeline  this pipeline end to end: `pipeline.driver.run_job(JobConfig(...))` on a local Ray
  naive     the usual AR-repo loader: torch DataLoader over `wds.WebDataset(...).decode('pil')`,
            PIL resize + centre crop, num_workers = CPU count, a synchronous model loop, pandas
            -> Parquet at the end
  raydata   Ray Data: read_webdataset -> map_batches(decode) -> map_batches(model actor pool)
            -> write_parquet
  scaling   the pipeline on N and 10N images: time ratio and the worker's peak RSS

Every section runs in its own child process (a fresh interpreter, its own local Ray where it
uses one), while this process samples the memory of the child's whole process tree (RSS and
PSS, by role) and, on CUDA machines, `nvidia-smi` (GPU utilisation and memory).

Examples:
  python benchmarks/bench.py                                     # CPU: wintok-tiny + wintok-small
  python benchmarks/bench.py --preset wintok-tiny --images 1000 --only limit,decode,pipeline
  python benchmarks/bench.py --plot-only benchmarks/results.json  # redraw the PNG and the table
See benchmarks/RESULTS.md for the numbers, the FLOP formula and the GPU script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTIONS = ("limit", "decode", "inproc", "pipeline", "naive", "raydata", "scaling")
MODEL_SECTIONS = ("limit", "inproc", "pipeline", "naive", "raydata")
MiB = 1 << 20


# =============================================================================== corpus
from benchmarks.corpus import corpus, shard_urls  # noqa: E402 - after the sys.path line above


def _decode_threads(p: dict) -> int:
    """The pipeline's count: as given, else what `pipeline.cluster.worker_shape` picks for one CPU worker."""
    if p.get("decode_threads"):
        return int(p["decode_threads"])
    share = max(1, (os.cpu_count() or 1) // (p.get("workers") or 1))
    return max(2, share // 2)


def _decode_mode(p: dict) -> str:
    import torch

    return _resolved_mode(p.get("decode_mode"), torch.cuda.is_available())


# =============================================================================== FLOPs
def _vit_flops(dim: int, mlp: int, layers: int, tokens: int) -> float:
    """Transformer blocks: 2*T*(4D^2 + 2*D*F) matmul FLOPs + 4*T^2*D for QK^T and AV, per layer."""
    return layers * (2.0 * tokens * (4 * dim * dim + 2 * dim * mlp) + 4.0 * tokens * tokens * dim)


def wintok_encode_flops(c: Any) -> dict[str, float]:
    """FLOPs of one image through `WinTok.encode(with_quant=False)` (the pipeline's call)."""
    P, N, D = c.num_patches, c.num_latent_tokens, c.hidden_size
    blocks = _vit_flops(D, c.intermediate_size, c.num_hidden_layers, P + N)
    embed = 2.0 * P * (c.num_channels * c.patch_size**2 * D)
    wide, W = max(D, c.vocab_width), c.vocab_width
    quant_proj = (2.0 * P * D * 3 * wide + 4.0 * P * P * wide + 2.0 * P * D * W + 2.0 * P * W * W
                  + 3 * 2.0 * P * W * (2 * W))  # qkv, attention, shortcut, out proj, GeGLU MLP
    vq = 2.0 * P * c.vocab_size * (W // c.num_codebooks)  # cosine scores against every code
    semantic = 2.0 * N * D * D
    total = blocks + embed + quant_proj + vq + semantic
    return {"total": total, "blocks": blocks, "params_term": 2.0 * (P + N) * c.num_hidden_layers
            * (4 * D * D + 2 * D * c.intermediate_size), "attention_term": blocks - 2.0 * (P + N)
            * c.num_hidden_layers * (4 * D * D + 2 * D * c.intermediate_size), "other": embed + quant_proj + vq + semantic}


def teacher_flops(path: str | None) -> float:
    """FLOPs of one image through a SigLIP-style teacher read from its config.json (0 if none)."""
    if not path:
        return 0.0
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 0.0
    v = cfg.get("vision_config", cfg)
    D, F, L = v.get("hidden_size", 768), v.get("intermediate_size", 3072), v.get("num_hidden_layers", 12)
    S, p = v.get("image_size", 224), v.get("patch_size", 16)
    P = (S // p) ** 2
    head = (2.0 * 2 * P * D * D + 2.0 * 2 * D * D + 4.0 * P * D + 2.0 * 2 * D * F) if v.get("vision_use_head", True) else 0.0
    return _vit_flops(D, F, L, P) + 2.0 * P * 3 * p * p * D + head


def model_flops(preset: str, teacher: str | None) -> dict[str, float]:
    from wintok_model.checkpoint import check_model

    f = wintok_encode_flops(check_model(preset))
    t = teacher_flops(teacher)
    return {"encoder": f["total"], "teacher": t, "total": f["total"] + t, "encoder_detail": f}


TEACHER_ARCHS = {
    # SigLIP so400m-patch16 sizes at 256 px: the teacher of the released WinTok
    "so400m-256": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=256, patch_size=16),
    # a few-MB SigLIP for trying the teacher path on a CPU with wintok-tiny (64 px)
    "tiny-64": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=64, patch_size=8),
    "small-128": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                      image_size=128, patch_size=16),
}


def make_teacher(folder: str, arch: str, dtype: str = "bf16") -> None:
    """A random-weight SiglipVisionModel of `arch` sizes, saved with save_pretrained (the teacher format)."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if (Path(folder) / "config.json").exists():
        log(f"teacher: {folder} exists, kept")
        return
    torch.manual_seed(0)
    t0 = time.monotonic()
    model = SiglipVisionModel(SiglipVisionConfig(**TEACHER_ARCHS[arch]))
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    log(f"teacher: random SigLIP {arch} ({n / 1e6:.0f} M params, {dtype}) saved to {folder} "
        f"in {time.monotonic() - t0:.1f} s")


# =============================================================================== memory / GPU sampling
def _role(pid: int, root: int, cmd: str) -> str:
    if pid == root:
        return "driver"
    if "TokenizeWorker" in cmd or "MapWorker" in cmd:
        return "model_worker"
    if any(s in cmd for s in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py",
                              "runtime_env", "ray_client_server", "default_worker.py --node")) \
            and not cmd.startswith("ray::"):
        return "ray_system"
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "ray_tasks"
    return "children"  # DataLoader workers, corpus helpers


def _busy_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)
    return (sum(v[:8]) - idle) / hz, sum(v[:8]) / hz


class TreeSampler(threading.Thread):
    """Samples RSS and PSS of a process tree every `interval` s; peaks per role and in total.

    Also adds up the tree's CPU time, so that CPU used by processes outside the tree during
    the run (other users of a shared machine) can be reported next to the numbers.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.peak: dict[str, float] = {}
        self.cpu: dict[int, float] = {}
        self.cpu_role: dict[int, str] = {}
        self.samples = 0
        self.series: list[tuple[float, float]] = []  # (seconds, RSS of the model worker(s)) for the scaling plot
        self.busy0, self.total0 = _busy_jiffies()
        self.t0 = time.monotonic()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            rss: dict[str, float] = {}
            pss: dict[str, float] = {}
            for p in procs:
                try:
                    with p.oneshot():
                        role = _role(p.pid, self.pid, " ".join(p.cmdline()))  # Ray renames workers late
                        mi = p.memory_full_info()
                        ct = p.cpu_times()
                except psutil.Error:
                    continue
                self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), ct.user + ct.system)
                self.cpu_role[p.pid] = role
                rss[role] = rss.get(role, 0) + mi.rss
                pss[role] = pss.get(role, 0) + getattr(mi, "pss", mi.rss)
                key = f"max_single_rss_{role}"
                self.peak[key] = max(self.peak.get(key, 0), mi.rss)
            for role in rss:
                self.peak[f"rss_{role}"] = max(self.peak.get(f"rss_{role}", 0), rss[role])
                self.peak[f"pss_{role}"] = max(self.peak.get(f"pss_{role}", 0), pss[role])
            self.peak["pss_total"] = max(self.peak.get("pss_total", 0), sum(pss.values()))
            self.peak["rss_total"] = max(self.peak.get("rss_total", 0), sum(rss.values()))
            if "model_worker" in rss:
                self.series.append((round(time.monotonic() - self.t0, 2), round(rss["model_worker"] / MiB, 1)))
            self.samples += 1
            self.stop.wait(self.interval)

    def result(self) -> dict[str, float]:
        return {k: round(v / MiB, 1) for k, v in sorted(self.peak.items())} | {"samples": self.samples}

    def cpu_result(self) -> dict[str, float]:
        busy1, total1 = _busy_jiffies()
        wall = time.monotonic() - self.t0
        cores = (total1 - self.total0) / wall if wall > 0 else float(os.cpu_count() or 1)
        mine = sum(self.cpu.values())
        machine = busy1 - self.busy0
        by_role: dict[str, float] = {}
        for pid, sec in self.cpu.items():
            by_role[self.cpu_role.get(pid, "?")] = by_role.get(self.cpu_role.get(pid, "?"), 0.0) + sec
        return {"cpu_seconds_tree": round(mine, 1), "cpu_seconds_machine": round(machine, 1),
                "cpu_seconds_by_role": {k: round(v, 1) for k, v in sorted(by_role.items())},
                "cpu_util_tree": round(mine / wall / max(cores, 1e-9), 3) if wall > 0 else 0.0,
                "cpu_util_foreign": round(max(0.0, machine - mine) / wall / max(cores, 1e-9), 3) if wall > 0 else 0.0}


class GpuSampler(threading.Thread):
    """`nvidia-smi -lms` in the background: GPU utilisation and memory.used of GPU 0 (or all)."""

    def __init__(self, interval_ms: int = 200) -> None:
        super().__init__(daemon=True)
        self.util: list[float] = []
        self.mem: list[float] = []
        self.proc: subprocess.Popen | None = None
        self.interval_ms = interval_ms

    def run(self) -> None:
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                u, m = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.util.append(u)
            self.mem.append(m)

    def finish(self, baseline_mem: float | None) -> dict[str, float]:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.join(5)
        if not self.util:
            return {}
        nz = [i for i, u in enumerate(self.util) if u > 0]
        active = self.util[nz[0]:nz[-1] + 1] if nz else self.util  # from first to last busy sample
        return {"gpu_util_mean": round(sum(active) / len(active), 1),
                "gpu_util_p50": sorted(active)[len(active) // 2],
                "gpu_util_mean_whole_run": round(sum(self.util) / len(self.util), 1),
                "gpu_util_samples": len(self.util),
                "gpu_mem_peak_mib": max(self.mem),
                "gpu_mem_peak_above_idle_mib": round(max(self.mem) - (baseline_mem or 0.0), 1)}


def gpu_idle_mem() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def has_nvidia_smi() -> bool:
    return shutil.which("nvidia-smi") is not None


# =============================================================================== helpers in sections
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _maxrss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_peak(reset: bool = False) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / MiB, 1)


def _predecoded(urls: list[str], size: int, count: int) -> Any:
    """The first `count` images of the corpus decoded by the pipeline's own decoder: (count, S, S, 3)."""
    import numpy as np

    from pipeline.preprocess import PreprocessConfig, decode_image
    from pipeline.reader import iter_samples

    pre = PreprocessConfig(image_size=size)
    out = []
    for url in urls:
        with open(url, "rb") as f:
            for s in iter_samples(f, url):
                out.append(decode_image(s.image, pre).pixels)
                if len(out) >= count:
                    return np.stack(out)
    return np.stack(out)


def _matmul_peak() -> dict[str, float]:
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
    dt_ = time.perf_counter() - t0
    return {"matmul_tflops": round(2 * n**3 * reps / dt_ / 1e12, 4), "matmul_n": n, "matmul_dtype": str(dtype)}


# =============================================================================== sections
def sec_limit(p: dict[str, Any]) -> dict[str, Any]:
    """The model alone: pre-decoded uint8 batches in memory -> Runner.run; and bare model.encode."""
    import numpy as np
    import torch

    from pipeline.runner import ModelSpec, Runner

    res: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    res.update(_matmul_peak())
    runner = Runner(ModelSpec(model=p["preset"], teacher=p.get("teacher")))
    B = p["batch_size"]
    S = runner.image_size
    pool = _predecoded(shard_urls(p["corpus"]), S, min(p["images"], 4 * B))
    batches = [pool[i:i + B] for i in range(0, len(pool) - B + 1, B)] or [np.resize(pool, (B, S, S, 3))]
    min_s, min_batches = p["limit_seconds"], 3

    def timed(fn: Any, threads: int | None = None) -> tuple[float, int]:
        if threads:
            torch.set_num_threads(threads)
        for i in range(2):
            fn(batches[i % len(batches)])
        n, t0 = 0, time.perf_counter()
        while n < min_batches or time.perf_counter() - t0 < min_s:
            fn(batches[n % len(batches)])
            n += 1
        sync()
        return time.perf_counter() - t0, n * B

    def sync() -> None:
        if runner.device.type == "cuda":
            torch.cuda.synchronize()

    _cuda_peak(reset=True)
    ncpu = os.cpu_count() or 1
    # On a CPU the limit is the faster of torch on every core and torch on one thread (what a
    # num_cpus=1 Ray actor gets: Ray sets OMP_NUM_THREADS=1), each tried twice, alternating: on a
    # small shared machine an OpenMP team loses badly whenever another process takes a core.
    plan = [ncpu, 1, ncpu, 1] if runner.device.type == "cpu" and ncpu > 1 else [None]
    rates: dict[str, list[float]] = {}
    best = (0.0, 0.0, 0, None)
    for threads in plan:
        secs, n = timed(runner.run, threads)
        rates.setdefault(str(threads or torch.get_num_threads()), []).append(round(n / secs, 2))
        if n / secs > best[0]:
            best = (n / secs, secs, n, threads)
    torch.set_num_threads(best[3] or torch.get_num_threads())
    res.update({"images": best[2], "seconds": round(best[1], 3), "img_s": round(best[0], 2),
                "img_s_by_threads": rates, "best_threads": torch.get_num_threads(),
                "cuda_peak_alloc_mib": _cuda_peak()})
    # the bare model: normalised float input already on the device, no host round trip
    if runner.model is not None:
        dev_batches = [torch.from_numpy(b).to(runner.device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
                       for b in batches]
        autocast = torch.autocast(runner.device.type, dtype=runner.dtype, enabled=runner.dtype != torch.float32)

        @torch.inference_mode()
        def bare(b: np.ndarray) -> None:
            x = dev_batches[next(idx) % len(dev_batches)]
            with autocast:
                runner.model.encode(x, with_quant=False)
            if runner.teacher is not None:
                runner.teacher(torch.from_numpy(b).to(runner.device))

        import itertools

        idx = itertools.count()
        secs, n = timed(bare)
        res["bare_img_s"] = round(n / secs, 2)
    res["dtype"] = str(runner.dtype).replace("torch.", "")
    res["device"] = runner.device.type
    res["maxrss_mib"] = _maxrss_mib()
    return res


def _decode_subset_costs(urls: list[str], size: int, n: int) -> dict[str, float]:
    """Single-thread per-image costs on `n` images: read, decode_image (draft / no draft), naive PIL."""
    from PIL import Image

    from pipeline.preprocess import PreprocessConfig, decode_image
    from pipeline.reader import iter_samples

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
    read_ms = (time.perf_counter() - t0) / len(raw) * 1e3
    out = {"read_tar_ms": round(read_ms, 3)}
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


def sec_decode(p: dict[str, Any]) -> dict[str, Any]:
    """Read tar + decode + resize with the pipeline's functions, `decode_threads` threads, batches stacked."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from pipeline.preprocess import PreprocessConfig, decode_image
    from pipeline.reader import iter_samples

    urls = shard_urls(p["corpus"])
    size, B, threads = p["image_size"], p["batch_size"], _decode_threads(p)
    pre = PreprocessConfig(image_size=size)
    if _decode_mode(p) == "processes":
        return _decode_processes(p, urls, pre, B, threads)
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
    res = {"images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 2), "decode_threads": threads,
           "maxrss_mib": _maxrss_mib()}
    res.update(_decode_subset_costs(urls, size, min(200, n)))
    return res


def _decode_processes(p: dict[str, Any], urls: list[str], pre: Any, B: int, procs: int) -> dict[str, Any]:
    """Decode alone with the pipeline's ProcessDecoder: chunks to children, pixels via shared memory."""
    from collections import deque

    import numpy as np

    from pipeline.decoders import Chunk, make_decoder
    from pipeline.reader import iter_samples

    dec = make_decoder("processes", procs, pre, 2 * B + 1)
    batch = np.empty((B, pre.image_size, pre.image_size, 3), np.uint8)
    warm = Chunk([])
    dec.submit(warm)  # start the children before the clock
    dec.results(warm)
    n = 0
    window: deque = deque()
    pending: Chunk | None = None

    def take() -> None:
        nonlocal n, pending
        c, i = window.popleft()
        if c is pending:
            dec.submit(c)
            pending = None
        r = dec.results(c)[i]
        batch[n % B] = r.pixels
        dec.release(r)
        n += 1

    t0 = time.perf_counter()
    try:
        for url in urls:
            with open(url, "rb") as f:
                for s in iter_samples(f, url):
                    if pending is None:
                        pending = Chunk([])
                    pending.jobs.append((s.key, s.image))
                    window.append((pending, len(pending.jobs) - 1))
                    if len(pending.jobs) >= dec.chunk_size:
                        dec.submit(pending)
                        pending = None
                    while len(window) > 2 * B or (window and window[0][0].done()):
                        take()
            if pending is not None:
                dec.submit(pending)
                pending = None
            while window:
                take()
        secs = time.perf_counter() - t0
    finally:
        dec.close()
    res = {"images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 2), "decode_threads": procs,
           "decode_mode": "processes", "chunk": dec.chunk_size, "maxrss_mib": _maxrss_mib()}
    res.update(_decode_subset_costs(urls, pre.image_size, min(200, n)))
    return res


def _job(p: dict[str, Any], corpus_info: dict[str, Any], out: str) -> Any:
    from pipeline.config import JobConfig

    return JobConfig(inputs=(corpus_info["glob"],), output=out, model=p["preset"], teacher=p.get("teacher"),
                     batch_size=p["batch_size"], decode_threads=p["decode_threads"], workers=p.get("workers"),
                     progress=False, overwrite=True, compile=p.get("compile", False),
                     decode_mode=p.get("decode_mode") or "auto")


def sec_inproc(p: dict[str, Any]) -> dict[str, Any]:
    """ShardProcessor without Ray, timing its parts by wrapping (in this process only) the model and the writer."""
    from pipeline import worker as W
    from pipeline.driver import model_spec, run_fingerprint
    from schemas import fingerprint_digest

    out = str(Path(p["work"]) / "out-inproc")
    shutil.rmtree(out, ignore_errors=True)
    cfg = _job(p, p["corpus"], out)
    fp = run_fingerprint(cfg)
    digest = fingerprint_digest(fp)
    t_load = time.perf_counter()
    proc = W.ShardProcessor(W.WorkerConfig(output=out, model=model_spec(cfg), batch_size=cfg.batch_size,
                                           decode_threads=_decode_threads(p), decode_mode=_decode_mode(p),
                                           prefetch=cfg.prefetch,
                                           row_group_rows=cfg.row_group_rows))
    load_s = time.perf_counter() - t_load
    spent = {"model": 0.0, "write": 0.0, "consume": 0.0}
    threads: dict[str, set[int]] = {"model": set(), "consume": set()}

    def wrap(obj: Any, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed(*a: Any, **k: Any) -> Any:
            threads[key].add(threading.get_ident())
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        setattr(obj, name, timed)

    wrap(proc.runner, "run", "model")
    wrap(proc, "_consume", "consume")
    orig_add_rows = W.ShardWriter.add_rows

    def add_rows(self: Any, cols: dict[str, Any]) -> None:
        t = time.perf_counter()
        try:
            orig_add_rows(self, cols)
        finally:
            spent["write"] += time.perf_counter() - t
    W.ShardWriter.add_rows = add_rows  # type: ignore[method-assign]
    rows = 0
    t0 = time.perf_counter()
    for url in shard_urls(p["corpus"]):
        r = proc.process(W.ShardTask(url, Path(url).stem, 1, digest), fp)
        if r.get("status") != "ok":
            raise RuntimeError(f"inproc shard failed: {r}")
        rows += json.loads(r["manifest"])["rows"]
    secs = time.perf_counter() - t0
    W.ShardWriter.add_rows = orig_add_rows  # type: ignore[method-assign]
    # The worker's threads: reader+decode pool -> model (the calling thread) -> [writer]. Whatever
    # thread `_consume` runs on, `Runner.run`'s share of the wall is how busy the model is; the
    # rest of the calling thread's time it waits for decoded batches (or, in a worker that writes
    # in the model's thread, writes).
    in_model_thread = bool(threads["consume"] & threads["model"])
    busy = spent["consume"] if in_model_thread else spent["model"]
    return {"images": rows, "seconds": round(secs, 3), "img_s": round(rows / secs, 2),
            "model_load_s": round(load_s, 2),
            "share_model": round(spent["model"] / secs, 3), "share_write": round(spent["write"] / secs, 3),
            "share_consume": round(spent["consume"] / secs, 3),
            "consume_in_model_thread": in_model_thread,
            "share_model_thread_idle": round(1 - busy / secs, 3),
            "maxrss_mib": _maxrss_mib()}


def sec_pipeline(p: dict[str, Any]) -> dict[str, Any]:
    """run_job on a local Ray started the pipeline's own way before the clock starts."""
    from pipeline.cluster import start_ray
    from pipeline.driver import run_job

    out = str(Path(p["work"]) / f"out-pipeline-{p.get('tag', 'x')}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = _job(p, p["corpus"], out)
    t_ray = time.perf_counter()
    start_ray(cfg)
    ray_s = time.perf_counter() - t_ray
    t0 = time.perf_counter()
    summary = run_job(cfg)
    secs = time.perf_counter() - t0
    d = summary.to_dict()
    if not summary.ok or d["images"] != p["corpus"]["images"]:
        raise RuntimeError(f"pipeline run incomplete: {d}")
    import ray

    ray.shutdown()
    return {"images": d["images"], "seconds": round(secs, 3), "img_s": round(d["images"] / secs, 2),
            "workers": d["workers"], "ray_start_s": round(ray_s, 2), "summary_wall_s": d["wall_seconds"],
            **_manifest_rates(Path(out)), "maxrss_mib": _maxrss_mib()}


def _steady(events: list[tuple[float, int]]) -> float | None:
    """Images per second after the first unit of output: events are (time done, images in the unit)."""
    events = sorted(events)
    if len(events) < 2 or events[-1][0] <= events[0][0]:
        return None
    return round(sum(n for _, n in events[1:]) / (events[-1][0] - events[0][0]), 2)


def _manifest_rates(out: Path) -> dict[str, Any]:
    """Steady-state rate from the commit records: shards committed after the first one."""
    events, busy, rows = [], 0.0, 0
    for f in (out / "_manifest").glob("*.json"):
        m = json.loads(f.read_text())
        events.append((dt.datetime.fromisoformat(m["finished_at"]).timestamp(), int(m["rows"])))
        busy += float(m.get("seconds") or 0.0)
        rows += int(m["rows"])
    return {"steady_img_s": _steady(events), "shards": len(events),
            "worker_busy_img_s": round(rows / busy, 2) if busy else None}


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


def _naive_map(sample: tuple[str, Any], size: int) -> tuple[str, Any]:
    key, im = sample
    return key, naive_transform(im, size)


def sec_naive(p: dict[str, Any]) -> dict[str, Any]:
    """DataLoader(wds.WebDataset(urls).decode('pil')) -> synchronous model loop -> pandas -> Parquet."""
    import functools

    import numpy as np
    import pandas as pd
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader

    from pipeline.runner import ModelSpec, Runner

    urls = shard_urls(p["corpus"])
    out = Path(p["work"]) / "out-naive"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    workers = p.get("loader_workers") or os.cpu_count() or 1
    t0 = time.perf_counter()
    runner = Runner(ModelSpec(model=p["preset"], teacher=p.get("teacher")))
    size = runner.image_size
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
          .decode("pil").to_tuple("__key__", "jpg;jpeg;png;webp")
          .map(functools.partial(_naive_map, size=size)))
    loader = DataLoader(ds, batch_size=p["batch_size"], num_workers=workers,
                        pin_memory=runner.device.type == "cuda")
    rows: list[dict[str, Any]] = []
    events: list[tuple[float, int]] = []
    t_model = 0.0
    for keys, pixels in loader:
        tm = time.perf_counter()
        outs = runner.run(pixels.numpy())
        t_model += time.perf_counter() - tm
        events.append((time.perf_counter(), len(keys)))
        for i, k in enumerate(keys):
            row = {"key": k, "pixel_ids": outs["pixel_ids"][i].astype(np.uint16).reshape(-1),
                   "semantic_pooled": outs["semantic_pooled"][i].astype(np.float16)}
            if "teacher_embedding" in outs:
                row["teacher_embedding"] = outs["teacher_embedding"][i].astype(np.float16)
            rows.append(row)
    t_write = time.perf_counter()
    pd.DataFrame(rows).to_parquet(out / "part-0.parquet")
    secs = time.perf_counter() - t0
    events[-1] = (time.perf_counter(), events[-1][1])  # the final write belongs to the steady part
    n = len(rows)
    if n != p["corpus"]["images"]:
        raise RuntimeError(f"naive loop saw {n} images of {p['corpus']['images']}")
    del torch
    return {"images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 2), "loader_workers": workers,
            "steady_img_s": _steady(events), "first_batch_s": round(events[0][0] - t0, 2),
            "share_model": round(t_model / secs, 3), "write_s": round(time.perf_counter() - t_write, 2),
            "maxrss_mib": _maxrss_mib()}


class _RayModel:
    """Ray Data actor: the same Runner as the pipeline's worker."""

    def __init__(self, preset: str, teacher: str | None) -> None:
        from pipeline.runner import ModelSpec, Runner

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


def sec_raydata(p: dict[str, Any]) -> dict[str, Any]:
    """read_webdataset -> map_batches(decode) -> map_batches(model, actor pool) -> write_parquet."""
    import functools

    import pyarrow.dataset as pads
    import ray

    from pipeline.cluster import start_ray
    from wintok_model.checkpoint import check_model

    out = Path(p["work"]) / "out-raydata"
    shutil.rmtree(out, ignore_errors=True)
    t_ray = time.perf_counter()
    start_ray(_job(p, p["corpus"], str(out)))  # the same local Ray as the pipeline section
    ray_s = time.perf_counter() - t_ray
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ctx.enable_operator_progress_bars = False
    except AttributeError:
        pass
    size = check_model(p["preset"]).image_size
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = max(1, gpus) if gpus else (p.get("workers") or 1)
    model_res = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    B = p["batch_size"]
    t0 = time.perf_counter()
    ds = ray.data.read_webdataset(shard_urls(p["corpus"]), decoder=None, suffixes=["jpg"])
    ds = ds.map_batches(functools.partial(_ray_decode, size=size), batch_size=B, batch_format="numpy")
    pool = ({"compute": ray.data.ActorPoolStrategy(size=actors)} if hasattr(ray.data, "ActorPoolStrategy")
            else {"concurrency": actors})
    ds = ds.map_batches(_RayModel, fn_constructor_args=(p["preset"], p.get("teacher")), batch_size=B,
                        batch_format="numpy", **pool, **model_res)
    ds.write_parquet(str(out))
    secs = time.perf_counter() - t0
    t_done = pads.dataset(str(out), format="parquet").to_table(columns=["t_done"]).column("t_done").to_pylist()
    n = len(t_done)
    counts: dict[float, int] = {}
    for t in t_done:
        counts[t] = counts.get(t, 0) + 1
    ray.shutdown()
    if n != p["corpus"]["images"]:
        raise RuntimeError(f"ray data wrote {n} rows of {p['corpus']['images']}")
    return {"images": n, "seconds": round(secs, 3), "img_s": round(n / secs, 2), "actors": actors,
            "steady_img_s": _steady(list(counts.items())), "ray_start_s": round(ray_s, 2),
            "maxrss_mib": _maxrss_mib()}


SECTION_FUNCS = {"limit": sec_limit, "decode": sec_decode, "inproc": sec_inproc, "pipeline": sec_pipeline,
                 "naive": sec_naive, "raydata": sec_raydata}


def child_main(spec_json: str, result_path: str) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    p = json.loads(spec_json)
    try:
        res = SECTION_FUNCS[p["section"]](p)
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported in the table
        import traceback

        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    Path(result_path).write_text(json.dumps(res))
    return 0 if res["ok"] else 1


# =============================================================================== orchestration
def run_child(p: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one section in a fresh interpreter; sample its process tree; return its result + peaks."""
    work = Path(p["work"])
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / f"result-{os.getpid()}.json"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1", **CHILD_ENV)
    if p["section"] == "inproc" and not has_nvidia_smi():
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what the pipeline's CPU actors get (make_actor_class)
    gpu = GpuSampler() if has_nvidia_smi() else None
    base = gpu_idle_mem() if gpu else None
    if gpu:
        gpu.start()
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(p),
                              "--_result", str(result_path)], env=env, cwd=str(REPO), start_new_session=True)
    sampler = TreeSampler(child.pid)
    sampler.start()
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)
        child.wait()
    wall = time.monotonic() - t0
    sampler.stop.set()
    sampler.join(5)
    try:
        res = json.loads(result_path.read_text())
        result_path.unlink()
    except (OSError, ValueError):
        res = {"ok": False, "error": f"no result (exit {child.returncode}, {wall:.0f} s; timeout {timeout:.0f} s?)"}
    res["memory_mib"] = sampler.result()
    step = max(1, len(sampler.series) // 300)
    res["worker_rss_series"] = sampler.series[::step]
    res.update(sampler.cpu_result())
    res["child_wall_s"] = round(wall, 1)
    if gpu:
        res.update(gpu.finish(base))
    return res


QUIET = {"max_wait": 0.0, "threshold": 0.25}
CHILD_ENV: dict[str, str] = {}  # --env: set in every section's process, so in its Ray workers too


def wait_quiet() -> float:
    """Wait (up to --wait-quiet s) until other processes use under --quiet-threshold of the CPUs; the load seen."""
    t0 = time.monotonic()
    cores = os.cpu_count() or 1
    while True:
        b0, _ = _busy_jiffies()
        time.sleep(2.0)
        b1, _ = _busy_jiffies()
        load = (b1 - b0) / 2.0 / cores
        if load <= QUIET["threshold"] or time.monotonic() - t0 >= QUIET["max_wait"]:
            if time.monotonic() - t0 > 3:
                log(f"  waited {time.monotonic() - t0:.0f} s for a quiet machine (CPU busy {100 * load:.0f}%)")
            return round(load, 3)


def best_of(p: dict[str, Any], timeout: float, repeat: int) -> dict[str, Any]:
    """`repeat` runs of one section; the fastest by steady-state img/s, with every run's rate kept."""
    runs = []
    for _ in range(max(1, repeat)):
        before = wait_quiet() if QUIET["max_wait"] > 0 else None
        runs.append(run_child(p, timeout))
        runs[-1]["cpu_busy_before"] = before
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return runs[-1]
    best = max(ok, key=lambda r: r.get("steady_img_s") or r.get("img_s") or 0)
    if repeat > 1:
        best["repeats_img_s"] = [r.get("img_s") for r in runs]
        best["repeats_steady_img_s"] = [r.get("steady_img_s") or r.get("img_s") for r in runs]
    return best


def code_version() -> dict[str, Any]:
    """The commit benchmarked and whether the code it imports had uncommitted changes (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "wintok_model", "schemas"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"commit": head, "uncommitted": [ln[3:] for ln in dirty if ln.strip()]}
    except (OSError, subprocess.TimeoutExpired):
        return {}


def hardware() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
                            "python": platform.python_version(), "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)"):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    for mod in ("torch", "ray", "pyarrow", "PIL", "webdataset"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            info[mod] = None
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        info["cuda"] = False
    if has_nvidia_smi():
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import JobConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma list of sections to run (default: all of {','.join(SECTIONS)})")
    ap.add_argument("--preset", default="wintok-tiny,wintok-small",
                    help="comma list of model presets (or model dirs); each is benchmarked")
    ap.add_argument("--images", default="2000,600",
                    help="corpus size per preset (comma list matching --preset; the last one repeats)")
    ap.add_argument("--teacher", default=None, help="a teacher folder: adds '+teacher' variants")
    ap.add_argument("--teacher-sections", default="limit,pipeline",
                    help="sections that also run the '+teacher' variant")
    ap.add_argument("--no-plain", action="store_true", help="with --teacher: run only the '+teacher' variants")
    ap.add_argument("--batch-size", type=int, default=JobConfig.batch_size)
    ap.add_argument("--decode-threads", type=int, default=JobConfig.decode_threads,
                    help="decode threads of the pipeline, used for the decode section too (default: the pipeline's)")
    ap.add_argument("--decode-mode", default="auto",
                    help="comma list of threads|processes|auto: the decode, inproc and pipeline sections run once "
                         "per mode (auto: the pipeline's choice, processes on a GPU, threads on a CPU)")
    ap.add_argument("--workers", type=int, default=None, help="pipeline CPU workers (default: the pipeline's)")
    ap.add_argument("--loader-workers", type=int, default=None, help="naive DataLoader workers (default: CPU count)")
    ap.add_argument("--compile", action="store_true", help="JobConfig.compile=True for the pipeline section")
    ap.add_argument("--shard-size", type=int, default=250, help="samples per tar")
    ap.add_argument("--pool", type=int, default=400, help="unique JPEGs (the corpus cycles them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-seconds", type=float, default=5.0, help="timed seconds per limit measurement")
    ap.add_argument("--scaling-images", type=int, default=500, help="N for the scaling section (N and 10N)")
    ap.add_argument("--scaling-factor", type=int, default=10)
    ap.add_argument("--scaling-preset", default=None, help="preset for the scaling section (default: the first)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak for MFU (default: 989 bf16 dense on CUDA, else the measured fp32 matmul rate)")
    ap.add_argument("--section-timeout", type=float, default=900, help="seconds per section run")
    ap.add_argument("--budget", type=float, default=None,
                    help="total seconds: sections not yet started when it is spent are skipped (and reported)")
    ap.add_argument("--work", default=str(HERE / "_work"))
    ap.add_argument("--json", default=str(HERE / "_work" / "results.json"), help="where the results JSON goes")
    ap.add_argument("--markdown", default=str(HERE / "_work" / "results.md"), help="where the markdown table goes")
    ap.add_argument("--png", default=str(HERE / "_work" / "results.png"), help="where the plot goes")
    ap.add_argument("--plot-only", metavar="JSON", help="only redraw the PNG and table from a results JSON")
    ap.add_argument("--make-teacher", metavar="DIR", help="save a random SigLIP teacher to DIR first (if missing)")
    ap.add_argument("--teacher-arch", default="so400m-256", choices=sorted(TEACHER_ARCHS))
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each run wait up to SECONDS until the machine is quiet (shared machines)")
    ap.add_argument("--quiet-threshold", type=float, default=0.25,
                    help="'quiet' = the whole machine's CPU busy fraction at most this (default 0.25)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the sections' processes and their Ray workers (e.g. MALLOC_ARENA_MAX=2)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each section this many times and keep the fastest (steady img/s); for noisy machines")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = set(_csv(args.only)) - set(SECTIONS)
    if bad:
        ap.error(f"unknown sections {sorted(bad)}; known: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        return child_main(args._child, args._result)
    if args.plot_only:
        results = json.loads(Path(args.plot_only).read_text())
        write_outputs(results, args)
        return 0
    QUIET.update(max_wait=args.wait_quiet, threshold=args.quiet_threshold)
    CHILD_ENV.update(kv.split("=", 1) for kv in args.env)
    if args.make_teacher:
        make_teacher(args.make_teacher, args.teacher_arch)
        args.teacher = args.teacher or args.make_teacher
    only = _csv(args.only)
    presets = _csv(args.preset)
    sizes = [int(x) for x in _csv(args.images)]
    work = Path(args.work)
    procs = os.cpu_count() or 1
    results: dict[str, Any] = {
        "meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "hardware": hardware(), "code": code_version(), "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}},
        "corpora": {}, "runs": [], "scaling": None,
    }
    log(f"hardware: {json.dumps(results['meta']['hardware'])}")
    t_start = time.monotonic()

    def remaining() -> float:
        return args.budget - (time.monotonic() - t_start) if args.budget else float("inf")

    def timeout() -> float:
        return max(30.0, min(args.section_timeout, remaining()))

    corpora = {}
    for i, preset in enumerate(presets):
        n = sizes[min(i, len(sizes) - 1)]
        corpora[preset] = corpus(work, n, args.shard_size, args.pool, args.seed, procs)
        results["corpora"][preset] = corpora[preset]
    variants: list[str | None] = [] if (args.teacher and args.no_plain) else [None]
    if args.teacher:
        variants.append(args.teacher)
    for section in only:  # the order given to --only
        if section == "scaling":
            results["scaling"] = run_scaling(args, presets, work, procs, timeout, remaining)
            write_outputs(results, args, quiet=True)
            continue
        for preset in presets:
            info = corpora[preset]
            modes = _csv(args.decode_mode) if section in ("decode", "inproc", "pipeline") else [None]
            for teacher, mode in [(t, m) for t in variants for m in modes]:
                if teacher and (section not in _csv(args.teacher_sections) or section == "decode"):
                    continue  # decoding does not depend on the teacher
                label = f"{section} {preset}{' +teacher' if teacher else ''}{f' [{mode}]' if len(modes) > 1 else ''}"
                if remaining() < 30:
                    log(f"skipping {label}: --budget spent")
                    results["runs"].append({"ok": False, "error": "skipped: --budget spent", "section": section,
                                            "preset": preset, "teacher": bool(teacher)})
                    continue
                p = {"section": section, "preset": preset, "teacher": teacher, "corpus": info,
                     "images": info["images"], "batch_size": args.batch_size, "decode_threads": args.decode_threads,
                     "workers": args.workers, "loader_workers": args.loader_workers, "work": str(work),
                     "compile": args.compile and section == "pipeline", "limit_seconds": args.limit_seconds,
                     "image_size": _image_size(preset), "tag": "main", "decode_mode": mode}
                log(f"running {label} on {info['images']} images ...")
                res = best_of(p, timeout(), args.repeat)
                if section in ("decode", "inproc", "pipeline"):
                    res.setdefault("decode_mode", _resolved_mode(mode, results["meta"]["hardware"].get("cuda")))
                res.update(section=section, preset=preset, teacher=bool(teacher), mode_label=len(modes) > 1,
                           flops_per_image=model_flops(preset, teacher)["total"] if section != "decode" else 0.0)
                results["runs"].append(res)
                log(f"  {label}: {_short(res)}")
                set_peak(results, args)
                write_outputs(results, args, quiet=True)
    set_peak(results, args)
    write_outputs(results, args)
    return 0 if all(r.get("ok") for r in results["runs"]) else 1


def _resolved_mode(mode: str | None, cuda: bool) -> str:
    """The pipeline's choice for auto (`pipeline.cluster.shape_for`): processes on GPU workers, threads on CPU ones."""
    if mode and mode != "auto":
        return mode
    return "processes" if cuda else "threads"


def set_peak(results: dict[str, Any], args: argparse.Namespace) -> None:
    cuda = bool(results["meta"]["hardware"].get("cuda"))
    measured = [r.get("matmul_tflops") or 0 for r in results["runs"] if r.get("section") == "limit" and r.get("ok")]
    results["meta"]["measured_matmul_tflops"] = max(measured) if measured else None
    if args.peak_tflops:
        results["meta"]["peak_tflops"], results["meta"]["peak_source"] = args.peak_tflops, "--peak-tflops"
    elif cuda:
        results["meta"]["peak_tflops"] = 989.0
        results["meta"]["peak_source"] = "H100/H200 SXM datasheet, bf16 dense"
    else:
        results["meta"]["peak_tflops"] = results["meta"]["measured_matmul_tflops"]
        results["meta"]["peak_source"] = "best measured fp32 2048^3 matmul on all cores (limit section)"


def run_scaling(args: argparse.Namespace, presets: list[str], work: Path, procs: int, timeout: Any,
                remaining: Any) -> dict[str, Any]:
    """The pipeline on N and factor*N images (same shard size): wall-time ratio and the worker's peak RSS."""
    preset = args.scaling_preset or presets[0]
    rows = []
    for n in (args.scaling_images, args.scaling_images * args.scaling_factor):
        if remaining() < 30:
            rows.append({"ok": False, "error": "skipped: --budget spent", "images_planned": n})
            continue
        info = corpus(work, n, args.shard_size, args.pool, args.seed, procs)
        p = {"section": "pipeline", "preset": preset, "teacher": None, "corpus": info, "images": n,
             "batch_size": args.batch_size, "decode_threads": args.decode_threads, "workers": args.workers,
             "work": str(work), "tag": f"scale{n}", "image_size": _image_size(preset)}
        log(f"running scaling {preset} on {n} images ...")
        res = best_of(p, timeout(), args.repeat)
        res.update(images_planned=n, shards=info["shards"])
        rows.append(res)
        log(f"  scaling {n}: {_short(res)}")
    sc: dict[str, Any] = {"preset": preset, "runs": rows, "factor": args.scaling_factor}
    a, b = rows
    if a.get("ok") and b.get("ok"):
        sc["time_ratio"] = round(b["seconds"] / a["seconds"], 2)
        wa, wb = (r["memory_mib"].get("max_single_rss_model_worker") for r in rows)
        if wa and wb:
            sc["worker_peak_rss_ratio"] = round(wb / wa, 3)
        sc["marginal_img_s"] = round((b["images"] - a["images"]) / (b["seconds"] - a["seconds"]), 2)
        series = b.get("worker_rss_series") or []
        if len(series) >= 4:
            mid = (series[0][0] + series[-1][0]) / 2  # halves of the worker's life
            sc["worker_rss_first_half_max"] = max(v for t, v in series if t <= mid)
            sc["worker_rss_second_half_max"] = max((v for t, v in series if t > mid), default=None)
    return sc


def _image_size(preset: str) -> int:
    from wintok_model.checkpoint import check_model

    return check_model(preset).image_size


def _short(res: dict[str, Any]) -> str:
    if not res.get("ok"):
        return f"FAILED: {res.get('error')}"
    mem = res.get("memory_mib", {})
    return (f"{res.get('img_s')} img/s, {res.get('images')} images in {res.get('seconds')} s; "
            f"peak PSS total {mem.get('pss_total')} MiB")


# =============================================================================== output
def _model_proc_rss(r: dict[str, Any]) -> float | None:
    m = r.get("memory_mib", {})
    if r["section"] in ("pipeline", "raydata"):
        return m.get("max_single_rss_model_worker")
    return m.get("max_single_rss_driver")


def _variant(r: dict[str, Any]) -> str:
    return f"{r['preset']}{' +teacher' if r.get('teacher') else ''}"


def _sorted_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs grouped by model (in the order first run), then plain before +teacher, then section order."""
    first: dict[str, int] = {}
    for r in results["runs"]:
        first.setdefault(r["preset"], len(first))
    return sorted(results["runs"], key=lambda r: (first[r["preset"]], bool(r.get("teacher")),
                                                  SECTIONS.index(r["section"])))


def _steady_of(r: dict[str, Any]) -> float:
    """Steady-state img/s: after the first unit of output for c/d/e; the plain rate for a/b/c'."""
    return r.get("steady_img_s") or r["img_s"]


def _fastest(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(variant, section) -> its run; with several decode modes, the faster one stands for the section."""
    by: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results["runs"]:
        if r.get("ok"):
            k = (_variant(r), r["section"])
            if k not in by or _steady_of(r) > _steady_of(by[k]):
                by[k] = r
    return by


def _ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    by = _fastest(results)
    for v in dict.fromkeys(_variant(r) for r in results["runs"]):
        c = by.get((v, "pipeline"))
        if not c:
            continue
        row: dict[str, Any] = {"variant": v, "wall": c["img_s"], "steady": _steady_of(c)}
        for sec in ("limit", "decode", "naive", "raydata"):
            if (v, sec) in by:
                o = by[(v, sec)]
                row[sec] = (round(c["img_s"] / o["img_s"], 3), round(_steady_of(c) / _steady_of(o), 3))
        out.append(row)
    return out


NAMES = {"limit": "(a) limit: Runner.run on pre-decoded uint8", "decode": "(b) decode alone",
         "inproc": "(c') pipeline worker in-process, no Ray", "pipeline": "(c) pipeline end to end (run_job)",
         "naive": "(d) naive: DataLoader+wds+sync loop+pandas", "raydata": "(e) Ray Data + actor pool"}


def markdown(results: dict[str, Any]) -> str:
    peak = results["meta"].get("peak_tflops")
    cuda = bool(results["meta"]["hardware"].get("cuda"))
    head = ("| section | model | images | wall s | img/s (wall) | img/s (steady) | GFLOP/img | TFLOP/s (steady) | MFU "
            "| peak RSS, model process (MiB) | peak PSS, all processes (MiB) | other processes' CPU |")
    if cuda:
        head += " GPU util % (mean) | peak GPU mem (MiB) |"
    lines = [head, "|" + "---|" * 2 + "---:|" * (head.count("|") - 3)]
    for r in _sorted_runs(results):
        name = NAMES.get(r["section"], r["section"]) + (f" [{r['decode_mode']}]" if r.get("mode_label") else "")
        if not r.get("ok"):
            err = str(r.get("error"))
            lines.append(f"| {name} | {_variant(r)} | {err if err.startswith('skipped') else 'FAILED: ' + err[:160]} |")
            continue
        gf = r.get("flops_per_image", 0) / 1e9
        steady = _steady_of(r)
        tf = steady * r.get("flops_per_image", 0) / 1e12
        mfu = f"{100 * tf / peak:.1f}%" if peak and gf else ""
        cells = [name, _variant(r), r["images"], r["seconds"], f"**{r['img_s']}**", steady,
                 f"{gf:.3g}" if gf else "", f"{tf:.3g}" if gf else "", mfu, _model_proc_rss(r) or "",
                 r.get("memory_mib", {}).get("pss_total", ""), f"{100 * r.get('cpu_util_foreign', 0):.0f}%"]
        if cuda:
            cells += [r.get("gpu_util_mean", ""), r.get("cuda_peak_alloc_mib") or r.get("gpu_mem_peak_above_idle_mib", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    extra = []
    for r in _sorted_runs(results):
        if not r.get("ok"):
            continue
        v = _variant(r)
        if r["section"] == "limit":
            bits = [f"`Runner.run` img/s by torch threads {r.get('img_s_by_threads')} (limit = the best, "
                    f"{r.get('best_threads')} thread(s)); bare `model.encode` on device tensors {r.get('bare_img_s')} img/s",
                    f"{r.get('dtype')} on {r.get('device')}, matmul ceiling {r.get('matmul_tflops')} TFLOP/s "
                    f"({r.get('matmul_dtype')}, {r.get('torch_threads')} threads)"]
            extra.append(f"- (a) {v}: " + "; ".join(bits))
        if r["section"] == "decode":
            extra.append(f"- (b) {v}, {r['decode_threads']} {r.get('decode_mode') or 'threads'}; per image on one thread: read tar "
                         f"{r['read_tar_ms']} ms, `decode_image` {r['decode_image_ms']} ms (without draft "
                         f"{r['decode_image_nodraft_ms']} ms), naive PIL full decode + resize {r['naive_pil_ms']} ms")
        if r["section"] == "inproc" and "share_consume" in r:
            extra.append(f"- (c') {v}: of the wall time, the model thread ran `Runner.run` "
                         f"{100 * r['share_model']:.0f}% and waited on its queues "
                         f"{100 * r['share_model_thread_idle']:.0f}%; `_consume` (hash, columns, Parquet) took "
                         f"{100 * r['share_consume']:.0f}% ({'in the model thread' if r['consume_in_model_thread'] else 'on the writer thread'}), "
                         f"of which `add_rows` {100 * r['share_write']:.0f}% (model load {r['model_load_s']} s, not timed)")
        if r["section"] in ("pipeline", "raydata"):
            m = r["memory_mib"]
            extra.append(f"- ({'c' if r['section'] == 'pipeline' else 'e'}) {v}: local Ray start {r.get('ray_start_s')} s "
                         f"(not timed); model-actor process peak RSS {m.get('max_single_rss_model_worker')} MiB; Ray "
                         f"system processes peak PSS {m.get('pss_ray_system')} MiB"
                         + (f"; worker busy-time rate {r.get('worker_busy_img_s')} img/s over {r.get('shards')} shards"
                            if r["section"] == "pipeline" else ""))
        if r["section"] == "naive":
            extra.append(f"- (d) {v}: {r['loader_workers']} DataLoader workers; first batch after "
                         f"{r['first_batch_s']} s; model {100 * r['share_model']:.0f}% of wall; final pandas write "
                         f"{r['write_s']} s; loader worker processes peak PSS {r['memory_mib'].get('pss_children')} MiB")
    rat = ["| model | (c) img/s wall / steady | (c)/(a) vs limit | (c)/(b) vs decode alone | (c)/(d) vs naive "
           "| (c)/(e) vs Ray Data |", "|---|---:|---:|---:|---:|---:|"]
    for row in _ratios(results):
        def cell(k: str, row: dict[str, Any] = row) -> str:
            return f"{row[k][0]} / {row[k][1]}" if k in row else ""
        rat.append(f"| {row['variant']} | {row['wall']} / {row['steady']} | {cell('limit')} | {cell('decode')} | "
                   f"{cell('naive')} | {cell('raydata')} |")
    out = ["### Throughput and memory", "", *lines, "", "### Ratios (wall / steady)", "", *rat, "",
           "### Details", "", *extra]
    sc = results.get("scaling")
    if sc:
        out += ["", f"### Scaling ({sc['preset']}, pipeline end to end)", "",
                "| images | shards | wall s | img/s (wall) | img/s (steady) | peak RSS, worker (MiB) "
                "| peak PSS, all (MiB) | other processes' CPU |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sc["runs"]:
            if r.get("ok"):
                m = r["memory_mib"]
                out.append(f"| {r['images']} | {r['shards']} | {r['seconds']} | {r['img_s']} | {r.get('steady_img_s')} | "
                           f"{m.get('max_single_rss_model_worker')} | {m.get('pss_total')} | "
                           f"{100 * r.get('cpu_util_foreign', 0):.0f}% |")
            else:
                out.append(f"| {r['images_planned']} | | FAILED: {r.get('error')} | | | | | |")
        if "time_ratio" in sc:
            out += ["", f"{sc['factor']}x the images took {sc['time_ratio']}x the wall time (fixed start-up "
                    f"included; marginal rate {sc['marginal_img_s']} img/s); worker peak RSS ratio "
                    f"{sc.get('worker_peak_rss_ratio')}; in the {sc['factor']}x run the worker's RSS peaked at "
                    f"{sc.get('worker_rss_first_half_max')} MiB in the first half of the run and "
                    f"{sc.get('worker_rss_second_half_max')} MiB in the second half."]
    hw = results["meta"]["hardware"]
    out += ["", f"Hardware: {hw.get('Model name', '?')}, {hw.get('cpu_count')} CPUs, {hw.get('ram_gib')} GiB RAM"
            + (f", {hw.get('nvidia_smi')}" if hw.get("nvidia_smi") else "")
            + f"; torch {hw.get('torch')}, ray {hw.get('ray')}. Date {results['meta']['date']}. "
            f"MFU peak: {peak} TFLOP/s ({results['meta'].get('peak_source')}).",
            f"Command: `{results['meta']['command']}`; code: commit {results['meta'].get('code', {}).get('commit')}"
            + (f" with uncommitted changes in {', '.join(results['meta']['code']['uncommitted'])}"
               if results["meta"].get("code", {}).get("uncommitted") else "") + "."]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["limit", "decode", "inproc", "pipeline", "naive", "raydata"]
    label = {"limit": "(a) limit", "decode": "(b) decode", "inproc": "(c') worker\nno Ray",
             "pipeline": "(c) pipeline", "naive": "(d) naive", "raydata": "(e) Ray Data"}
    variants = list(dict.fromkeys(_variant(r) for r in results["runs"]))
    sc = results.get("scaling")
    fig, axes = plt.subplots(1, 3 if sc else 2, figsize=(17 if sc else 12, 4.8))
    width = 0.8 / max(1, len(variants))
    fastest = _fastest(results)
    for vi, v in enumerate(variants):
        got = {sec: r for (var, sec), r in fastest.items() if var == v}
        xs = [i + vi * width for i, s in enumerate(order) if s in got]
        ys = [got[s]["img_s"] for s in order if s in got]
        bars = axes[0].bar(xs, ys, width, label=v)
        axes[0].bar_label(bars, fmt="%.0f", fontsize=7)
        axes[0].scatter(xs, [_steady_of(got[s]) for s in order if s in got], marker="_", s=120, color="black",
                        label="steady state (after the first output)" if vi == 0 else None, zorder=3)
        mem = [(_model_proc_rss(got[s]) or 0) for s in order if s in got]
        tot = [got[s].get("memory_mib", {}).get("pss_total", 0) for s in order if s in got]
        axes[1].bar(xs, tot, width, alpha=0.35, color=bars.patches[0].get_facecolor() if bars.patches else None)
        axes[1].bar(xs, mem, width, label=f"{v}: model process RSS (solid) / all PSS (light)",
                    color=bars.patches[0].get_facecolor() if bars.patches else None)
    for ax, title, ylab in ((axes[0], "throughput (bars: wall clock incl. start-up;\nfaster decode mode where both ran)", "images / s (log)"), (axes[1], "peak memory", "MiB")):
        ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(order))])
        ax.set_xticklabels([label[s] for s in order], fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylab)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    if sc:
        ax = axes[2]
        for r in sc["runs"]:
            if r.get("ok") and r.get("worker_rss_series"):
                t, v = zip(*r["worker_rss_series"], strict=True)
                ax.plot(t, v, label=f"{r['images']} images: {r['seconds']:.0f} s, {r['img_s']:.0f} img/s")
        ax.set_xlabel("seconds since the run started")
        ax.set_ylabel("worker RSS (MiB)")
        ax.set_ylim(bottom=0)
        ttl = f"scaling: pipeline worker memory, {sc['preset']}"
        if "time_ratio" in sc:
            ttl += f"\n{sc['factor']}x images -> {sc['time_ratio']}x time (marginal {sc['marginal_img_s']:.0f} img/s)"
        ax.set_title(ttl, fontsize=9)
        if ax.get_lines():
            ax.legend(fontsize=7, loc="lower right")
    hw = results["meta"]["hardware"]
    fig.suptitle(f"WinTok pipeline benchmark - {hw.get('Model name', '?')}, {hw.get('cpu_count')} CPUs"
                 + (f", {hw.get('gpu')}" if hw.get("gpu") else "") + f" - {results['meta']['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], args: argparse.Namespace, quiet: bool = False) -> None:
    for target in (args.json, args.markdown, args.png):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    Path(args.markdown).write_text(md)
    if quiet:
        return
    try:
        plot(results, args.png)
        log(f"wrote {args.json}, {args.markdown}, {args.png}")
    except ImportError:
        log(f"wrote {args.json}, {args.markdown} (no matplotlib: no plot; pip install matplotlib)")
    print(md)


if __name__ == "__main__":
    sys.exit(main())
