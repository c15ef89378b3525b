"""The Ray actor: a thin wrapper around :class:`pipeline.shard.processor.ShardProcessor`.

Models load in the actor, once; `process` runs one shard; `progress` answers the driver's
watchdog while a shard runs. The shard path itself needs no Ray (see pipeline/shard/).
"""

from __future__ import annotations

import logging
from typing import Any

from .protocol import ShardResult, ShardTask
from .shard.processor import ShardProcessor, WorkerConfig

WORKER_ENV = ("WINTOK_FAILPOINTS", "WINTOK_FAILPOINT_MARK", "WINTOK_CACHE")
WORKER_ENV_PREFIXES = ("WINTOK_IO_",)


def worker_env(environ: Any) -> dict[str, str]:
    """The driver's variables the workers read themselves, none of them secret (never WINTOK_S3_OPTIONS)."""
    return {k: v for k, v in environ.items() if k in WORKER_ENV or k.startswith(WORKER_ENV_PREFIXES)}


def make_actor_class(num_gpus: float, num_cpus: float, cpu_model: bool = False) -> Any:
    """The Ray actor class with its resources declared (one actor per GPU, or per CPU slot).

    Actors are not restarted by Ray: the driver replaces a dead one and re-dispatches its
    shards. Only the WINTOK_* variables in `WORKER_ENV` are passed on to the workers (Ray logs a
    runtime_env in plain text; the storage options, credentials included, travel in WorkerConfig).
    `cpu_model`: the model runs on the CPU, beside the decoders.
    """
    import os

    import ray

    # MALLOC_ARENA_MAX: without it glibc's per-thread arenas let a long-lived worker's RSS creep
    # up shard after shard (measured: 310 -> 840 MiB over 40 shards; flat at ~520 MiB with 2)
    env = {"MALLOC_ARENA_MAX": "2", **worker_env(os.environ)}
    if cpu_model and "OMP_WAIT_POLICY" not in os.environ:
        # torch's OpenMP threads otherwise spin between ops, taking cores from the decoders
        # (measured on wintok-tiny, 2 vCPUs: 458 -> 535-595 img/s, CPU per image 4.1 -> 3.0-3.3 ms)
        env["OMP_WAIT_POLICY"] = "PASSIVE"

    @ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0, max_task_retries=0,
                runtime_env={"env_vars": env}, concurrency_groups={"control": 1})
    class TokenizeWorker:
        def __init__(self, config: WorkerConfig) -> None:
            import dataclasses

            logging.basicConfig(level=logging.WARNING)
            node = ray.get_runtime_context().get_node_id()
            self.processor = ShardProcessor(dataclasses.replace(config, node=node))

        def process(self, task: ShardTask) -> ShardResult:
            return self.processor.process(task)

        def close(self) -> None:
            self.processor.close()

        @ray.method(concurrency_group="control")  # answers while a shard runs: the watchdog's probe
        def progress(self) -> int:
            return self.processor.progress

        @ray.method(concurrency_group="control")
        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

        @ray.method(concurrency_group="control")  # answers while a shard is being processed
        def pid(self) -> int:
            import os

            return os.getpid()

    return TokenizeWorker
