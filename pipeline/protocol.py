"""What driver and worker say to each other: a `ShardTask` out, a `ShardResult` back.

`Reason` is the one vocabulary for why a shard attempt failed: the worker classifies its
exception into one (`failure_reason`), the driver decides on retries by it (`PERMANENT`), and
the summary, `_failed/<stem>.json` and the tests use its values. Nobody parses a message back
into a code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Why a shard attempt failed: the `reason` of a failed result and of `_failed/<stem>.json`."""

    NOT_FOUND = "not_found"        # the input (or a folder on its path) does not exist
    PERMISSION = "permission"      # access denied
    SHARD_READ = "shard_read"      # malformed input: not a tar, truncated, corrupt
    IO = "io"                      # a storage error still there after io.py's own retries
    WORKER_ERROR = "worker_error"  # anything else raised while processing
    WORKER_DIED = "worker_died"    # the worker process died (crash, node lost)
    OOM = "oom"                    # killed for memory
    TIMEOUT = "timeout"            # no progress for `shard_timeout` seconds: the worker was replaced
    LEASE_LOST = "lease_lost"      # another run holds OUTPUT now: nothing was committed, the run stops


# failures that cannot go away by trying again: the shard fails at once, without backoff
PERMANENT: frozenset[Reason] = frozenset({Reason.NOT_FOUND, Reason.PERMISSION, Reason.SHARD_READ})
# the worker process died on the shard: its retry decodes in crash-isolating child processes
WORKER_LOST: frozenset[Reason] = frozenset({Reason.WORKER_DIED, Reason.OOM})


def failure_reason(exc: BaseException) -> Reason:
    """The reason of a shard attempt that raised `exc` (the one place exceptions are classified)."""
    from .lease_file import LeaseLost
    from .shard.errors import ShardReadError

    if isinstance(exc, LeaseLost):
        return Reason.LEASE_LOST
    if isinstance(exc, ShardReadError | IsADirectoryError):
        return Reason.SHARD_READ
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return Reason.NOT_FOUND
    if isinstance(exc, PermissionError):
        return Reason.PERMISSION
    if isinstance(exc, OSError):
        return Reason.IO
    return Reason.WORKER_ERROR


INPUT_KINDS = ("tar", "folder", "parquet")  # what a work unit is read as (pipeline/inputs.py decides)


@dataclass(frozen=True)
class FolderFile:
    """One sample of an image-folder unit: a file below the folder, with its sidecars."""

    rel: str                  # path relative to the folder: the sample's key
    size: int
    text: str | None = None   # rel of the `.txt` beside it
    meta: str | None = None   # rel of the `.json` beside it


@dataclass(frozen=True)
class ShardTask:
    """One attempt at one work unit: a tar shard, a Parquet file, or N files of an image folder."""

    url: str
    stem: str
    attempt: int
    safe_mode: bool = False   # decode in child processes (after a worker died on this shard)
    kind: str = "tar"         # one of INPUT_KINDS
    files: tuple[FolderFile, ...] = ()  # kind "folder": the unit's files, in order (`url` is the folder)

    def retry(self, safe_mode: bool = False) -> ShardTask:
        return dataclasses.replace(self, attempt=self.attempt + 1, safe_mode=self.safe_mode or safe_mode)


@dataclass(frozen=True)
class ShardResult:
    """The outcome of a `ShardTask`: committed (`manifest` holds the commit record's JSON) or failed."""

    stem: str
    manifest: str | None = None
    reason: Reason | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.manifest is not None

    @classmethod
    def committed(cls, stem: str, manifest_json: str) -> ShardResult:
        return cls(stem, manifest=manifest_json)

    @classmethod
    def failed(cls, stem: str, reason: Reason, error: str) -> ShardResult:
        return cls(stem, reason=Reason(reason), error=error[:4000])
