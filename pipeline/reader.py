"""Tar stream -> samples, grouped the way webdataset groups tar members.

A shard is read strictly as a stream (``tarfile`` mode ``r|*``): no seeking and no full
copy, so it works on non-seekable fsspec/S3 streams. Members are grouped by key: the
member path up to the first dot of its basename (``dir/000001.jpg`` -> key
``dir/000001``, extension ``jpg``; extensions are lower-cased), which is webdataset's
rule. Consecutive members with the same key form one sample; a key seen again later in
the shard starts a new sample (non-adjacent groups are never merged).

Deviations from webdataset, chosen so that no input is silently lost:

* a basename that starts with a dot (``.jpg``) gives the empty key ``""`` (webdataset
  drops it); a basename without a dot gives key = path and extension ``""`` and ends up
  as a ``no_image`` sample (webdataset drops it too);
* a repeated extension inside one group marks the sample ``duplicate_member`` instead of
  raising for the whole shard.

Member names that are not valid UTF-8 are decoded with replacement characters, so keys
are always writable as Parquet strings.

Skipped members: non-regular ones (directories, links, devices), macOS ``._*`` files,
anything under ``__MACOSX/``, and webdataset's ``__name__`` metadata entries.

End-of-shard check: ``tarfile`` treats a stream that stops at a member boundary, stops
inside a header, or continues with garbage as a normal end of archive. We record why
tarfile stopped (via a ``TarInfo`` subclass) and accept only the all-zero end-of-archive
block; anything else raises :class:`ShardReadError`. A stream cut in the middle of member
data (read or skipped) makes tarfile itself raise. A tar whose first end-of-archive block
is present but whose second one (or the record padding) is missing is accepted: every
member is complete by then. I/O errors of the underlying stream propagate unchanged.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

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
    error: str | None  # "<reason>: <detail>" when unusable at read stage


class ShardReadError(Exception):
    """The shard as a whole cannot be read: not a tar, truncated, or corrupt."""


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
    error: str | None = None

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
        self.image = self.image_ext = self.text_raw = self.meta_raw = None

    def to_sample(self, index: int) -> RawSample:
        error = self.error
        if error is None and self.image is None:
            shown = ", ".join(e if e else "(no extension)" for e in self.exts)
            error = f"no_image: sample has members [{shown}] but no image"
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


def _add_member(group: _Group, tf: tarfile.TarFile, member: tarfile.TarInfo, ext: str, limit: int) -> None:
    """Record one member in its group, reading its bytes only if the sample needs them."""
    if ext in group.exts:
        group.fail(f"duplicate_member: extension {ext!r} appears twice in sample {group.key!r}")
        return
    group.exts.append(ext)
    wanted = ext in IMAGE_EXTS or ext in TEXT_EXTS or ext in META_EXTS
    if not wanted or group.error is not None:
        return  # tarfile skips the unread data when it moves to the next header
    if member.size > limit:
        group.fail(f"member_too_large: {member.name!r} is {member.size} bytes, limit {limit}")
        return
    fobj = tf.extractfile(member)
    if fobj is None:  # pragma: no cover - only regular members get here
        return
    data = fobj.read()
    if ext in IMAGE_EXTS:
        if _better(ext, group.image_ext, IMAGE_EXTS):
            group.image, group.image_ext = data, ext
    elif ext in TEXT_EXTS:
        if _better(ext, group.text_ext, TEXT_EXTS):
            group.text_raw, group.text_ext = data, ext
    else:
        group.meta_raw = data


class _StopTracker:
    """Remembers why tarfile's last header read failed (it hides this from the caller)."""

    def __init__(self) -> None:
        self.stop: tarfile.HeaderError | None = None

    def tarinfo_class(self) -> type[tarfile.TarInfo]:
        tracker = self

        class _TrackingTarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
                try:
                    return super().fromtarfile(tf)
                except tarfile.HeaderError as exc:
                    tracker.stop = exc
                    raise

        return _TrackingTarInfo

    def check_end(self, shard: str, offset: int) -> None:
        stop = self.stop
        if isinstance(stop, tarfile.EOFHeaderError):
            return
        if isinstance(stop, tarfile.EmptyHeaderError):
            why = f"stream ended at member boundary (offset {offset}) without the end-of-archive blocks"
        elif isinstance(stop, tarfile.TruncatedHeaderError):
            why = f"stream ended inside a member header at offset {offset}"
        elif isinstance(stop, tarfile.InvalidHeaderError):
            why = f"invalid member header at offset {offset} ({stop}): corrupt data or trailing garbage"
        else:
            why = f"tar ended unexpectedly at offset {offset} ({type(stop).__name__}: {stop})"
        raise ShardReadError(f"{shard}: truncated or corrupt tar: {why}")


def iter_samples(stream: BinaryIO, shard: str, max_member_bytes: int = 256 << 20) -> Iterator[RawSample]:
    """Yield the samples of one tar shard in order, each as soon as its member group ends.

    Raises :class:`ShardReadError` (possibly after some samples were yielded) when the
    stream is not a tar, is truncated, or is corrupt; the caller must then discard the
    whole shard.
    """
    tracker = _StopTracker()
    try:
        tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=tracker.tarinfo_class(), errors="replace")
    except (tarfile.TarError, EOFError) as exc:
        raise ShardReadError(f"{shard}: not a readable tar: {exc}") from exc
    index = 0
    group: _Group | None = None
    try:
        while True:
            try:
                member = tf.next()
            except (tarfile.TarError, EOFError) as exc:
                raise ShardReadError(f"{shard}: corrupt or truncated tar: {exc}") from exc
            if member is None:
                break
            tf.members.clear()  # stream mode keeps every TarInfo otherwise
            if not member.isreg() or is_ignored(member.name):
                continue
            key, ext = split_key(member.name)
            if group is not None and key != group.key:
                yield group.to_sample(index)
                index += 1
                group = None
            if group is None:
                group = _Group(key=key)
            try:
                _add_member(group, tf, member, ext, max_member_bytes)
            except (tarfile.TarError, EOFError) as exc:
                raise ShardReadError(f"{shard}: truncated tar in member {member.name!r}: {exc}") from exc
        tracker.check_end(shard, tf.offset)
        if group is not None:
            yield group.to_sample(index)
    finally:
        tf.close()
