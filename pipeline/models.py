"""Model and teacher paths on object storage: fetched once per machine into a local cache.

A model given as a URL (s3://bucket/models/wintok-so400m/) is copied, file by file, into
`$WINTOK_CACHE` (default ~/.cache/wintok) under a name derived from the URL, through a
temporary folder renamed into place, so concurrent workers on one node never see half a copy.
Local paths and preset names pass through unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid

from .io import StorageOptions, get_fs


def cache_root() -> str:
    return os.environ.get("WINTOK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "wintok"))


def localize(spec: str | None, storage: StorageOptions | None = None) -> str | None:
    """A local path for `spec` (downloading it if it is a URL)."""
    if spec is None or "://" not in spec or spec.startswith("file://"):
        return spec[len("file://"):] if spec and spec.startswith("file://") else spec
    url = spec.rstrip("/")
    name = url.rsplit("/", 1)[-1] or "model"
    dest = os.path.join(cache_root(), "models", hashlib.sha256(url.encode()).hexdigest()[:16], name)
    if os.path.exists(dest):
        return dest
    fs, path = get_fs(url, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"model {spec} not found")
    tmp = f"{dest}.part-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        if fs.isdir(path):
            os.makedirs(tmp)
            for remote in fs.find(path):
                rel = remote[len(path):].lstrip("/")
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
                fs.get_file(remote, os.path.join(tmp, rel))
        else:
            fs.get_file(path, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.exists(dest):  # another worker won the race: use its copy
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    return dest
