"""One shard end to end: read -> decode -> encode -> write -> commit.

`ShardProcessor` does the work and is usable without Ray; `TokenizeWorker` is the Ray
actor around it (models load in the actor, once). Reading and decoding run in a producer
thread with a bounded decode pool, overlapped with the model in the calling thread; at most
`prefetch` batches wait between them, so memory is bounded whatever the shard size.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from schemas import fingerprint_digest, tokens_schema

from .config import MAX_IMAGE_PIXELS, RESIZE_MODES
from .decoders import Chunk, ThreadDecoder, make_decoder
from .faults import failpoint
from .io import Storage, StorageOptions, input_info, open_input
from .lease import check_fence
from .preprocess import PreprocessConfig, SampleError
from .protocol import PERMANENT, Reason, ShardResult, ShardTask, failure_reason
from .reader import RawSample, ShardReadError, iter_samples
from .runner import ModelSpec, Runner
from .urls import redact_text, redact_url
from .writer import ShardWriter

log = logging.getLogger("wintok")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; plain data, safe to send to Ray."""

    output: str
    model: ModelSpec = field(default_factory=ModelSpec)
    resize: str = RESIZE_MODES[0]
    max_image_pixels: int = MAX_IMAGE_PIXELS
    batch_size: int = 64
    decode_threads: int = 4
    decode_mode: str = "threads"   # or "processes" (resolved by the driver from JobConfig.decode_mode)
    prefetch: int = 2
    row_group_rows: int = 1024
    torch_threads: int | None = None
    storage: StorageOptions = field(default_factory=StorageOptions)
    lease_token: str | None = None  # the run's lease token: every commit checks it (None: no check)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the run's: in every file's metadata

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("storage")
        return d


@dataclass
class _Item:
    sample: RawSample
    ok: bool = False   # decoded: its pixels are in the batch it travels with, in item order
    width: int = 0
    height: int = 0
    error: SampleError | None = None
    digest: bytes = b""  # image_hash, computed by the decoder


@dataclass
class _Batch:
    items: list[_Item]
    pixels: np.ndarray | None   # (batch_size, S, S, 3) uint8, rows [0, n) = the decoded items in order
    n: int


_DONE = object()


class ShardProcessor:
    """Loads the model(s) once; `process` turns one input shard into one committed output."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        # moves on every shard start and every sample read, decoded and written: the driver's
        # watchdog reads it (through the actor's control group) while a shard runs. Threads
        # update it without a lock; a lost update does not matter, only that it moves.
        self.progress = 0
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        self.runner = Runner(config.model, config.storage)
        failpoint("worker_start")
        self.pre = PreprocessConfig(image_size=self.runner.image_size, resize=config.resize,
                                    max_image_pixels=config.max_image_pixels)
        self.storage = Storage(config.output, config.storage)
        self.schema = tokens_schema(self.runner.layout, config.fingerprint)  # once per worker
        self.fingerprint_sha256 = fingerprint_digest(config.fingerprint)
        self.window = config.batch_size * 2  # samples submitted for decoding ahead of the batch being filled
        self.decoder = make_decoder(config.decode_mode, config.decode_threads, self.pre, self.window + 1)
        self._batches: queue.Queue = queue.Queue()  # reusable (batch_size, S, S, 3) buffers
        s = self.pre.image_size
        for _ in range(config.prefetch + 2):  # one filling, `prefetch` queued, one in the model
            self._batches.put(np.empty((config.batch_size, s, s, 3), np.uint8))

    def close(self) -> None:
        self.decoder.close()

    def process(self, task: ShardTask) -> ShardResult:
        """One attempt at one shard: committed, or failed with its reason (nothing committed)."""
        t0 = time.monotonic()
        self.progress += 1
        failpoint("shard_start", task.stem)
        writer = ShardWriter(self.storage, task.stem, task.url, self.schema, self.config.fingerprint,
                             row_group_rows=self.config.row_group_rows)
        try:
            # safe mode (a worker died on this shard): thread decoding moves into child processes,
            # where a crash costs one sample; process decoding is isolated already
            own = task.safe_mode and isinstance(self.decoder, ThreadDecoder)
            decoder = make_decoder("processes", self.config.decode_threads, self.pre, self.window + 1) \
                if own else self.decoder
            try:
                with open_input(task.url, self.config.storage) as stream:
                    # size and ETag of the bytes actually read (the stream refuses a changed object)
                    size, etag = getattr(stream, "size", None), getattr(stream, "etag", None)
                    if size is None:
                        size, etag = input_info(task.url, self.config.storage)
                    self._run(stream, task, writer, decoder)
            finally:
                if own:
                    decoder.close()
            token = self.config.lease_token
            manifest = writer.commit(input_size=size, input_etag=etag, attempts=task.attempt,
                                     seconds=time.monotonic() - t0, run_fingerprint=self.fingerprint_sha256,
                                     fence=(lambda: check_fence(self.storage, token)) if token else None)
            return ShardResult.committed(task.stem, manifest.to_json())
        except Exception as e:  # noqa: BLE001 - classified once; the driver decides on retries
            writer.discard()
            reason = failure_reason(e)
            return _failure(task, reason, _describe(e, reason, task.url))
        finally:
            writer.cleanup()

    # ---------------------------------------------------------------- the shard loop
    def _run(self, stream: Any, task: ShardTask, writer: ShardWriter, decoder: Any) -> None:
        """Reader+decode thread -> model (this thread) -> Parquet writer thread, bounded queues between."""
        batches: queue.Queue = queue.Queue(maxsize=max(1, self.config.prefetch))
        written: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        failure: list[BaseException] = []
        producer = threading.Thread(target=self._produce, args=(stream, task.url, batches, stop, decoder),
                                    name="shard-reader", daemon=True)
        sink = threading.Thread(target=self._write_loop, args=(written, task, writer, failure),
                                name="shard-writer", daemon=True)
        producer.start()
        sink.start()
        try:
            while not failure:
                item = batches.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                try:
                    outputs = self.runner.run(item.pixels[: item.n]) if item.n else {}
                finally:
                    self._give_back(item.pixels)
                self.progress += 1
                written.put((item.items, [it for it in item.items if it.ok], outputs))
        finally:
            stop.set()
            while True:  # until the producer is gone and nothing is left queued
                alive = producer.is_alive()  # read first: once it is gone, nothing more can arrive
                try:
                    got = batches.get_nowait()
                except queue.Empty:
                    if not alive:
                        break
                    producer.join(0.05)
                    continue
                if isinstance(got, _Batch):
                    self._give_back(got.pixels)
            written.put(_DONE)
            sink.join()
        if failure:
            raise failure[0]

    def _write_loop(self, written: queue.Queue, task: ShardTask, writer: ShardWriter,
                    failure: list[BaseException]) -> None:
        while True:
            job = written.get()
            if job is _DONE:
                return
            if failure:
                continue  # drain after a failure
            try:
                self._consume(*job, task, writer)
            except BaseException as e:  # noqa: BLE001 - re-raised in the model thread
                failure.append(e)

    def _buffer(self) -> np.ndarray:
        try:
            return self._batches.get_nowait()
        except queue.Empty:  # only if a buffer was lost on a failure path: never wait for one
            s = self.pre.image_size
            return np.empty((self.config.batch_size, s, s, 3), np.uint8)

    def _give_back(self, pixels: np.ndarray | None) -> None:
        if pixels is not None and self._batches.qsize() < self.config.prefetch + 2:
            self._batches.put(pixels)

    def _produce(self, stream: Any, url: str, out: queue.Queue, stop: threading.Event, decoder: Any) -> None:
        """Read samples, decode them in chunks (`decoder.chunk_size`), copy pixels into batch buffers."""

        def put(x: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(x, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        # each entry: (sample, its chunk or None, position in the chunk); a chunk is submitted when full
        window: deque[tuple[RawSample, Chunk | None, int]] = deque()
        pending: Chunk | None = None
        items: list[_Item] = []
        pixels: np.ndarray | None = None
        n = 0  # decoded images in `pixels`
        size = self.config.batch_size

        def flush() -> None:
            nonlocal pending
            if pending is not None:
                chunk, pending = pending, None
                decoder.submit(chunk)

        def send() -> bool:
            nonlocal items, pixels, n
            batch = _Batch(items, pixels, n)
            items, pixels, n = [], None, 0
            if put(batch):
                return True
            self._give_back(batch.pixels)
            return False

        def take() -> bool:
            nonlocal pixels, n
            sample, chunk, pos = window[0]
            if chunk is None:
                window.popleft()
                items.append(_Item(sample))
                return True
            if chunk is pending:
                flush()
            r = decoder.results(chunk)[pos]
            self.progress += 1
            window.popleft()
            if isinstance(r, SampleError):
                items.append(_Item(sample, error=r))
                return True
            if pixels is None:
                pixels = self._buffer()
            pixels[n] = r.pixels
            decoder.release(r)
            n += 1
            items.append(_Item(sample, True, r.width, r.height, digest=r.digest))
            return n < size or send()

        try:
            for sample in iter_samples(stream, url):
                self.progress += 1
                chunk = None
                if not sample.error and sample.image is not None:
                    if pending is None:
                        pending = Chunk([])
                    chunk = pending
                    chunk.jobs.append((sample.key, sample.image))
                window.append((sample, chunk, len(chunk.jobs) - 1 if chunk else 0))
                if chunk is not None and len(chunk.jobs) >= decoder.chunk_size:
                    flush()
                while len(window) > self.window or (window and (window[0][1] is None or window[0][1].done())):
                    if not take():
                        return
            flush()
            while window:
                if not take():
                    return
            if items and not send():
                return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            put(e)
        finally:
            self._give_back(pixels)
            for _, chunk, pos in window:  # not taken (the shard stopped early): free their slots
                if chunk is not None and chunk is not pending:
                    decoder.abandon(chunk, pos)

    def _consume(self, items: list[_Item], good: list[_Item], outputs: dict[str, np.ndarray], task: ShardTask,
                 writer: ShardWriter) -> None:
        self.progress += len(items)
        for it in items:
            if not it.ok:
                err = it.error
                if err is None:
                    err = SampleError("read", *_split_reason(it.sample.error or "no_image: sample has no image"))
                writer.add_error(it.sample.key, it.sample.index, err.stage, err.reason, str(err))
        if not good:
            return
        cols: dict[str, Any] = {
            "key": [it.sample.key for it in good],
            "shard": [redact_url(task.url)] * len(good),
            "sample_index": [it.sample.index for it in good],
            "image_hash": [it.digest for it in good],
            "width": [it.width for it in good],
            "height": [it.height for it in good],
            "text": [it.sample.text for it in good],
            "meta": [it.sample.meta for it in good],
            **outputs,
        }
        writer.add_rows(cols)


def _split_reason(text: str) -> tuple[str, str]:
    reason, _, detail = text.partition(":")
    return (reason.strip() or "read_error"), (detail.strip() or text)


def _describe(e: BaseException, reason: Reason, url: str) -> str:
    if isinstance(e, ShardReadError) or reason is Reason.LEASE_LOST:
        return str(e)  # names the shard / the new holder already
    if reason in PERMANENT:
        return f"{redact_url(url)}: {type(e).__name__}: {e}"
    if reason is Reason.IO:
        return f"{type(e).__name__}: {e}"
    tb = traceback.format_exc(limit=3).strip().splitlines()
    return f"{type(e).__name__}: {e} | {' / '.join(tb[-3:])}"


def _failure(task: ShardTask, reason: Reason, error: str) -> ShardResult:
    error = redact_text(error)  # libraries quote the URLs they read, credentials and all
    log.warning("shard %s attempt %d failed (%s): %s", task.stem, task.attempt, reason, error)
    return ShardResult.failed(task.stem, reason, error)


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
            logging.basicConfig(level=logging.WARNING)
            self.processor = ShardProcessor(config)

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
