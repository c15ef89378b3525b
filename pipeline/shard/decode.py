"""Samples -> decoded pixels: :meth:`Decoder.map`, in threads or in child processes.

``Decoder(kind, workers, cfg, window).map(samples)`` yields, in input order, one
``(DecodedSample, pixels | None)`` per sample; the pixels are valid until the next item is
drawn (copy them out). Inside, at most ``window`` samples are in flight: they go to the
backend in *chunks*, whose results come back per sample as a :class:`Slot` (pixels, released
once the consumer moves on) or a :class:`SampleError`; when the consumer stops early (the
generator is closed), what is still in flight is abandoned and its slots are freed.
:func:`decode_kind` is the one rule for which kind a worker uses.
The backends (thread pool; spawned children writing into shared memory) are in
:mod:`pipeline.shard.backends`.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..preprocess import PreprocessConfig
from .backends import (
    MAX_CHUNK,
    Chunk,
    ProcessDecoder,
    Slot,
    ThreadDecoder,
    decode_sample,
    image_hash,
    make_decoder,
)
from .errors import SampleError
from .samples import RawSample

__all__ = ["DECODE_MODES", "MAX_CHUNK", "Chunk", "DecodedSample", "Decoder", "ProcessDecoder", "Slot",
           "ThreadDecoder", "decode_kind", "decode_sample", "image_hash", "make_decoder"]

log = logging.getLogger("wintok")


DECODE_MODES = ("auto", "threads", "processes")


def decode_kind(mode: str, *, gpu_worker: bool, safe_mode: bool = False, memfd: bool | None = None) -> str:
    """The one rule for how a worker decodes: ``threads`` or ``processes``.

    ``mode`` as configured (JobConfig.decode_mode): ``auto`` is processes on GPU workers (the
    model's thread must not wait for the GIL), threads on CPU ones (no copies through shared
    memory). ``safe_mode`` (a worker died on this shard): processes, where a crash costs one
    sample. Processes need Linux (``os.memfd_create``; ``memfd``: override the detection).
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, not {mode!r}")
    kind = ("processes" if gpu_worker else "threads") if mode == "auto" else mode
    if safe_mode:
        kind = "processes"
    if kind == "processes" and not (hasattr(os, "memfd_create") if memfd is None else memfd):
        log.warning("decoding in threads: decode processes need Linux (os.memfd_create)")
        kind = "threads"
    return kind


# ------------------------------------------------------------------ the stage
@dataclass
class DecodedSample:
    """One sample after decoding: its pixels (when ``ok``) travel beside it, see `Decoder.map`."""

    sample: RawSample
    ok: bool = False
    width: int = 0
    height: int = 0
    error: SampleError | None = None  # the read error (sample.error) or the decode error
    digest: bytes = b""  # image_hash of the image member's bytes


@dataclass
class _Entry:
    sample: RawSample
    chunk: Chunk | None  # None: nothing to decode (a read error)
    pos: int = 0


class Decoder:
    """Decodes a stream of samples with a bounded window, in threads or child processes."""

    def __init__(self, kind: str, workers: int, cfg: PreprocessConfig, window: int) -> None:
        self.kind, self.window = kind, window
        self.backend = make_decoder(kind, workers, cfg, window + 1)  # + the one being copied out

    def warm(self) -> None:
        """Start the backend (a child process) before the first shard; decodes nothing."""
        chunk = Chunk([])
        self.backend.submit(chunk)
        self.backend.results(chunk)

    def map(self, samples: Iterable[RawSample]) -> Iterator[tuple[DecodedSample, np.ndarray | None]]:
        """(decoded, pixels) per sample in input order; pixels valid until the next item is drawn."""
        window: deque[_Entry] = deque()
        self._pending: Chunk | None = None  # filling; submitted when full or when its turn comes
        held: Slot | None = None  # the slot whose pixels the consumer holds
        try:
            for sample in samples:
                entry = _Entry(sample, None)
                if sample.error is None and sample.image is not None:
                    entry.chunk, entry.pos = self._add(sample)
                window.append(entry)
                while len(window) > self.window or (window and self._ready(window[0])):
                    out, held = self._take(window.popleft())
                    yield out
                    held = self._release(held)
            self._flush()
            while window:
                out, held = self._take(window.popleft())
                yield out
                held = self._release(held)
        finally:
            self._release(held)
            for entry in window:  # not taken (the consumer stopped early): free their slots
                if entry.chunk is not None and entry.chunk is not self._pending:
                    self.backend.abandon(entry.chunk, entry.pos)
            self._pending = None

    def _add(self, sample: RawSample) -> tuple[Chunk, int]:
        if self._pending is None:
            self._pending = Chunk([])
        chunk = self._pending
        chunk.jobs.append((sample.key, sample.image or b""))
        if len(chunk.jobs) >= self.backend.chunk_size:
            self._flush()
        return chunk, len(chunk.jobs) - 1

    def _flush(self) -> None:
        if self._pending is not None:
            chunk, self._pending = self._pending, None
            self.backend.submit(chunk)

    @staticmethod
    def _ready(entry: _Entry) -> bool:
        return entry.chunk is None or entry.chunk.done()

    def _take(self, entry: _Entry) -> tuple[tuple[DecodedSample, np.ndarray | None], Slot | None]:
        if entry.chunk is None:
            return (DecodedSample(entry.sample, error=entry.sample.error), None), None
        if entry.chunk is self._pending:
            self._flush()
        r = self.backend.results(entry.chunk)[entry.pos]
        if isinstance(r, SampleError):
            return (DecodedSample(entry.sample, error=r), None), None
        return (DecodedSample(entry.sample, True, r.width, r.height, digest=r.digest), r.pixels), r

    def _release(self, slot: Slot | None) -> None:
        if slot is not None:
            self.backend.release(slot)

    def close(self) -> None:
        self.backend.close()
