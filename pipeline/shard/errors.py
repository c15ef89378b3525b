"""The two errors of the shard path: one sample unusable, or the whole shard unreadable."""

from __future__ import annotations


class SampleError(Exception):
    """A single sample cannot be used; ``reason`` is a short code, ``str(e)`` = 'reason: detail'.

    ``stage`` names where it was found (``read``: the tar's members; ``decode``: the image bytes).
    Travels on the sample (``RawSample.error``) and becomes its error record; never parsed back.
    """

    def __init__(self, stage: str, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.stage = stage
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[SampleError], tuple[str, str, str]]:
        return (type(self), (self.stage, self.reason, self.detail))

    def __repr__(self) -> str:
        return f"SampleError({self.stage!r}, {self.reason!r}, {self.detail!r})"


class ShardReadError(Exception):
    """The shard as a whole cannot be read: not a tar, truncated, or corrupt."""
