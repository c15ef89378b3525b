"""Decoding with the failpoint hook, and a safe mode that decodes in child processes.

A sample that crashes the decoder (a segfault in a codec, a memory blow-up) would kill the
whole worker again on every retry. In safe mode, which the driver asks for after a worker
died on a shard, each image is decoded in a process pool: a death breaks only the pool, the
in-flight samples are re-decoded one by one in a fresh process, and the one that kills its
process again is recorded as an error ("decoder_crashed") while the shard goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .faults import failpoint
from .preprocess import Decoded, PreprocessConfig, SampleError, decode_image


def decode_sample(key: str, data: bytes, cfg: PreprocessConfig) -> Decoded:
    failpoint("decode", key)
    return decode_image(data, cfg)


class IsolatedDecoder:
    """Thread-safe: call `decode` from many threads; each call runs in a child process."""

    def __init__(self, processes: int) -> None:
        self.processes = max(1, processes)
        self.ctx = mp.get_context("spawn")
        self.lock = threading.Lock()
        self.pool = ProcessPoolExecutor(self.processes, mp_context=self.ctx)

    def decode(self, key: str, data: bytes, cfg: PreprocessConfig) -> Decoded:
        pool = self.pool
        try:
            return pool.submit(decode_sample, key, data, cfg).result()
        except BrokenProcessPool:
            with self.lock:
                if self.pool is pool:
                    self.pool = ProcessPoolExecutor(self.processes, mp_context=self.ctx)
                    pool.shutdown(wait=True)  # joins its manager, so its queues (and semaphores) go
        with ProcessPoolExecutor(1, mp_context=self.ctx) as solo:
            try:
                return solo.submit(decode_sample, key, data, cfg).result()
            except BrokenProcessPool:
                raise SampleError("decode", "decoder_crashed",
                                  "the decoding process died on this sample (isolated and confirmed)") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
