"""Decoded samples -> batches: pixels copied into reusable (B, S, S, 3) uint8 buffers."""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .decode import DecodedSample


class BufferPool:
    """`count` reusable batch buffers, allocated once per worker; never waits for one."""

    def __init__(self, count: int, batch_size: int, image_size: int) -> None:
        self.count, self.shape = count, (batch_size, image_size, image_size, 3)
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(np.empty(self.shape, np.uint8))

    def take(self) -> np.ndarray:
        try:
            return self._free.get_nowait()
        except queue.Empty:  # only if a buffer was lost on a failure path: never wait for one
            return np.empty(self.shape, np.uint8)

    def give(self, pixels: np.ndarray | None) -> None:
        if pixels is not None and self._free.qsize() < self.count:
            self._free.put(pixels)


@dataclass
class Batch:
    """Samples in order; rows [0, n) of `pixels` are those decoded (``ok``), in the same order."""

    items: list[DecodedSample]
    pixels: np.ndarray | None  # a pool buffer (give it back once used), None without a decoded image
    n: int


def batches(decoded: Iterable[tuple[DecodedSample, np.ndarray | None]], pool: BufferPool,
            size: int) -> Iterator[Batch]:
    """A batch as soon as `size` images are decoded (samples with errors ride along), then the rest."""
    items: list[DecodedSample] = []
    pixels: np.ndarray | None = None
    n = 0
    try:
        for item, image in decoded:
            items.append(item)
            if image is None:
                continue
            if pixels is None:
                pixels = pool.take()
            pixels[n] = image
            n += 1
            if n == size:
                batch, items, pixels, n = Batch(items, pixels, n), [], None, 0
                yield batch
        if items:
            batch, items, pixels, n = Batch(items, pixels, n), [], None, 0
            yield batch
    finally:
        pool.give(pixels)  # a buffer being filled when the consumer stopped
