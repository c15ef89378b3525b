"""The shard sink: rows and errors -> local Parquet -> upload -> manifest last (or discard).

:meth:`ShardSink.write` is the last stage (encoded batches in: error records and rows out);
`add_rows` / `add_error` / `commit` / `discard` are the sink's whole interface.

Files are written to a local temporary folder while the shard is processed (memory stays
bounded: row groups are flushed as they fill), then uploaded whole to their final keys;
`_manifest/<stem>.json` goes last. A crash at any point leaves either nothing, a complete
data file without a manifest (not committed: the retry overwrites it), or a commit.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import FileRecord, Manifest, build_rows, errors_schema, is_tensor_type

from ..faults import failpoint
from ..io import Storage, sha256_file
from ..layout import errors_rel, manifest_rel, shards_rel
from ..urls import redact_url
from .encode import Encoded
from .stage import StageStats


class _ParquetSink:
    def __init__(self, path: str, schema: pa.Schema, row_group_rows: int) -> None:
        self.path, self.schema, self.row_group_rows = path, schema, row_group_rows
        self.writer = pq.ParquetWriter(  # ids and floats (all tensor columns) without dictionaries
            path, schema, compression="zstd",
            use_dictionary=[f.name for f in schema if not is_tensor_type(f.type)],
            write_statistics=["key", "sample_index", "width", "height"] if "width" in schema.names
            else ["key", "sample_index"],
        )
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        if self.pending_rows >= self.row_group_rows:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_batches(self.pending, self.schema), self.row_group_rows)
            self.rows += self.pending_rows
            self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


class ShardSink:
    """Collects one shard's rows and errors; `commit` uploads data files, then the manifest."""

    def __init__(self, storage: Storage, stem: str, shard_url: str, schema: pa.Schema,
                 fingerprint: dict[str, Any], row_group_rows: int = 1024, tmp_root: str | None = None) -> None:
        # the input as stored (manifest, error rows): without credentials
        self.storage, self.stem, self.shard_url = storage, stem, redact_url(shard_url)
        self.tmpdir = tempfile.mkdtemp(prefix="wintok-shard-", dir=tmp_root)
        self.rows = _ParquetSink(os.path.join(self.tmpdir, "rows.parquet"), schema, row_group_rows)
        self.errors_schema = errors_schema(fingerprint)
        self.error_rows: list[dict[str, Any]] = []
        self.reasons: Counter[str] = Counter()
        self.samples = 0
        self.stats = StageStats(thread="")  # add_rows alone: Arrow rows and local Parquet

    def write(self, encoded: Iterable[Encoded]) -> Iterator[int]:
        """Each batch's samples as error records and rows, in sample order; yields the samples added."""
        for items, outputs in encoded:
            for it in items:
                if not it.ok:
                    err = it.error
                    assert err is not None, it  # every sample that is not decoded says why
                    self.add_error(it.sample.key, it.sample.index, err.stage, err.reason, str(err))
            good = [it for it in items if it.ok]
            if good:
                self.add_rows({
                    "key": [it.sample.key for it in good],
                    "shard": [self.shard_url] * len(good),
                    "sample_index": [it.sample.index for it in good],
                    "image_hash": [it.digest for it in good],
                    "width": [it.width for it in good],
                    "height": [it.height for it in good],
                    "text": [it.sample.text for it in good],
                    "meta": [it.sample.meta for it in good],
                    **outputs,
                })
            yield len(items)

    def add_rows(self, columns: dict[str, Any]) -> None:
        t = time.perf_counter()
        batch = build_rows(self.rows.schema, columns)
        self.samples += batch.num_rows
        self.rows.add(batch)
        self.stats.items += batch.num_rows
        self.stats.busy += time.perf_counter() - t

    def add_error(self, key: str, index: int, stage: str, reason: str, error: str) -> None:
        self.samples += 1
        self.reasons[reason] += 1
        self.error_rows.append({"key": key, "shard": self.shard_url, "sample_index": index,
                                "stage": stage, "reason": reason, "error": error[:2000]})

    def commit(self, *, input_size: int | None, input_etag: str | None, attempts: int, seconds: float,
               run_fingerprint: str, fence: Callable[[], None] | None = None, node: str = "") -> Manifest:
        """Upload the data files, then the manifest. `fence` (the lease check) runs before the
        first upload and again right before the manifest: a run that lost its lease raises there
        and commits nothing (and overwrites no file another run has committed)."""
        self.rows.close()
        if fence is not None:
            fence()
        data_rel = shards_rel(self.stem)
        shards_file = FileRecord(data_rel, os.path.getsize(self.rows.path), sha256_file(self.rows.path),
                                 self.rows.rows)
        errors_file = None
        if self.error_rows:
            epath = os.path.join(self.tmpdir, "errors.parquet")
            table = pa.Table.from_pylist(sorted(self.error_rows, key=lambda r: r["sample_index"]),
                                         schema=self.errors_schema)
            pq.write_table(table, epath, compression="zstd")
            errors_file = FileRecord(errors_rel(self.stem), os.path.getsize(epath), sha256_file(epath),
                                     table.num_rows)
            self.storage.put_file(epath, errors_file.path)
        else:
            self.storage.delete(errors_rel(self.stem))  # a stale file of an earlier attempt
        self.storage.put_file(self.rows.path, data_rel)
        manifest = Manifest(
            stem=self.stem, input_url=self.shard_url, input_size=input_size, input_etag=input_etag,
            samples=self.samples, rows=self.rows.rows, errors=len(self.error_rows),
            shards_file=shards_file, errors_file=errors_file, errors_by_reason=dict(self.reasons),
            attempts=attempts, seconds=round(seconds, 3), run_fingerprint=run_fingerprint,
            worker=socket.gethostname(), node=node, finished_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        )
        failpoint("before_manifest", self.stem)
        if fence is not None:
            fence()
        self.storage.put_bytes(manifest.to_json().encode(), manifest_rel(self.stem))
        return manifest

    def discard(self) -> None:
        """Abandon the shard: nothing was made visible; `cleanup` removes the local files."""
        try:
            self.rows.writer.close()
        except Exception:  # noqa: BLE001 - a half-written local file is being thrown away
            pass

    def cleanup(self) -> None:
        """Remove the local temporary folder (after a commit or a discard)."""
        shutil.rmtree(self.tmpdir, ignore_errors=True)
