"""Simulated workers for the real driver: `sim_workers(...)` is a `pipeline.pool.Workers`.

256 worker processes do not fit on one machine, so a few async Ray actors (`SimHost`) each
serve many worker slots. The pool sees one handle per slot (`SimSlot`: the same methods as
pipeline/worker.py's actor, ``process``, ``progress``, ``pid``, ``close``), and calls on it go to
its host with the slot's number. A slot runs one shard at a time (a lock per slot, as a real
actor runs one call at a time): it waits `delay` seconds (the GPU's time on the shard), then
commits the shard through the real commit path: `ShardSink` with `rows` rows of the so400m
shapes, the lease fence twice, the data file's upload and the manifest last.

On request a share of the shards fails (a transient IO error, on every attempt: the driver's
retries and `_failed/` records run) and a share kills its slot on the first attempt (the call
raises ActorDiedError, as a dead actor's would, and every later call on that slot too: the
driver replaces the slot and retries the shard).
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.pool import Workers
from pipeline.protocol import Reason, ShardResult, ShardTask
from pipeline.shard.processor import WorkerConfig

# the so400m-256 model's outputs: 4 codebooks over 16x16 patches, a 1152-wide pooled embedding
SO400M = {"pixel_ids": (4, 16, 16), "semantic_dim": 1152}


@dataclass(frozen=True)
class SimSpec:
    delay: float = 0.0          # seconds a shard takes before its commit (the GPU's part)
    rows: int = 2               # rows written per shard
    fail_per_mille: int = 0     # shards (by stem hash) that fail on every attempt
    die_per_mille: int = 0      # shards (by stem hash) whose first attempt kills the slot
    commit_threads: int = 8     # threads per host for the blocking commit path


def _share(stem: str, salt: str) -> int:
    return zlib.crc32(f"{salt}:{stem}".encode()) % 1000


def fails(stem: str, spec: SimSpec) -> bool:
    return _share(stem, "fail") < spec.fail_per_mille


def dies(stem: str, spec: SimSpec) -> bool:
    return not fails(stem, spec) and _share(stem, "die") < spec.die_per_mille


class _Host:
    """The body of the `SimHost` actor (a plain class: `host_class` makes it a Ray actor)."""

    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        self.config: WorkerConfig | None = None
        self.storage: Any = None
        self.schema: Any = None
        self.dead: set[int] = set()
        self.locks: dict[int, asyncio.Lock] = {}
        self.ended: dict[int, float] = {}      # slot -> when its last shard's call returned
        self.waits: list[float] = []           # per shard: the slot's idle time before it started
        self.costs: list[tuple[float, ...]] = []  # per committed shard: (sink, fence, uploads, manifest) s
        self.commits: dict[str, int] = {}      # stem -> commits made (exactly-once check)
        self.calls = 0
        self.last_first_start = 0.0            # when the last first attempt started (the queue ran dry after)
        self.pool = ThreadPoolExecutor(spec.commit_threads)

    async def start(self, slot: int, config: WorkerConfig) -> int:
        if self.config is None:
            from pipeline.io import Storage
            from schemas import TokenLayout, fingerprint_digest, tokens_schema

            self.config = config
            self.storage = Storage(config.output, config.storage)
            self.schema = tokens_schema(TokenLayout(**SO400M), config.fingerprint)
            self.fp_sha = fingerprint_digest(config.fingerprint)
        self.locks[slot] = asyncio.Lock()
        return os.getpid()

    def _check(self, slot: int) -> None:
        if slot in self.dead:
            import ray.exceptions

            raise ray.exceptions.ActorDiedError()

    async def pid(self, slot: int) -> int:
        self._check(slot)
        return os.getpid()

    async def progress(self, slot: int) -> int:
        self._check(slot)
        return self.calls

    async def close(self, slot: int) -> None:
        self.dead.add(slot)

    async def kill(self, slot: int) -> None:
        self.dead.add(slot)

    async def process(self, slot: int, task: ShardTask) -> ShardResult:
        async with self.locks[slot]:
            self._check(slot)
            started = time.monotonic()
            if slot in self.ended:  # idle from its last result until this shard started: the
                # lock's handoff when the driver had queued it, else the driver's round trip
                self.waits.append((started, started - self.ended[slot]))
            if task.attempt == 1:
                self.last_first_start = max(self.last_first_start, started)
            self.calls += 1
            try:
                if self.spec.delay:
                    await asyncio.sleep(self.spec.delay)
                if fails(task.stem, self.spec):
                    return ShardResult.failed(task.stem, Reason.IO, "simulated: storage error")
                if dies(task.stem, self.spec) and task.attempt == 1:
                    self.dead.add(slot)
                    self._check(slot)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.pool, self._commit, slot, task)
            finally:
                self.ended[slot] = time.monotonic()

    def _commit(self, slot: int, task: ShardTask) -> ShardResult:
        """The real commit path of one shard (pipeline/shard/sink.py), timed in parts."""
        from pipeline.lease import check_fence
        from pipeline.shard.sink import ShardSink

        assert self.config is not None
        n = self.spec.rows
        token = self.config.lease_token
        fence_s = [0.0]

        def fence() -> None:
            t = time.perf_counter()
            self._check(slot)  # killed by the driver meanwhile: a dead process commits nothing more
            if token:
                check_fence(self.storage, token)
            fence_s[0] += time.perf_counter() - t

        t0 = time.perf_counter()
        sink = ShardSink(self.storage, task.stem, task.url, self.schema, self.config.fingerprint)
        try:
            rng = np.random.default_rng(zlib.crc32(task.stem.encode()))
            sink.add_rows({
                "key": [f"{task.stem}/{i:05d}" for i in range(n)], "shard": [task.url] * n,
                "sample_index": list(range(n)), "image_hash": [rng.bytes(16) for _ in range(n)],
                "width": [256] * n, "height": [256] * n, "text": [None] * n, "meta": [None] * n,
                "pixel_ids": rng.integers(0, 4096, (n, *SO400M["pixel_ids"]), dtype=np.uint16),
                "semantic_pooled": rng.standard_normal((n, SO400M["semantic_dim"])).astype(np.float16),
            })
            t1 = time.perf_counter()
            manifest = sink.commit(input_size=None, input_etag=None, attempts=task.attempt,
                                   seconds=0.0, run_fingerprint=self.fp_sha,
                                   fence=fence, node="sim")
            t2 = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - as the real worker: classified, never raised
            from pipeline.protocol import failure_reason

            sink.discard()
            return ShardResult.failed(task.stem, failure_reason(e), f"{type(e).__name__}: {e}")
        finally:
            sink.cleanup()
        self.commits[task.stem] = self.commits.get(task.stem, 0) + 1
        self.costs.append((t1 - t0, fence_s[0], t2 - t1 - fence_s[0]))
        return ShardResult.committed(task.stem, manifest.to_json())

    async def report(self) -> dict[str, Any]:
        """Waits only while the driver still had first attempts to hand out (after that a slot
        idles for want of work, not for the driver)."""
        waits = [w for at, w in self.waits if at <= self.last_first_start]
        return {"waits": waits, "costs": self.costs, "commits": self.commits}


def host_class() -> Any:
    import ray

    # num_cpus=0: the hosts take none of the declared CPUs; one event loop serves all their slots
    return ray.remote(num_cpus=0, max_restarts=0, max_concurrency=10_000)(_Host)


class _Method:
    def __init__(self, host: Any, name: str, slot: int) -> None:
        self.host, self.name, self.slot = host, name, slot

    def remote(self, *args: Any) -> Any:
        return getattr(self.host, self.name).remote(self.slot, *args)


class SimSlot:
    """What the pool holds for one worker: the methods of pipeline/worker.py's actor, on a host."""

    def __init__(self, host: Any, slot: int) -> None:
        self.host, self.slot = host, slot
        self.process, self.progress = _Method(host, "process", slot), _Method(host, "progress", slot)
        self.pid, self.close = _Method(host, "pid", slot), _Method(host, "close", slot)


class _SlotClass:
    """Stands for the actor class: ``.options(name=...).remote(config)`` opens a slot on a host."""

    def __init__(self, hosts: list[Any]) -> None:
        self.hosts, self.opened = hosts, 0

    def options(self, **_: Any) -> _SlotClass:
        return self

    def remote(self, config: WorkerConfig) -> SimSlot:
        slot = self.opened
        self.opened += 1
        host = self.hosts[slot % len(self.hosts)]
        host.start.remote(slot, config)  # calls from one caller run in order: before its pid
        return SimSlot(host, slot)


class SimWorkers:
    """`workers` for run_job: `hosts` async actors (started now, Ray must be up) serving the slots."""

    def __init__(self, hosts: int, spec: SimSpec) -> None:
        cls = host_class()
        self.hosts = [cls.remote(spec) for _ in range(hosts)]
        self.slots = _SlotClass(self.hosts)
        self.workers = Workers(lambda shape: self.slots, lambda slot: slot.host.kill.remote(slot.slot))

    def report(self) -> dict[str, Any]:
        """Every host's waits, commit costs and commits per stem, merged."""
        import ray

        out: dict[str, Any] = {"waits": [], "costs": [], "commits": {}}
        for r in ray.get([h.report.remote() for h in self.hosts]):
            out["waits"] += r["waits"]
            out["costs"] += r["costs"]
            for stem, n in r["commits"].items():
                out["commits"][stem] = out["commits"].get(stem, 0) + n
        return out

    def close(self) -> None:
        import ray

        for h in self.hosts:
            ray.kill(h)
