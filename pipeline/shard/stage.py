"""What every stage shares: its stats, and the one helper that runs a stage in its own thread.

A stage is a plain iterator over its upstream. :class:`Chain` wires stages, gives each a
:class:`StageStats` (items, busy and waiting seconds, kept by the stage itself as it runs)
and closes them all, last first, however the shard ends. :func:`threaded` runs an iterator in
a thread behind a bounded queue: items and the iterator's exception come out in order, and
closing the consumer's side stops the thread (the iterator is closed in its own thread).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


@dataclass
class StageStats:
    """One stage over one shard: items it gave, seconds working, seconds waiting for its upstream."""

    items: int = 0
    busy: float = 0.0
    waiting: float = 0.0
    thread: str = ""  # the thread that ran it

    def pull(self, upstream: Iterable[T]) -> Iterator[T]:
        """`upstream`, with the time spent waiting for each item counted as waiting."""
        it = iter(upstream)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.waiting += time.perf_counter() - t
            yield item

    def meter(self, produced: Iterable[T]) -> Iterator[T]:
        """`produced`, counting its items and its busy time (time to produce, less waiting)."""
        it = iter(produced)
        self.thread = threading.current_thread().name
        while True:
            t, waited = time.perf_counter(), self.waiting
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.busy += time.perf_counter() - t - (self.waiting - waited)
            self.items += 1
            yield item


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def threaded(iterable: Iterable[T], maxsize: int, name: str) -> Iterator[T]:
    """Iterate `iterable` in a thread named `name`, at most `maxsize` items ahead of the consumer.

    Its exception is raised here after the items before it. Closing this generator (or leaving
    it with an exception) stops the thread, closes `iterable` there and waits for the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
    stop = threading.Event()

    def run() -> None:
        it = iter(iterable)
        try:
            for item in it:
                if not _put(q, (item, None), stop):
                    return
            _put(q, _END, stop)
        except BaseException as e:  # noqa: BLE001 - raised in the consumer's thread
            _put(q, (None, e), stop)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is _END:
                return
            item, error = got
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # drain, so that a put in flight does not wait out its timeout
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class Chain:
    """The stages of one shard: their stats by name, closed together (last first) by `close`."""

    def __init__(self) -> None:
        self.stats: dict[str, StageStats] = {}
        self._open: list[Iterator[Any]] = []

    def source(self, name: str, produced: Iterable[T]) -> Iterator[T]:
        """The first stage (no upstream to wait for)."""
        stats = self.stats[name] = StageStats()
        return self._keep(stats.meter(self._keep(iter(produced))))

    def stage(self, name: str, fn: Callable[..., Iterable[T]], upstream: Iterable[Any], *args: Any) -> Iterator[T]:
        """``fn(upstream, *args)``, metered as `name`."""
        stats = self.stats[name] = StageStats()
        produced = iter(fn(self._keep(stats.pull(upstream)), *args))
        return self._keep(stats.meter(self._keep(produced)))

    def thread(self, upstream: Iterable[T], maxsize: int, name: str) -> Iterator[T]:
        """`upstream` runs on in a thread of its own (:func:`threaded`)."""
        return self._keep(threaded(upstream, maxsize, name))

    def _keep(self, it: Iterator[T]) -> Iterator[T]:
        self._open.append(it)
        return it

    def close(self) -> None:
        for it in reversed(self._open):  # downstream first: a thread is stopped before its iterator
            close = getattr(it, "close", None)
            if close is not None:
                close()
