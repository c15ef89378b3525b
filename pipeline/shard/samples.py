"""Tar members -> samples, grouped the way webdataset groups tar members.

A shard is read strictly as a stream by the project's own tar parser (not ``tarfile``;
see :mod:`pipeline.shard.tar`): no seeking and no full copy, so it works on non-seekable
fsspec/S3 streams. Members are grouped by key: the member path up to the first dot of its basename (``dir/000001.jpg``
-> key ``dir/000001``, extension ``jpg``; extensions are lower-cased), which is webdataset's
rule. Consecutive members with the same key form one sample.

Every sample is yielded, good or not; one that cannot be used carries ``error``, a
:class:`SampleError` of stage ``read`` (its ``reason`` and ``detail``), and becomes an error record. Deviations from webdataset, chosen so
that no input is silently lost and a key names one row:

* a key seen again later in the shard (a non-adjacent group, which webdataset yields as a
  second sample) makes that later sample ``duplicate_key`` (the detail names the key and the
  index of the sample that used it first), whatever else is wrong with it; the first stays.
  Keys are compared as stored (below);
* a basename that starts with a dot (``.jpg``) gives the empty key ``""`` (webdataset
  drops it); a basename without a dot gives key = path and extension ``""`` and ends up
  as a ``no_image`` sample (webdataset drops it too);
* a repeated extension inside one group marks the sample ``duplicate_member`` instead of
  raising for the whole shard;
* a member of a kind this reader does not read - symlink, hardlink, character or block
  device, FIFO, GNU sparse file (old ``S`` type or pax ``GNU.sparse.*``, versions 0.0, 0.1
  and 1.0), or a type flag it does not know - makes its sample ``unsupported_member`` with
  the kind, the member and a link's target in the detail (webdataset drops such members).

Names: tar stores bytes. A name (ustar, GNU long name, pax ``path``, which should be UTF-8
but is not always) is decoded losslessly, bytes that are not UTF-8 as lone surrogates as
``tarfile`` does, and members are grouped on that. The key as stored (``RawSample.key``,
and every name in an error detail) shows each such byte as the four characters ``\\xNN``
(``bytes.decode("utf-8", "backslashreplace")``), since Parquet strings cannot hold lone
surrogates: the Latin-1 name ``café.jpg`` (bytes ``63 61 66 e9 2e ...``) -> key ``caf\\xe9``
(seven characters), and distinct names keep distinct keys. A name spelled with that
literal text is the same stored key: the second such sample is then ``duplicate_key``,
never a second row.

Not samples, skipped without a record: directories (type ``5``, V7 ``name/``, GNU dump
directories ``D``), GNU volume labels (``V``), macOS ``._*`` files, anything under
``__MACOSX/``, and webdataset's ``__name__`` metadata entries.

The tar format itself (headers, numbers, names, sparse maps, compression, where a shard ends)
is read by :mod:`pipeline.shard.tar`, which says what it accepts; a shard it cannot read
raises :class:`ShardReadError`.
"""

from __future__ import annotations

import lzma
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from .errors import SampleError, ShardReadError
from .tar import BLOCK, Corrupt, Source, members, open_stream, stored_name

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "img", "image")
TEXT_EXTS: tuple[str, ...] = ("txt", "caption")
META_EXTS: tuple[str, ...] = ("json",)

_WDS_META = re.compile(r"__[^/]*__($|/)")


@dataclass
class RawSample:
    """One webdataset sample as read from the tar, before decoding."""

    key: str
    index: int  # position in the shard, counting every sample, good or bad, from 0
    image: bytes | None
    image_ext: str | None
    text: str | None
    meta: str | None
    error: SampleError | None  # stage "read": why the sample is unusable (None: it has an image)


def split_key(name: str) -> tuple[str, str]:
    """Split a member path into (key, lower-cased extension) at the basename's first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def is_ignored(name: str) -> bool:
    """True for members that are never part of a sample (macOS junk, webdataset metadata)."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith("._"):
        return True
    if "__MACOSX" in name.split("/"):
        return True
    return _WDS_META.match(name) is not None


@dataclass
class _Group:
    key: str
    exts: list[str] = field(default_factory=list)
    image: bytes | None = None
    image_ext: str | None = None
    text_raw: bytes | None = None
    text_ext: str | None = None
    meta_raw: bytes | None = None
    error: SampleError | None = None

    def fail(self, reason: str, detail: str) -> None:
        if self.error is None:
            self.error = SampleError("read", reason, detail)
        self.image = self.image_ext = self.text_raw = self.meta_raw = None

    def to_sample(self, index: int) -> RawSample:
        error = self.error
        if error is None and self.image is None:
            shown = ", ".join(e if e else "(no extension)" for e in self.exts)
            error = SampleError("read", "no_image", f"sample has members [{shown}] but no image")
        text = self.text_raw.decode("utf-8", errors="replace") if self.text_raw is not None else None
        meta = self.meta_raw.decode("utf-8", errors="replace") if self.meta_raw is not None else None
        return RawSample(
            key=self.key,
            index=index,
            image=None if error else self.image,
            image_ext=None if error else self.image_ext,
            text=text,
            meta=meta,
            error=error,
        )


def _better(ext: str, current: str | None, order: tuple[str, ...]) -> bool:
    return current is None or order.index(ext) < order.index(current)


def _add_member(group: _Group, src: Source, name: str, size: int, ext: str, unsupported: str | None,
                limit: int) -> None:
    """Record one member in its group, reading its bytes only if the sample needs them."""
    if ext in group.exts:
        group.fail("duplicate_member", f"extension {ext!r} appears twice in sample {group.key!r}")
        _skip(src, size, name)
        return
    group.exts.append(ext)
    if unsupported is not None:
        group.fail("unsupported_member", unsupported)
        _skip(src, size, name)
        return
    wanted = ext in IMAGE_EXTS or ext in TEXT_EXTS or ext in META_EXTS
    if not wanted or group.error is not None:
        _skip(src, size, name)
        return
    if size > limit:
        group.fail("member_too_large", f"{stored_name(name)!r} is {size} bytes, limit {limit}")
        _skip(src, size, name)
        return
    data = src.read(size)
    if len(data) < size:
        raise EOFError(f"stream ended inside member {stored_name(name)!r}")
    if ext in IMAGE_EXTS:
        if _better(ext, group.image_ext, IMAGE_EXTS):
            group.image, group.image_ext = data, ext
    elif ext in TEXT_EXTS:
        if _better(ext, group.text_ext, TEXT_EXTS):
            group.text_raw, group.text_ext = data, ext
    else:
        group.meta_raw = data


def _skip(src: Source, size: int, name: str) -> None:
    if src.skip(size) < size:
        raise EOFError(f"stream ended inside member {stored_name(name)!r}")


def _start(key: str, index: int, seen: dict[str, int]) -> _Group:
    """A new group for `key` (lossless); its stored key must be new in the shard."""
    stored = stored_name(key)
    group = _Group(key=stored)
    first = seen.setdefault(stored, index)
    if first != index:
        group.fail("duplicate_key", f"key {stored!r} was already used by sample {first} of this shard")
    return group


def iter_samples(stream: BinaryIO, shard: str, max_member_bytes: int = 256 << 20) -> Iterator[RawSample]:
    """Yield the samples of one tar shard in order, each as soon as its member group ends.

    Raises :class:`ShardReadError` (possibly after some samples were yielded) when the
    stream is not a tar, is truncated, or is corrupt; the caller must then discard the
    whole shard.
    """
    src, raw, compressed = open_stream(stream)
    index = 0
    group: _Group | None = None
    current = ""  # the group's key, lossless (group.key is the stored one)
    seen: dict[str, int] = {}  # stored key -> index of the sample that first used it
    try:
        for name, size, unsupported in members(src):
            if is_ignored(name):
                _skip(src, size, name)
                continue
            key, ext = split_key(name)
            if group is not None and key != current:
                yield group.to_sample(index)
                index += 1
                group = None
            if group is None:
                group, current = _start(key, index, seen), key
            _add_member(group, src, name, size, ext, unsupported, max_member_bytes)
        if group is not None:
            yield group.to_sample(index)
    except Corrupt as e:
        if src.offset <= BLOCK:
            raise ShardReadError(f"{shard}: not a readable tar: {e}") from None
        raise ShardReadError(f"{shard}: truncated or corrupt tar: {e}") from None
    except EOFError as e:  # ours, or the decompressor's (a compressed stream cut short)
        raise ShardReadError(f"{shard}: truncated tar: {e}") from None
    except (OSError, zlib.error, lzma.LZMAError) as e:
        if raw.failed or not compressed:
            raise  # the stream's own I/O error: retried by the caller's policy
        raise ShardReadError(f"{shard}: corrupt compressed tar: {e}") from None
