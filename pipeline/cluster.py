"""Joining or starting Ray, and the shape of the worker pool."""

from __future__ import annotations

import logging
import os

from .config import JobConfig

log = logging.getLogger("wintok")


def start_ray(cfg: JobConfig) -> None:
    """Join `--address` / RAY_ADDRESS if given, else start a local Ray (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, runtime_env=env,
                 logging_level=logging.WARNING, configure_logging=True)


def worker_shape(cfg: JobConfig, shards: int) -> tuple[int, float, float]:
    """(actors, num_gpus each, num_cpus each): one actor per GPU; CPU actors when there are none."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = int(res.get("CPU", 1))
    if gpus and cfg.device != "cpu":
        per = cfg.gpus_per_worker
        n = max(1, int(gpus / per))
        return max(1, min(n, shards)), per, 1.0
    n = cfg.workers or max(1, cpus // 4)
    return max(1, min(n, shards)), 0.0, 1.0
