"""What the inputs are, as work units: tar shards, Parquet files, image folders cut into units.

Every input URL (after `io.expand_inputs`) is one of three kinds (`input_kind`):

* ``tar``: a webdataset shard, one unit (as before);
* ``parquet``: a Parquet file with an image-bytes column, one unit (read row group by row
  group: :mod:`pipeline.shard.parquet`);
* ``folder``: a folder tree of images (local, S3, any fsspec filesystem that lists). Its files
  are listed once, in sorted order of their path relative to the folder; a ``.txt`` / ``.json``
  beside an image (same path, other extension) is that image's sidecar, every other file is a
  sample (a non-image one ends as a ``no_image`` error record); the samples are cut into units
  of `folder_unit_files`, named ``00000``, ``00001``... below the folder's own name. A unit
  carries its file list (`ShardTask.files`), so the worker never lists again.

The stems of all units come from `urls.shard_stems` over one URL per unit (the folder's units as
``FOLDER/00000``...), so mixing kinds in one run keeps names distinct and deterministic. The
folder must not change between a run and its resume (as a tar shard must not): the unit's
file list digest is its manifest's `input_etag`.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from .io import InputError, StorageOptions, get_fs
from .protocol import FolderFile
from .retry import RetryPolicy, with_retries
from .shard.samples import IMAGE_EXTS, META_EXTS, TEXT_EXTS, is_ignored
from .urls import NO_LISTING, TAR_EXTS, redact_url, split_url

PARQUET_EXT = ".parquet"
UNIT_DIGITS = 5


def input_kind(url: str, fmt: str) -> str:
    """tar, parquet or folder. `fmt` auto: by extension (.tar/.tgz/.tar.gz, .parquet), else a folder
    if the URL ends with "/" or is a local directory, else a tar (shards without extension). Only
    local paths are looked at (one stat): an object-store folder is named with a trailing "/" (or
    `--input-format folder`), so that a long list of extensionless shards costs no request each."""
    if fmt != "auto":
        return {"webdataset": "tar", "folder": "folder", "parquet": "parquet"}[fmt]
    parts = split_url(url)
    if parts.path.endswith(TAR_EXTS):
        return "tar"
    if parts.path.endswith(PARQUET_EXT):
        return "parquet"
    if parts.scheme in NO_LISTING:
        return "tar"
    if parts.path.endswith("/") or (parts.scheme == "file" and os.path.isdir(parts.path)):
        return "folder"
    return "tar"


def _policy(storage: StorageOptions | None) -> RetryPolicy:
    return storage.retry if storage is not None else RetryPolicy()


def list_folder(url: str, storage: StorageOptions | None) -> list[FolderFile]:
    """The samples of a folder tree, sorted by relative path, sidecars attached (see module doc)."""
    if split_url(url).scheme in NO_LISTING:
        raise InputError(f"{redact_url(url)}: an image folder must be on a filesystem that lists (not http)")
    fs, root = get_fs(url, storage)
    root = root.rstrip("/")

    def find() -> dict[str, Any]:
        fs.invalidate_cache()
        return fs.find(root, withdirs=False, detail=True)

    found = with_retries(find, f"listing {redact_url(url)}", _policy(storage))
    sizes: dict[str, int] = {}
    for path, info in found.items():
        rel = path[len(root):].lstrip("/") if path.startswith(root) else path
        if rel and not is_ignored(rel):
            sizes[rel] = int(info.get("size") or 0)
    if not sizes:
        raise InputError(f"image folder {redact_url(url)} holds no files: check the path")
    images_by_base: dict[str, list[str]] = {}
    for rel in sizes:
        base, ext = _split(rel)
        if ext in IMAGE_EXTS:
            images_by_base.setdefault(base, []).append(rel)
    shards = [rel for rel in sizes if rel.endswith((*TAR_EXTS, PARQUET_EXT))]
    if not images_by_base and shards:  # e.g. `wintok download`'s OUTPUT given as it is
        ext = ".parquet" if all(r.endswith(PARQUET_EXT) for r in shards) else ".tar"
        raise InputError(f"{redact_url(url)} holds no images but {len(shards)} shard file(s) ({shards[0]}, ...): "
                         f"give them as inputs, e.g. '{url.rstrip('/')}/*{ext}'")
    sidecars: dict[str, dict[str, str]] = {}  # image rel -> {"text": rel, "meta": rel}
    taken: set[str] = set()
    for rel in sorted(sizes):
        base, ext = _split(rel)
        role = "text" if ext in TEXT_EXTS else "meta" if ext in META_EXTS else None
        if role is None or base not in images_by_base:
            continue
        for image in images_by_base[base]:
            # the first in TEXT_EXTS order wins when an image has both .txt and .caption
            if role not in sidecars.setdefault(image, {}) or (
                    role == "text" and TEXT_EXTS.index(ext) < TEXT_EXTS.index(_split(sidecars[image][role])[1])):
                sidecars[image][role] = rel
        taken.add(rel)
    return [FolderFile(rel, sizes[rel], sidecars.get(rel, {}).get("text"), sidecars.get(rel, {}).get("meta"))
            for rel in sorted(sizes) if rel not in taken]


def _split(rel: str) -> tuple[str, str]:
    """(path without its last extension, that extension lower-cased, no dot)."""
    base, ext = posixpath.splitext(rel)
    return base, ext[1:].lower()


def folder_units(url: str, files_per_unit: int, storage: StorageOptions | None
                 ) -> list[tuple[str, tuple[FolderFile, ...]]]:
    """(naming URL ``FOLDER/00000``, files) of each unit of a folder, in order."""
    files = list_folder(url, storage)
    n_units = -(-len(files) // files_per_unit)
    digits = max(UNIT_DIGITS, len(str(n_units - 1)))
    base = url.rstrip("/")
    return [(f"{base}/{i:0{digits}d}", tuple(files[i * files_per_unit:(i + 1) * files_per_unit]))
            for i in range(n_units)]


def naming_url(url: str, kind: str) -> str:
    """The URL a unit's stem is made from: a Parquet file's without `.parquet`."""
    if kind == "parquet" and url.endswith(PARQUET_EXT):
        return url[: -len(PARQUET_EXT)]
    return url
