"""A Parquet file with an image-bytes column -> samples, row group by row group.

The file is opened through fsspec (seekable: the footer first, then one row group at a time,
`BATCH_ROWS` rows per Arrow batch, only the columns asked for), so memory holds one row
group's column chunks at most, never the file. Columns (:class:`ParquetColumns`, flags
``--image-column`` / ``--key-column`` / ``--text-column`` / ``--meta-column``):

* the image column holds ``{"bytes", "path"}`` structs (the layout HF ``datasets`` writes for
  its ``Image`` feature) or plain binary; a row without bytes (a null, or a struct with only a
  ``path``) is a ``no_image`` error record;
* the key column's value (as a string) is the key; without one, the row's index in the file
  (``00000042``). A key seen before in the file makes that later row ``duplicate_key``, as in tars;
* the text column (a string) becomes ``text``; the meta column ``meta`` (a string as it is,
  anything else as JSON).

`sample_index` is the row's index in the file. A row group that cannot be read (corrupt pages,
bad compression) makes each of its rows not yet yielded a ``row_group_unreadable`` error record
and the file goes on with the next row group; a failed read of the underlying stream is an
I/O error (retried, then the unit fails). A file that is not Parquet, or lacks the image
column, or holds it in another type, fails the unit at once (:class:`ShardReadError`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..io import StorageOptions, get_fs, input_info
from ..urls import redact_url
from .errors import SampleError, ShardReadError
from .samples import RawSample
from .sources import ParquetColumns

BATCH_ROWS = 64


class _Tracked:
    """The fsspec file as pyarrow reads it, remembering whether the stream itself failed (so that
    its I/O error is not taken for a corrupt row group)."""

    def __init__(self, f: Any) -> None:
        self.f, self.failed = f, False

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.f, name)(*args)
        except BaseException:
            self.failed = True
            raise

    def read(self, n: int = -1) -> bytes:
        return self._call("read", n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call("seek", offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self.f.closed

    def close(self) -> None:
        self.f.close()

    @property
    def size(self) -> Any:
        return getattr(self.f, "size", None)


def _binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


class ParquetSource:
    """The samples of one Parquet file, in row order."""

    def __init__(self, url: str, storage: StorageOptions, columns: ParquetColumns) -> None:
        self.url, self.columns = url, columns
        self.shown = redact_url(url)
        fs, path = get_fs(url, storage)
        self.size, self.etag = input_info(url, storage)
        self.file = _Tracked(fs.open(path, "rb"))
        try:
            self.pf = pq.ParquetFile(self.file)
        except (pa.ArrowException, OSError, ValueError) as e:
            self.file.close()
            if self.file.failed:
                raise
            raise ShardReadError(f"{self.shown}: not a readable Parquet file: {e}") from None
        self._check_columns()

    def close(self) -> None:
        self.file.close()

    def _check_columns(self) -> None:
        schema = self.pf.schema_arrow
        c = self.columns
        for role, name in (("image", c.image), ("key", c.key), ("text", c.text), ("meta", c.meta)):
            if name is not None and name not in schema.names:
                raise ShardReadError(f"{self.shown} has no {role} column {name!r} (columns: "
                                     f"{', '.join(schema.names)}): give --{role}-column")
        t = schema.field(c.image).type
        ok = _binary(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
                            and _binary(t.field("bytes").type))
        if not ok:
            raise ShardReadError(f"{self.shown}: image column {c.image!r} is {t}, not binary or a "
                                 "{bytes, path} struct: give --image-column")

    def samples(self) -> Iterator[RawSample]:
        c = self.columns
        names = list(dict.fromkeys(n for n in (c.image, c.key, c.text, c.meta) if n is not None))
        seen: dict[str, int] = {}
        index = 0
        for rg in range(self.pf.num_row_groups):
            end = index + self.pf.metadata.row_group(rg).num_rows
            try:
                for batch in self.pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=names,
                                                  use_threads=False):
                    for row in batch.to_pylist():
                        if index >= end:
                            raise ValueError(f"row group {rg} holds more rows than its metadata says")
                        yield self._sample(row, index, seen)
                        index += 1
                if index != end:
                    raise ValueError(f"row group {rg} ended after {index} of its rows")
            except (pa.ArrowException, OSError, ValueError) as e:
                if self.file.failed:
                    raise  # the stream's own I/O error: retried by the caller's policy
                detail = f"row group {rg} of {self.shown} cannot be read: {type(e).__name__}: {e}".replace("\n", " ")
                for i in range(index, end):
                    yield RawSample(key=f"{i:08d}", index=i, image=None, image_ext=None, text=None, meta=None,
                                    error=SampleError("read", "row_group_unreadable", detail[:1000]))
                index = end

    def _sample(self, row: dict[str, Any], index: int, seen: dict[str, int]) -> RawSample:
        c = self.columns
        key = f"{index:08d}" if c.key is None or row.get(c.key) is None else str(row[c.key])
        text = row.get(c.text) if c.text else None
        meta = row.get(c.meta) if c.meta else None
        if meta is not None and not isinstance(meta, str):
            meta = json.dumps(meta, default=str, sort_keys=True)
        sample = RawSample(key=key, index=index, image=None, image_ext=None,
                           text=None if text is None else str(text), meta=meta, error=None)
        first = seen.setdefault(key, index)
        value = row.get(c.image)
        data = value.get("bytes") if isinstance(value, dict) else value
        if first != index:
            sample.error = SampleError("read", "duplicate_key", f"key {key!r} was already used by row {first} "
                                                                "of this file")
        elif c.key is not None and row.get(c.key) is None:
            sample.error = SampleError("read", "missing_key", f"row {index} has no value in key column {c.key!r}")
        elif not data:
            path = value.get("path") if isinstance(value, dict) else None
            sample.error = SampleError("read", "no_image", f"row {index} has no image bytes"
                                                           + (f" (only a path: {path!r})" if path else ""))
        else:
            sample.image = bytes(data)
        return sample
