"""An image-folder unit -> samples: its files (listed by the plan) read through fsspec.

The unit's files (:class:`pipeline.protocol.FolderFile`, in the plan's sorted order) are read a
few at a time (concurrently on object stores), image and
sidecars together, so at most `READ_AHEAD` files' bytes are held besides the decoder's window.
The key of a sample is the file's path relative to the folder; ``shard`` (the rows' column) is
the folder. A sample is an error record when its file is not an image by extension
(``no_image``), is larger than the member limit (``member_too_large``), or is gone since the
listing (``missing_file``). A missing sidecar leaves ``text`` / ``meta`` empty. Any other read
error is retried by io.py's policy and then fails the unit (the driver retries it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from ..io import OBJECT_STORES, StorageOptions, get_fs, protocol_of
from ..protocol import FolderFile
from ..retry import RetryPolicy, with_retries
from ..urls import redact_url
from .errors import SampleError
from .samples import IMAGE_EXTS, RawSample
from .tar import stored_name

READ_AHEAD = 16  # files per fs.cat call
MAX_FILE_BYTES = 256 << 20  # as the tar reader's member limit


def unit_digest(files: tuple[FolderFile, ...]) -> str:
    """The unit's listing as one value (the manifest's `input_etag`): names, sizes, sidecars."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.rel}\0{f.size}\0{f.text or ''}\0{f.meta or ''}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _ext(rel: str) -> str:
    base = rel.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


class FolderSource:
    """The samples of one folder unit, in the unit's order."""

    def __init__(self, url: str, files: tuple[FolderFile, ...], storage: StorageOptions,
                 max_file_bytes: int = MAX_FILE_BYTES) -> None:
        self.url, self.files, self.max_file_bytes = url, files, max_file_bytes
        self.fs, root = get_fs(url, storage)
        self.root = root.rstrip("/")
        self.policy = storage.retry if storage is not None else RetryPolicy()
        self.size = sum(f.size for f in files)
        self.etag = unit_digest(files)
        # plain cat_file per path (fs.cat would expand glob characters in file names)
        self.pool = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="folder-read") \
            if protocol_of(url) in OBJECT_STORES else None

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _wanted(self, f: FolderFile) -> list[str]:
        if _ext(f.rel) not in IMAGE_EXTS or f.size > self.max_file_bytes:
            return [r for r in (f.text, f.meta) if r]
        return [r for r in (f.rel, f.text, f.meta) if r]

    def _one(self, rel: str) -> bytes | None:
        try:
            return with_retries(lambda: self.fs.cat_file(self._path(rel)),
                                f"reading {redact_url(self.url)}/{rel}", self.policy)
        except FileNotFoundError:
            return None

    def _read(self, rels: list[str]) -> dict[str, bytes | None]:
        """rel -> bytes, or None for a file that is gone; other errors retried, then raised.
        Object stores: the files of a chunk are fetched concurrently."""
        if self.pool is None or len(rels) < 2:
            return {rel: self._one(rel) for rel in rels}
        return dict(zip(rels, self.pool.map(self._one, rels), strict=True))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def samples(self) -> Iterator[RawSample]:
        for start in range(0, len(self.files), READ_AHEAD):
            chunk = self.files[start:start + READ_AHEAD]
            data = self._read([r for f in chunk for r in self._wanted(f)])
            for i, f in enumerate(chunk, start):
                yield self._sample(f, i, data)

    def _sample(self, f: FolderFile, index: int, data: dict[str, bytes | None]) -> RawSample:
        text = data.get(f.text) if f.text else None
        meta = data.get(f.meta) if f.meta else None
        sample = RawSample(key=stored_name(f.rel), index=index, image=None, image_ext=None,
                           text=text.decode("utf-8", errors="replace") if text is not None else None,
                           meta=meta.decode("utf-8", errors="replace") if meta is not None else None, error=None)
        ext = _ext(f.rel)
        if ext not in IMAGE_EXTS:
            sample.error = SampleError("read", "no_image", f"{f.rel!r} is not an image file (extension "
                                                           f"{ext or '(none)'!r})")
        elif f.size > self.max_file_bytes:
            sample.error = SampleError("read", "member_too_large", f"{f.rel!r} is {f.size} bytes, limit "
                                                                   f"{self.max_file_bytes}")
        elif data.get(f.rel) is None:
            sample.error = SampleError("read", "missing_file", f"{f.rel!r} was listed but is gone")
        else:
            sample.image, sample.image_ext = data[f.rel], ext
        return sample
