"""Decoder backends: chunks of (key, bytes) in, per sample a :class:`Slot` or a :class:`SampleError`.

Used by :class:`pipeline.shard.decode.Decoder` (which owns the window); the two kinds:

* :class:`ThreadDecoder` decodes in a thread pool of the worker process. PIL releases the GIL
  while it decompresses and resizes, but not for its Python-level work (marker parsing, EXIF,
  the array conversion): measured here, about 0.5 ms of GIL per image, which caps one process
  near 2,000 img/s whatever its core count, and makes the model thread wait for the GIL
  between kernel launches.
* :class:`ProcessDecoder` decodes in long-lived spawned children (their own interpreters, so
  no GIL is shared). Bytes go to a child in chunks of up to 16 samples (one pickled message
  per chunk: about 30 us of the worker's time per image instead of ~250 us per single-sample
  task); pixels come back through a shared-memory ring of slots, one per sample in flight,
  so only a small tuple per sample crosses the pipe. A child that dies (a codec segfault,
  the OOM killer) breaks only the pool: the samples of the broken chunks are decoded again
  one at a time in a single fresh child, and one that kills that child too is recorded as
  ``decoder_crashed`` while the shard goes on.

The shared memory is an anonymous ``memfd`` (Linux) that each child inherits as a file
descriptor while it is spawned: it has no name, so nothing can be left behind in
``/dev/shm`` when a worker is SIGKILLed, and the kernel frees it with its last user; it is not
bounded by the size of ``/dev/shm`` (Docker's 64 MB default). Children also leave by
themselves when their worker dies (they watch their parent).
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..faults import failpoint
from ..preprocess import Decoded, PreprocessConfig, decode_image
from .errors import SampleError

log = logging.getLogger("wintok")

MAX_CHUNK = 16


def decode_sample(key: str, data: bytes, cfg: PreprocessConfig) -> Decoded:
    """`decode_image` behind the `decode` failpoint (fault-injection tests)."""
    failpoint("decode", key)
    return decode_image(data, cfg)


@dataclass
class Slot:
    """Decoded pixels: `pixels` is valid until `release` is called on the decoder."""

    pixels: np.ndarray
    width: int
    height: int
    digest: bytes  # image_hash of the encoded bytes, computed beside the decode
    index: int = -1  # shared-memory slot, -1 for a private array


def image_hash(data: bytes) -> bytes:
    """The `image_hash` column: BLAKE2b-128 of the image member's bytes as stored in the tar."""
    return hashlib.blake2b(data, digest_size=16).digest()


class Chunk:
    """Samples decoded together; `results()` once its future is done (order kept)."""

    def __init__(self, jobs: list[tuple[str, bytes]]) -> None:
        self.jobs = jobs
        self.slots: list[int] = []
        self.future: Future | None = None
        self.pool: Any = None
        self.outcomes: list[Slot | SampleError] | None = None

    def done(self) -> bool:
        return self.future is not None and self.future.done()


def _decode_one(key: str, data: bytes, cfg: PreprocessConfig) -> tuple[Decoded, bytes] | SampleError:
    """(pixels etc., image_hash) or the sample's error; a decoder bug must not fail its chunk."""
    try:
        return decode_sample(key, data, cfg), image_hash(data)
    except SampleError as e:
        return e
    except Exception as e:  # noqa: BLE001
        return SampleError("decode", "decoder_error", f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------ threads
class ThreadDecoder:
    """Decodes in threads of this process."""

    def __init__(self, threads: int, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.chunk_size = 1
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")

    def _run(self, jobs: list[tuple[str, bytes]]) -> list[Slot | SampleError]:
        out: list[Slot | SampleError] = []
        for key, data in jobs:
            r = _decode_one(key, data, self.cfg)
            out.append(r if isinstance(r, SampleError) else Slot(r[0].pixels, r[0].width, r[0].height, r[1]))
        return out

    def submit(self, chunk: Chunk) -> None:
        chunk.future = self.pool.submit(self._run, chunk.jobs)

    def results(self, chunk: Chunk) -> list[Slot | SampleError]:
        if chunk.outcomes is None:
            chunk.outcomes = chunk.future.result()
        return chunk.outcomes

    def release(self, slot: Slot) -> None:
        pass

    def abandon(self, chunk: Chunk, pos: int) -> None:
        pass

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------ processes (child side)
_CHILD: dict[str, Any] = {}


def _watch_parent(parent: int) -> None:
    # A killed worker (ray.kill, OOM killer) leaves its children blocked on the task queue, of
    # which they hold both ends: leave as soon as we are re-parented.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


class _SharedFd:
    """An fd that a spawned child inherits (multiprocessing passes it while spawning the child)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        from multiprocessing import reduction

        return (_detach, (reduction.DupFd(self.fd),))


def _detach(dup: Any) -> int:
    return dup.detach()


def _map(fd: int, shape: tuple[int, ...]) -> tuple[mmap.mmap, np.ndarray]:
    mm = mmap.mmap(fd, max(1, math.prod(shape)))
    return mm, np.ndarray(shape, np.uint8, buffer=mm)


def _child_init(fd: int, shape: tuple[int, ...], cfg: PreprocessConfig) -> None:
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="watch-parent").start()
    mm, buf = _map(fd, shape)
    os.close(fd)  # the mapping keeps the memory
    _CHILD.update(mm=mm, buf=buf, cfg=cfg)


def _child_decode(jobs: list[tuple[str, bytes, int]]) -> list[tuple[int, int, bytes] | SampleError]:
    buf, cfg = _CHILD["buf"], _CHILD["cfg"]
    out: list[tuple[int, int, bytes] | SampleError] = []
    for key, data, slot in jobs:
        r = _decode_one(key, data, cfg)
        if isinstance(r, SampleError):
            out.append(r)
            continue
        buf[slot] = r[0].pixels
        out.append((r[0].width, r[0].height, r[1]))
    return out


# ------------------------------------------------------------------ processes (worker side)
class ProcessDecoder:
    """`processes` spawned children; `slots` samples may be in flight (each holds a slot)."""

    def __init__(self, processes: int, cfg: PreprocessConfig, slots: int, chunk_size: int) -> None:
        self.processes = max(1, processes)
        self.cfg = cfg
        self.chunk_size = max(1, min(MAX_CHUNK, chunk_size))
        s = cfg.image_size
        self.shape = (slots, s, s, 3)
        # anonymous shared memory: no name to unlink, freed by the kernel with its last user,
        # and not limited by the size of /dev/shm
        self.fd = os.memfd_create("wintok-decode", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, max(1, math.prod(self.shape)))
        self.mm, self.buf = _map(self.fd, self.shape)
        self.free = list(range(slots - 1, -1, -1))
        self.ctx = mp.get_context("spawn")
        self.pool = self._pool(self.processes)
        self.solo: ProcessPoolExecutor | None = None
        self.crashes = 0

    def _pool(self, n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(n, mp_context=self.ctx, initializer=_child_init,
                                   initargs=(_SharedFd(self.fd), self.shape, self.cfg))

    def submit(self, chunk: Chunk) -> None:
        if len(self.free) < len(chunk.jobs):
            raise RuntimeError(f"decoder slots exhausted ({self.shape[0]}): more samples in flight than sized for")
        chunk.slots = [self.free.pop() for _ in chunk.jobs]
        chunk.pool = self.pool
        try:
            chunk.future = self.pool.submit(_child_decode, [(k, d, s) for (k, d), s in zip(chunk.jobs, chunk.slots, strict=True)])
        except BrokenProcessPool as e:  # broke before this submit: recovered in results()
            chunk.future = Future()
            chunk.future.set_exception(e)

    def results(self, chunk: Chunk) -> list[Slot | SampleError]:
        if chunk.outcomes is not None:
            return chunk.outcomes
        try:
            raw = chunk.future.result()
        except BrokenProcessPool:
            raw = self._recover(chunk)
        out: list[Slot | SampleError] = []
        for r, slot in zip(raw, chunk.slots, strict=True):
            if isinstance(r, SampleError):
                self.free.append(slot)
                out.append(r)
            else:
                out.append(Slot(self.buf[slot], r[0], r[1], r[2], slot))
        chunk.outcomes = out
        return out

    def _recover(self, chunk: Chunk) -> list[tuple[int, int, bytes] | SampleError]:
        """A child died: new pool for what comes next; this chunk's samples one by one, alone."""
        if chunk.pool is self.pool:  # the first broken chunk of this pool
            self.crashes += 1
            log.warning("a decoding process died; decoding its samples again one at a time")
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._pool(self.processes)
        out: list[tuple[int, int, bytes] | SampleError] = []
        for (key, data), slot in zip(chunk.jobs, chunk.slots, strict=True):
            if self.solo is None:
                self.solo = self._pool(1)
            try:
                out.extend(self.solo.submit(_child_decode, [(key, data, slot)]).result())
            except BrokenProcessPool:
                self.solo.shutdown(wait=False, cancel_futures=True)
                self.solo = None
                out.append(SampleError("decode", "decoder_crashed",
                                       "the decoding process died on this sample (isolated and confirmed)"))
        return out

    def release(self, slot: Slot) -> None:
        if slot.index >= 0:
            self.free.append(slot.index)

    def abandon(self, chunk: Chunk, pos: int) -> None:
        """Result `pos` of a submitted chunk will not be taken: free its slot once no child can write it."""
        if chunk.outcomes is not None:
            r = chunk.outcomes[pos]
            if isinstance(r, Slot):
                self.free.append(r.index)
            return
        try:
            chunk.future.result()
        except BaseException:  # noqa: BLE001 - a broken pool: its children are gone
            pass
        self.free.append(chunk.slots[pos])

    def in_flight(self) -> int:
        return self.shape[0] - len(self.free)

    def close(self) -> None:
        for pool in (self.pool, self.solo):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self.buf = None  # type: ignore[assignment]
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.mm.close()
        except BufferError:  # a view still alive somewhere: the mapping goes with it
            pass


def make_decoder(kind: str, workers: int, cfg: PreprocessConfig, in_flight: int) -> ThreadDecoder | ProcessDecoder:
    """The backend of `kind` (from :func:`decode_kind`); `in_flight`: the most samples the caller
    holds undecoded or not yet copied out."""
    if kind not in ("threads", "processes"):
        raise ValueError(f"decode mode must be threads or processes here, not {kind!r}")
    if kind == "threads":
        return ThreadDecoder(workers, cfg)
    # at least two chunks per child in flight, so that none waits on the round trip
    chunk = max(1, min(MAX_CHUNK, in_flight // (2 * max(1, workers))))
    return ProcessDecoder(workers, cfg, in_flight, chunk)
