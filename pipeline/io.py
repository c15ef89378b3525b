"""The one filesystem seam: every data path goes through fsspec here.

- `expand_inputs`: brace ranges, globs, several patterns, or a text file listing shards.
- `Storage`: a filesystem + root for OUTPUT with atomic puts and cache-free listing.
- Object stores commit an object only when its upload completes, so `put_file` from a
  finished local file never leaves a visible partial object; local and other filesystems
  write to a temporary name and rename.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
from braceexpand import braceexpand
from fsspec.core import url_to_fs

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
SECRET_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
               "aws_session_token", "session_token", "client_secret", "sas_token", "account_key"}
LIST_SUFFIXES = (".txt", ".lst", ".list")


class InputError(ValueError):
    """Inputs cannot be found or expanded; the message says which and what to do."""


@dataclass(frozen=True)
class StorageOptions:
    """fsspec options per protocol. Credentials may be inside; never log or persist `options`."""

    options: dict[str, dict[str, Any]] = field(default_factory=dict)

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
    """S3 settings from flags; AWS_* environment variables are read by botocore itself."""
    o: dict[str, Any] = {}
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
    return StorageOptions({"s3": o, "s3a": o} if o else {})


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def get_fs(url: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    opts = (storage or StorageOptions()).for_url(url)
    fs, path = url_to_fs(url, skip_instance_cache=True, **opts)
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, url: str, path: str) -> str:
    return fs.unstrip_protocol(path) if "://" in url else path


def expand_inputs(patterns: Iterable[str], storage: StorageOptions | None = None) -> list[str]:
    """Input shard URLs, deduplicated, in the order given (globs sorted)."""
    out: list[str] = []
    for pattern in patterns:
        if pattern.endswith(LIST_SUFFIXES):
            out.extend(expand_inputs(_read_list(pattern, storage), storage))
            continue
        for url in braceexpand(pattern):
            if any(ch in url for ch in "*?["):
                fs, path = get_fs(url, storage)
                found = sorted(fs.glob(path))
                if not found:
                    raise InputError(f"no input matches {url!r}: check the path and the glob")
                out.extend(_unstrip(fs, url, p) for p in found)
            else:
                out.append(url)
    seen: set[str] = set()
    unique = [u for u in out if not (u in seen or seen.add(u))]
    if not unique:
        raise InputError("no input shards given")
    return unique


def _read_list(url: str, storage: StorageOptions | None) -> list[str]:
    fs, path = get_fs(url, storage)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"shard list {url!r} not found") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def input_root(urls: list[str]) -> str:
    """The longest common folder of all inputs; stems are paths relative to it."""
    if len(urls) == 1:
        return urls[0].rsplit("/", 1)[0] if "/" in urls[0] else ""
    parts = [u.split("/") for u in urls]
    common: list[str] = []
    for segs in zip(*(p[:-1] for p in parts)):
        if all(s == segs[0] for s in segs):
            common.append(segs[0])
        else:
            break
    return "/".join(common)


def shard_stem(url: str, root: str) -> str:
    rel = url[len(root):].lstrip("/") if root and url.startswith(root) else url.split("://", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if rel.endswith(ext):
            rel = rel[: -len(ext)]
            break
    if not rel or rel.startswith("..") or "\\" in rel:
        raise InputError(f"cannot name an output for input {url!r}")
    return rel


def open_input(url: str, storage: StorageOptions | None = None, block_size: int = 8 << 20) -> BinaryIO:
    """A streaming read of one input shard (no full local copy)."""
    fs, path = get_fs(url, storage)
    if protocol_of(url) in OBJECT_STORES:
        return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
    return fs.open(path, "rb")


def input_info(url: str, storage: StorageOptions | None = None) -> tuple[int | None, str | None]:
    """(size, etag) of an input shard."""
    fs, path = get_fs(url, storage)
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return info.get("size"), (str(etag).strip('"') if etag else None)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class Storage:
    """OUTPUT root: relative paths in, atomic whole-object writes, listing without caches."""

    def __init__(self, url: str, storage: StorageOptions | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = get_fs(self.url, storage)
        self.protocol = protocol_of(self.url)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if self.root else rel

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open_read(self, rel: str) -> BinaryIO:
        return self.fs.open(self.path(rel), "rb")

    def list(self, rel_dir: str) -> list[str]:
        """Names of files below rel_dir (recursive, relative to it), read fresh, never from a cache."""
        base = self.path(rel_dir).rstrip("/")
        self.fs.invalidate_cache()
        if not self.fs.exists(base):
            return []
        names = self.fs.find(base, withdirs=False)
        return sorted(n[len(base):].lstrip("/") for n in names)

    def put_file(self, local_path: str, rel: str) -> None:
        """Upload a finished local file so that the destination is either absent, old or complete."""
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
            self.fs.put_file(local_path, dest)
        else:
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            self.fs.put_file(local_path, tmp)
            self.fs.mv(tmp, dest)

    def put_bytes(self, data: bytes, rel: str) -> None:
        dest = self.path(rel)
        if self.protocol in OBJECT_STORES:
            self.fs.pipe_file(dest, data)  # a single PUT: all or nothing
            return
        import tempfile

        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(data)
        try:
            self.put_file(f.name, rel)
        finally:
            os.unlink(f.name)

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def size(self, rel: str) -> int:
        return int(self.fs.info(self.path(rel))["size"])
