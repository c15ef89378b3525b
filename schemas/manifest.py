"""The commit record of one shard (`_manifest/<stem>.json`), failure records, and the run fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .tokens import SCHEMA_VERSION


@dataclass(frozen=True)
class FileRecord:
    path: str      # relative to OUTPUT
    bytes: int
    sha256: str
    rows: int


@dataclass(frozen=True)
class Manifest:
    """Written last: a shard is committed iff this exists and matches its files."""

    stem: str
    input_url: str
    input_size: int | None
    input_etag: str | None
    samples: int                     # every sample seen in the input shard
    rows: int                        # in shards/<stem>.parquet
    errors: int                      # in errors/<stem>.parquet
    shards_file: FileRecord
    errors_file: FileRecord | None
    errors_by_reason: dict[str, int]
    attempts: int
    seconds: float
    run_fingerprint: str
    worker: str = ""                 # host name of the worker
    finished_at: str = ""
    schema_version: int = SCHEMA_VERSION
    node: str = ""                   # Ray node id of the worker ("" outside Ray)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        d["shards_file"] = FileRecord(**d["shards_file"])
        if d.get("errors_file"):
            d["errors_file"] = FileRecord(**d["errors_file"])
        return cls(**d)


@dataclass(frozen=True)
class FailureRecord:
    """`_failed/<stem>.json`: a shard that exhausted its retries in some run."""

    stem: str
    input_url: str
    reason: str          # short code: shard_read, io, worker_died, oom, ...
    error: str
    attempts: int
    failed_at: str = ""
    history: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FailureRecord:
        return cls(**json.loads(text))


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """Stable sha256 of a fingerprint dict (canonical JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
