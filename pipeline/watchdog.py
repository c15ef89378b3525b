"""The shard watchdog: "no progress for `timeout` seconds" becomes a verdict, per worker slot.

Each worker keeps a counter that moves on every shard start and every sample read, decoded
and written (`ShardProcessor.progress`). The driver probes it at a bounded interval (not once
per loop turn) and tells the watchdog what it saw; a slot whose counter has not moved for
`timeout` seconds while it holds a shard is stalled. A probe that gets no answer counts as no
progress, so a worker wedged beyond answering is caught as well. This class holds no Ray
handles and reads no clock of its own: the caller passes the time, which keeps it testable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Seen:
    value: int | None   # the counter as last seen (None: not yet probed since the slot started)
    moved_at: float     # when it was last seen to move, or when the slot's current shard started


class Watchdog:
    def __init__(self, timeout: float, interval: float | None = None) -> None:
        if timeout <= 0:
            raise ValueError("the watchdog's timeout must be > 0 seconds")
        self.timeout = timeout
        # a quarter of the timeout, between 0.2 and 10 s: detection within timeout + interval
        self.interval = interval if interval is not None else min(max(timeout / 4, 0.2), 10.0)
        self._seen: dict[int, _Seen] = {}
        self._next_probe = float("-inf")

    def probe_due(self, now: float) -> bool:
        """True at most once per `interval`: time to probe the busy slots' counters."""
        if now < self._next_probe:
            return False
        self._next_probe = now + self.interval
        return True

    def started(self, slot: int, now: float) -> None:
        """A shard began on `slot` (it was idle, or the one before it returned): its clock restarts."""
        prev = self._seen.get(slot)
        self._seen[slot] = _Seen(prev.value if prev else None, now)

    def seen(self, slot: int, value: int, now: float) -> None:
        """A probe of `slot` answered `value`."""
        prev = self._seen.get(slot)
        if prev is None:
            self._seen[slot] = _Seen(value, now)
        elif value != prev.value:
            prev.value, prev.moved_at = value, now

    def forget(self, slot: int) -> None:
        """The slot's worker is gone (replaced): nothing it said counts for the next one."""
        self._seen.pop(slot, None)

    def stalled(self, busy: set[int], now: float) -> dict[int, float]:
        """Busy slots without progress for longer than the timeout -> seconds since they last moved."""
        out = {}
        for slot in busy:
            s = self._seen.setdefault(slot, _Seen(None, now))  # busy but never started: from now
            if now - s.moved_at > self.timeout:
                out[slot] = now - s.moved_at
        return out
