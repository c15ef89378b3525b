"""Model and teacher paths on object storage: fetched once per machine into a local cache.

A model given as a URL (s3://bucket/models/wintok-so400m/) is copied, file by file, into
`$WINTOK_CACHE` (default ~/.cache/wintok) under a name derived from the URL, through a
temporary folder renamed into place, so concurrent workers on one node never see half a copy.
Local paths and preset names pass through unchanged.

The URL may carry credentials (s3://KEY:SECRET@bucket/model, https://host/m?token=...): the
cached copy is named after the URL's last path segment (or its bucket), never its userinfo
or query, since that name is the model's `name` in the run fingerprint (`_run.json`), and
messages show the URL only through `redact_url`.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import uuid

from .io import StorageOptions, get_fs
from .retry import RetryPolicy, with_retries
from .urls import redact_url, split_url


def cache_root() -> str:
    return os.environ.get("WINTOK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "wintok"))


def cache_name(url: str) -> str:
    """The name of the cached copy of `url`: its last path segment, else its host; no secrets."""
    parts = split_url(url)
    return posixpath.basename(parts.path.rstrip("/")) or parts.host or "model"


def localize(spec: str | None, storage: StorageOptions | None = None) -> str | None:
    """A local path for `spec` (downloading it if it is a URL)."""
    if spec is None or "://" not in spec or spec.startswith("file://"):
        return spec[len("file://"):] if spec and spec.startswith("file://") else spec
    url = spec.rstrip("/")
    shown = redact_url(url)
    dest = os.path.join(cache_root(), "models", hashlib.sha256(url.encode()).hexdigest()[:16], cache_name(url))
    if os.path.exists(dest):
        return dest
    fs, path = get_fs(url, storage)
    policy = storage.retry if storage is not None else RetryPolicy()
    if not with_retries(lambda: fs.exists(path), f"checking {shown}", policy):
        raise FileNotFoundError(f"model {shown} not found")
    tmp = f"{dest}.part-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        if with_retries(lambda: fs.isdir(path), f"checking {shown}", policy):
            os.makedirs(tmp)
            for remote in with_retries(lambda: fs.find(path), f"listing {shown}", policy):
                rel = remote[len(path):].lstrip("/")
                local = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(local) or tmp, exist_ok=True)
                with_retries(lambda r=remote, lo=local: fs.get_file(r, lo), f"downloading {shown}/{rel}", policy)
        else:
            with_retries(lambda: fs.get_file(path, tmp), f"downloading {shown}", policy)
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


def semantic_codebook_path(model: str | None, option: str | None) -> str | None:
    """The local semantic codebook a run uses, or None: `option` (a path or URL; "none": no
    codebook) or, when not given, the model directory's own codebook if it has one. `model`
    is the local (localized) model path."""
    from wintok_model.semantic import CODEBOOK_NAME, info_path

    if option is not None and option.lower() == "none":
        return None
    if option is None:
        found = os.path.join(model, CODEBOOK_NAME) if model and os.path.isdir(model) else None
        return found if found and os.path.isfile(found) else None
    if "://" in option and not option.startswith("file://"):
        from wintok_model.semantic import CodebookError

        raise CodebookError(f"--semantic-codebook {redact_url(option)}: give a local file; on a cluster, "
                            f"put it into the model directory as {CODEBOOK_NAME} (the model URL brings it along)")
    path = localize(option)
    if not (os.path.isfile(path) and os.path.isfile(info_path(path))):
        from wintok_model.semantic import CodebookError

        raise CodebookError(f"semantic codebook {path} not found (it needs its .json beside it)")
    return path
