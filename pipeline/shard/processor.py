"""One shard end to end, top to bottom: the stages of the shard path wired in one function.

``ShardProcessor`` loads the model(s) once and turns one input shard into one committed
output (or a failure with its reason); it needs no Ray (:mod:`pipeline.worker` is the actor
around it). Threads: reading, decoding and batching run in ``shard-reader``, the model in
``shard-model``, the sink in the calling thread; bounded queues between them (at most
`prefetch` batches wait for the model, two encoded batches for the sink), so memory is
bounded whatever the shard size.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from schemas import fingerprint_digest, tokens_schema

from ..config import MAX_IMAGE_PIXELS, RESIZE_MODES
from ..faults import failpoint
from ..io import Storage, StorageOptions
from ..lease import check_fence
from ..preprocess import PreprocessConfig
from ..protocol import PERMANENT, Reason, ShardResult, ShardTask, failure_reason
from ..urls import redact_text, redact_url
from .batch import BufferPool, batches
from .decode import Decoder, decode_kind
from .encode import ModelSpec, Runner, encode
from .errors import ShardReadError
from .sink import ShardSink
from .sources import ParquetColumns, SampleSource, open_source
from .stage import Chain, StageStats

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
    decode_mode: str = "threads"   # as JobConfig.decode_mode; resolved per shard by decode_kind
    prefetch: int = 2
    row_group_rows: int = 1024
    torch_threads: int | None = None
    storage: StorageOptions = field(default_factory=StorageOptions)
    parquet: ParquetColumns = field(default_factory=ParquetColumns)  # Parquet inputs' columns
    lease_token: str | None = None  # the run's lease token: every commit checks it (None: no check)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the run's: in every file's metadata
    node: str = ""  # the Ray node the worker runs on (set by the actor): recorded in each manifest


class ShardProcessor:
    """Loads the model(s) once; `process` turns one input shard into one committed output."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.stats: dict[str, StageStats] = {}  # the current (or last) shard's, per stage
        self._progress = 0  # shards started, plus the items of the shards before the current one
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
        self.window = config.batch_size * 2  # samples in flight to the decoder ahead of the batch being filled
        self.decoder = self._decoder(safe_mode=False)
        # one buffer filling, `prefetch` queued, one in the model
        self.pool = BufferPool(config.prefetch + 2, config.batch_size, self.pre.image_size)

    @property
    def progress(self) -> int:
        """Moves on every shard start and every item of every stage: the driver's watchdog reads
        it (through the actor's control group) while a shard runs. Read without a lock: only
        that it moves matters."""
        return self._progress + sum(s.items for s in list(self.stats.values()))

    def close(self) -> None:
        self.decoder.close()

    def _decoder(self, safe_mode: bool) -> Decoder:
        """The worker's decoder, or for a shard in safe mode (a worker died on it) its own, if that differs."""
        kind = decode_kind(self.config.decode_mode, gpu_worker=self.runner.device.type == "cuda", safe_mode=safe_mode)
        current = getattr(self, "decoder", None)
        if current is not None and current.kind == kind:
            return current
        return Decoder(kind, self.config.decode_threads, self.pre, self.window)

    def process(self, task: ShardTask) -> ShardResult:
        """One attempt at one shard: committed, or failed with its reason (nothing committed)."""
        t0 = time.monotonic()
        self._progress = self.progress + 1
        self.stats = {}
        failpoint("shard_start", task.stem)
        sink = ShardSink(self.storage, task.stem, task.url, self.schema, self.config.fingerprint,
                         row_group_rows=self.config.row_group_rows)
        try:
            decoder = self._decoder(task.safe_mode)
            try:
                with open_source(task, self.config.storage, self.config.parquet) as source:
                    size, etag = source.size, source.etag
                    self._run(source, decoder, sink)
            finally:
                if decoder is not self.decoder:
                    decoder.close()
            token = self.config.lease_token
            manifest = sink.commit(input_size=size, input_etag=etag, attempts=task.attempt,
                                   seconds=time.monotonic() - t0, run_fingerprint=self.fingerprint_sha256,
                                   fence=(lambda: check_fence(self.storage, token)) if token else None,
                                   node=self.config.node)
            return ShardResult.committed(task.stem, manifest.to_json())
        except Exception as e:  # noqa: BLE001 - classified once; the driver decides on retries
            sink.discard()
            reason = failure_reason(e)
            return _failure(task, reason, _describe(e, reason, task.url))
        finally:
            sink.cleanup()

    def _run(self, source: SampleSource, decoder: Decoder, sink: ShardSink) -> None:
        """The shard path: input -> samples -> decode -> batch | model | sink (`|`: a thread boundary);
        the input is a tar, a Parquet file or a folder unit (pipeline/shard/sources.py)."""
        chain = Chain()
        self.stats = chain.stats
        chain.stats["write"] = sink.stats  # within the sink: Arrow rows and local Parquet
        try:
            samples = chain.source("read", source.samples())
            decoded = chain.stage("decode", decoder.map, samples)
            batched = chain.stage("batch", batches, decoded, self.pool, self.config.batch_size)
            batched = chain.thread(batched, self.config.prefetch, "shard-reader")
            encoded = chain.stage("encode", encode, batched, self.runner.run, self.pool)
            encoded = chain.thread(encoded, 2, "shard-model")
            for _ in chain.stage("sink", sink.write, encoded):
                pass
        finally:
            chain.close()


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
