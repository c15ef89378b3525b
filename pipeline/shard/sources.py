"""Work unit -> samples: the first stage of the shard path, one source per input kind.

:func:`open_source` opens a :class:`pipeline.protocol.ShardTask`'s input and gives a
:class:`SampleSource`: ``samples()`` yields its :class:`RawSample` in order (every sample, good
or not: one that cannot be used carries its ``SampleError`` and becomes an error record), and
``size`` / ``etag`` are what the manifest records about the input. A unit that cannot be read
as a whole raises :class:`ShardReadError` (permanent) or an ``OSError`` (retried).

* ``tar``: the shard streamed through :func:`pipeline.shard.samples.iter_samples`;
* ``folder``: :class:`pipeline.shard.folder.FolderSource`;
* ``parquet``: :class:`pipeline.shard.parquet.ParquetSource`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ..io import StorageOptions, input_info, open_input
from ..protocol import ShardTask
from .samples import RawSample, iter_samples


@dataclass(frozen=True)
class ParquetColumns:
    """Which columns of a Parquet input are the image, key, caption and metadata (job-wide)."""

    image: str = "image"
    key: str | None = None
    text: str | None = None
    meta: str | None = None


class SampleSource(Protocol):
    size: int | None
    etag: str | None

    def samples(self) -> Iterator[RawSample]: ...


class TarSource:
    """A webdataset tar, streamed (no seeking, no local copy)."""

    def __init__(self, url: str, stream: Any, storage: StorageOptions) -> None:
        self.url, self.stream = url, stream
        # size and ETag of the bytes actually read (the stream refuses a changed object)
        self.size, self.etag = getattr(stream, "size", None), getattr(stream, "etag", None)
        if self.size is None:
            self.size, self.etag = input_info(url, storage)

    def samples(self) -> Iterator[RawSample]:
        return iter_samples(self.stream, self.url)


@contextmanager
def open_source(task: ShardTask, storage: StorageOptions, columns: ParquetColumns) -> Iterator[SampleSource]:
    """The unit's sample source, its input closed on the way out."""
    if task.kind == "tar":
        with open_input(task.url, storage) as stream:
            yield TarSource(task.url, stream, storage)
        return
    source: Any
    if task.kind == "folder":
        from .folder import FolderSource

        source = FolderSource(task.url, task.files, storage)
    else:
        from .parquet import ParquetSource

        source = ParquetSource(task.url, storage, columns)
    try:
        yield source
    finally:
        source.close()
