"""The one filesystem seam: every data path goes through fsspec here.

- `expand_inputs`: brace ranges, globs, several patterns, or a text file listing shards.
- `Storage`: a filesystem + root for OUTPUT with atomic puts and cache-free listing.
- Object stores commit an object only when its upload completes, so `put_file` from a
  finished local file never leaves a visible partial object; local and other filesystems
  write to a temporary name and rename.
- Transient storage errors (503 SlowDown, 5xx, throttling, connection resets, truncated
  or checksum-failing bodies, timeouts) are retried in two layers, each bounded, so one
  storage operation makes at most BOTO_ATTEMPTS x (RetryPolicy.retries + 1) = 3 x 4 = 12
  requests (a stream: 12 in a row at one read position; an upload: 4 whole uploads, each
  request in it up to 3 attempts):
  1. botocore, per HTTP request (5xx, throttling, connection errors): `total_max_attempts`
     BOTO_ATTEMPTS (3), set here, not its default 5;
  2. this module, per operation, under `retry.RetryPolicy` (default 3 retries, jittered
     exponential backoff): a failed upload is redone whole; an input stream is reopened at
     its offset, pinned to the ETag it started with; a stream that ends before the object's
     size raises, so a short read is never an EOF.
  s3fs's own retry loop, which would multiply both (its default: 5 tries per request,
  SlowDown included), is set to S3FS_TRIES = 1 try: what it would redo (a broken body,
  SlowDown) is covered by the two layers above. WINTOK_S3_OPTIONS may set s3fs's
  ``"retries"`` and botocore's ``config_kwargs.retries`` (which then replaces ours, e.g.
  for AWS_MAX_ATTEMPTS to apply); WINTOK_IO_* set the `RetryPolicy`. What still fails after
  the last try is raised as an `OSError` (`StorageIOError`, or the library's own
  `FileNotFoundError`/`PermissionError`, which are never retried) for the worker to
  classify; the driver's shard retries (`--max-retries`) come on top.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import io
import json
import logging
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import fsspec
from braceexpand import braceexpand
from fsspec.core import url_to_fs

from .retry import RetryPolicy, ShortReadError, StorageIOError, is_transient, with_retries
from .urls import has_glob, redact_text, redact_url, s3_credentials, split_url, with_userinfo

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
SECRET_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
               "aws_session_token", "session_token", "client_secret", "sas_token", "account_key"}
LIST_SUFFIXES = (".txt", ".lst", ".list")
S3FS_TRIES = 1     # s3fs's own tries per request, unless WINTOK_S3_OPTIONS sets "retries"
BOTO_ATTEMPTS = 3  # botocore's attempts per request, unless WINTOK_S3_OPTIONS sets config_kwargs.retries
log = logging.getLogger("wintok")
T = TypeVar("T")


class InputError(ValueError):
    """Inputs cannot be found or expanded; the message says which and what to do."""


@dataclass(frozen=True)
class StorageOptions:
    """fsspec options per protocol. Credentials may be inside; never log or persist `options`.

    `retry`: the retry policy of this module; `upload_chunksize`: the multipart part size for
    object-store uploads (files of at least twice this size go multipart; None: s3fs default).
    """

    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    upload_chunksize: int | None = None

    def for_url(self, url: str) -> dict[str, Any]:
        proto = protocol_of(url)
        opts = dict(self.options.get(proto, {}))
        if proto in ("s3", "s3a"):
            opts.setdefault("use_listings_cache", False)
        return opts

    def redacted(self) -> dict[str, dict[str, Any]]:
        return {p: {k: ("***" if k.lower() in SECRET_KEYS else v) for k, v in o.items()
                    if not isinstance(v, dict)} for p, o in self.options.items()}


def s3_options(endpoint_url: str | None = None, profile: str | None = None, anon: bool = False,
               key: str | None = None, secret: str | None = None) -> StorageOptions:
    """S3 settings from flags; AWS_* environment variables are read by botocore itself.

    Read here, where the run starts, and shipped to the workers with the options:
    WINTOK_S3_OPTIONS (a JSON object of extra s3fs options, e.g. ``{"retries": 10,
    "config_kwargs": {"retries": {"mode": "adaptive", "max_attempts": 10}}}``: s3fs's tries per
    request and botocore's retry config; flags win),
    WINTOK_S3_UPLOAD_CHUNKSIZE (multipart part size in bytes) and WINTOK_IO_* (`RetryPolicy`).
    """
    o: dict[str, Any] = {}
    extra = os.environ.get("WINTOK_S3_OPTIONS")
    if extra:
        try:
            o.update(json.loads(extra))
        except (ValueError, TypeError) as e:
            raise InputError(f"WINTOK_S3_OPTIONS is not a JSON object: {e}") from None
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint_url:
        o["endpoint_url"] = endpoint_url
    if profile:
        o["profile"] = profile
    if anon:
        o["anon"] = True
    if key:
        o["key"] = key
    if secret:
        o["secret"] = secret
    chunk = os.environ.get("WINTOK_S3_UPLOAD_CHUNKSIZE")
    try:
        upload_chunksize = int(chunk) if chunk else None
    except ValueError:
        raise InputError(f"WINTOK_S3_UPLOAD_CHUNKSIZE must be a number of bytes, not {chunk!r}") from None
    return StorageOptions({"s3": o, "s3a": o} if o else {}, retry=retry_policy_from_env(),
                          upload_chunksize=upload_chunksize)


def retry_policy_from_env() -> RetryPolicy:
    """WINTOK_IO_RETRIES / WINTOK_IO_BACKOFF / WINTOK_IO_BACKOFF_MAX override the defaults."""
    d = RetryPolicy()
    try:
        return RetryPolicy(retries=max(0, int(os.environ.get("WINTOK_IO_RETRIES", d.retries))),
                           backoff=max(0.0, float(os.environ.get("WINTOK_IO_BACKOFF", d.backoff))),
                           backoff_max=max(0.0, float(os.environ.get("WINTOK_IO_BACKOFF_MAX", d.backoff_max))))
    except ValueError as e:
        raise InputError(f"bad WINTOK_IO_* retry setting: {e}") from None


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def get_fs(url: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of `url`; credentials in an s3:// URL's userinfo become its key/secret."""
    url, creds = s3_credentials(url)
    opts = {**(storage or StorageOptions()).for_url(url), **creds}
    s3fs_retries = None
    if protocol_of(url) in ("s3", "s3a"):
        # s3fs takes its tries per request (its default: 5) only as an attribute
        s3fs_retries = opts.pop("retries", S3FS_TRIES)
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": BOTO_ATTEMPTS})
        opts["config_kwargs"] = config
    fs, path = url_to_fs(url, skip_instance_cache=True, **opts)
    if s3fs_retries is not None:
        fs.retries = max(1, int(s3fs_retries))
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, url: str, path: str) -> str:
    return fs.unstrip_protocol(path) if "://" in url else path


def expand_inputs(patterns: Iterable[str], storage: StorageOptions | None = None) -> list[str]:
    """Input shard URLs, deduplicated, in the order given (globs sorted); local paths made absolute.

    Globs are listed only where the scheme can list: in http(s) URLs `*?[` are literal. The URLs
    keep their credentials (userinfo, query) for reading; show them only through `redact_url`.
    """
    out: list[str] = []
    for pattern in patterns:
        if split_url(pattern).path.endswith(LIST_SUFFIXES):
            out.extend(expand_inputs(_read_list(pattern, storage), storage))
            continue
        for url in braceexpand(pattern):
            if has_glob(url):
                fs, path = get_fs(url, storage)
                found = sorted(with_retries(lambda fs=fs, path=path: fs.glob(path), f"listing {redact_url(url)}",
                                            _policy(storage)))
                if not found:
                    raise InputError(f"no input matches {redact_url(url)!r}: check the path and the glob")
                out.extend(with_userinfo(_unstrip(fs, url, p), split_url(url).userinfo) for p in found)
            else:
                out.append(os.path.abspath(url) if split_url(url).local else url)
    seen: set[str] = set()
    unique = [u for u in out if not (u in seen or seen.add(u))]
    if not unique:
        raise InputError("no input shards given")
    return unique


def _read_list(url: str, storage: StorageOptions | None) -> list[str]:
    fs, path = get_fs(url, storage)
    try:
        text = with_retries(lambda: fs.cat_file(path), f"reading {redact_url(url)}",
                            _policy(storage)).decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"shard list {redact_url(url)!r} not found") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _policy(storage: StorageOptions | None) -> RetryPolicy:
    return storage.retry if storage is not None else RetryPolicy()


def _etag(info: dict[str, Any]) -> str | None:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return str(etag).strip('"') if etag else None


class ResilientInput(io.RawIOBase):
    """A sequential read of one object that survives transient errors.

    On a transient error (or a read that returns nothing before `size`) the underlying
    fsspec file is dropped and reopened at the current offset, after a backoff, up to
    `policy.retries` times in a row; the reopened object must carry the same ETag, so bytes
    of two versions are never mixed. The stream never ends early: a short object raises
    `ShortReadError` (an OSError) instead of returning EOF.
    """

    def __init__(self, url: str, opener: Callable[[], Any], policy: RetryPolicy) -> None:
        super().__init__()
        self.url, self._opener, self.policy = redact_url(url), opener, policy  # url: for messages only
        self.pos = 0
        self.reopens = 0
        self._f: Any = None
        self._f = with_retries(self._open_at_start, f"opening {url}", policy)
        self.size: int | None = getattr(self._f, "size", None)
        self.etag: str | None = _etag(getattr(self._f, "details", None) or {})

    def _open_at_start(self) -> Any:
        return self._opener()

    def _reopen(self) -> Any:
        f = self._opener()
        etag = _etag(getattr(f, "details", None) or {})
        if self.etag and etag and etag != self.etag:
            f.close()
            raise StorageIOError(errno.ESTALE, f"{self.url} changed while it was read "
                                               f"(ETag {self.etag} -> {etag}); not mixing two versions")
        if self.pos:
            f.seek(self.pos)
        return f

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        want = len(view)
        if want == 0 or (self.size is not None and self.pos >= self.size):
            return 0
        retry = 0
        while True:
            try:
                if self._f is None:
                    self._f = self._reopen()
                    self.reopens += 1
                data = self._f.read(want)
                if not data and self.size is not None and self.pos < self.size:
                    raise ShortReadError(errno.EIO, f"{self.url}: stream ended at byte {self.pos} "
                                                    f"of {self.size}")
                view[: len(data)] = data
                self.pos += len(data)
                return len(data)
            except Exception as e:  # noqa: BLE001 - classified right here
                self._drop()
                if not is_transient(e):
                    raise
                if retry >= self.policy.retries:
                    raise StorageIOError(getattr(e, "errno", None) or errno.EIO,
                                         f"reading {self.url} at byte {self.pos} failed after {retry + 1} "
                                         f"tries: {type(e).__name__}: {redact_text(str(e))}") from e
                retry += 1
                wait = self.policy.delay(retry)
                log.warning("transient error reading %s at byte %d (try %d of %d), reopening in %.2fs: %s: %s",
                            self.url, self.pos, retry, self.policy.tries, wait, type(e).__name__,
                            redact_text(str(e))[:300])
                time.sleep(wait)

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a broken stream may fail to close
                pass

    def close(self) -> None:
        self._drop()
        super().close()


def open_input(url: str, storage: StorageOptions | None = None, block_size: int = 8 << 20) -> BinaryIO:
    """A streaming read of one input shard (no full local copy).

    Object stores: a `ResilientInput` over a readahead-cached fsspec file (transient errors
    retried, reopened at the offset, short streams raise). Local files: opened as they are.
    """
    fs, path = get_fs(url, storage)
    if protocol_of(url) in OBJECT_STORES:
        def opener() -> Any:
            fs.invalidate_cache(path)
            return fs.open(path, "rb", block_size=block_size, cache_type="readahead")

        return ResilientInput(url, opener, _policy(storage))  # type: ignore[return-value]
    return fs.open(path, "rb")


def input_info(url: str, storage: StorageOptions | None = None) -> tuple[int | None, str | None]:
    """(size, etag) of an input shard."""
    fs, path = get_fs(url, storage)
    info = with_retries(lambda: fs.info(path), f"stat {redact_url(url)}", _policy(storage))
    return info.get("size"), _etag(info)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class Storage:
    """OUTPUT root: relative paths in, atomic whole-object writes, listing without caches.

    Every operation retries transient errors under the storage options' `RetryPolicy`.
    """

    def __init__(self, url: str, storage: StorageOptions | None = None) -> None:
        self.url = redact_url(url.rstrip("/"))  # as shown in messages; credentials only in the fs
        self.fs, self.root = get_fs(url.rstrip("/"), storage)
        self.protocol = protocol_of(self.url)
        self.policy = _policy(storage)
        self.upload_chunksize = storage.upload_chunksize if storage is not None else None
        cat = getattr(self.fs, "_cat_file", None)  # s3fs: one GET per read, no HEAD for the size first
        self._cat_kw = {"max_concurrency": 1} if cat is not None and \
            "max_concurrency" in inspect.signature(cat).parameters else {}

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if self.root else rel

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _retry(self, fn: Callable[[], T], what: str, rel: str, upload: bool = False) -> T:
        return with_retries(fn, f"{what} {self.url_of(rel)}", self.policy, upload=upload)

    def exists(self, rel: str) -> bool:
        def go() -> bool:
            self.fs.invalidate_cache()
            return self.fs.exists(self.path(rel))

        return self._retry(go, "checking", rel)

    def read_bytes(self, rel: str) -> bytes:
        """The whole object in one request: s3fs (>= 2025) otherwise asks for its size first (a
        HEAD before each GET; measured by benchmarks/scale: the lease fence's reads doubled)."""
        return self._retry(lambda: self.fs.cat_file(self.path(rel), **self._cat_kw), "reading", rel)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def list(self, rel_dir: str) -> list[str]:
        """Names of files below rel_dir (recursive, relative to it), read fresh, never from a cache."""
        base = self.path(rel_dir).rstrip("/")

        def go() -> list[str]:
            self.fs.invalidate_cache()
            if not self.fs.exists(base):
                return []
            return self.fs.find(base, withdirs=False)

        names = self._retry(go, "listing", rel_dir)
        return sorted(n[len(base):].lstrip("/") for n in names)

    def put_file(self, local_path: str, rel: str) -> None:
        """Upload a finished local file so that the destination is either absent, old or complete.

        Object stores: one PUT, or a multipart upload (files of at least twice the part size)
        that becomes visible only on CompleteMultipartUpload and is aborted on failure; a
        failed upload is redone whole. Other filesystems: a temporary name, then a rename.
        """
        dest = self.path(rel)
        if self.protocol == "file":
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            try:
                shutil.copyfile(local_path, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        elif self.protocol in OBJECT_STORES:
            kw: dict[str, Any] = {}
            if self.upload_chunksize and self.protocol in ("s3", "s3a"):
                kw["chunksize"] = self.upload_chunksize
            self._retry(lambda: self.fs.put_file(local_path, dest, **kw), "uploading", rel, upload=True)
        else:
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            self._retry(lambda: self.fs.put_file(local_path, tmp), "uploading", rel, upload=True)
            self._retry(lambda: self.fs.mv(tmp, dest), "renaming", rel)

    def put_bytes(self, data: bytes, rel: str) -> None:
        dest = self.path(rel)
        if self.protocol in OBJECT_STORES:
            # a single PUT (small data): all or nothing
            self._retry(lambda: self.fs.pipe_file(dest, data), "writing", rel, upload=True)
            return
        import tempfile

        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(data)
        try:
            self.put_file(f.name, rel)
        finally:
            os.unlink(f.name)

    def delete(self, rel: str) -> None:
        def go() -> None:
            try:
                self.fs.rm_file(self.path(rel))
            except FileNotFoundError:
                pass

        self._retry(go, "deleting", rel)
