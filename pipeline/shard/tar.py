"""The project's own streaming tar parser: members of a tar stream, no seeking, no full copy.

:func:`open_stream` sniffs the compression and gives a :class:`Source`; :func:`members`
yields (name, size, unsupported) per member that could be part of a sample: the name
decoded losslessly (see :func:`stored_name` for the form that is stored and shown), the data
size the caller must then read or skip, and for a member kind the reader does not read
(links, devices, FIFOs, GNU sparse files, unknown type flags) the detail of its
``unsupported_member`` error. Directories and GNU volume labels are skipped here.
:mod:`pipeline.shard.samples` groups the members into samples.

Why not ``tarfile``: its stream mode copies the rest of its buffer on every read, reads a
member in 10 KiB pieces joined in Python and sums header checksums through ``struct``; under
the worker's GIL that was ~0.1 ms per sample, the largest Python cost left in a GPU worker.
Here one read of 256 KiB feeds several members and a member's bytes are one slice. The tar
rules kept (as ``tarfile`` reads them): ustar headers with the ``prefix`` field, base-256 and
octal numbers, unsigned or signed header checksums, GNU long names and link names (``L``,
``K``), pax extended and global headers (``path``, ``linkpath``, ``size``; Solaris ``X``),
GNU sparse maps (skipped, with old GNU's extension blocks), V7 directories (``name/``),
gzip / bzip2 / xz compression detected from the first bytes.

Corrupt numbers: a size (ustar octal or base-256, pax ``size``) must be a plain non-negative
number below 2**63; octal fields hold octal digits (space/NUL padded), pax sizes and record
lengths decimal digits, nothing else (no sign, ``_``, blanks inside). Every header consumes at
least one block and no read or skip goes backwards, so the parser always moves forward (it
checks that it does): a corrupt header fails the shard, it never loops.

End-of-shard check: only the all-zero end-of-archive block ends a shard. A stream that stops
at a member boundary, inside a header, inside member data (read or skipped) or its padding,
or that continues with a block that is not a valid header (bad checksum, bad number: corrupt
data or trailing garbage) raises :class:`Corrupt` or ``EOFError``, which
:func:`pipeline.shard.samples.iter_samples` reports as ``ShardReadError``. A tar whose first end-of-archive
block is present but whose second one (or the record padding) is missing is accepted: every
member is complete by then. I/O errors of the underlying stream propagate unchanged.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_READ = 1 << 18  # bytes asked of the underlying stream at a time
_DIRECT = 1 << 16  # member bytes at least this many past the buffer are read straight
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: size ignored
_NOT_SAMPLES = (b"5", b"D", b"V")  # directories, GNU dump directories, GNU volume labels
_KINDS = {b"1": "hardlink", b"2": "symlink", b"3": "character device", b"4": "block device", b"6": "FIFO"}
_META = (b"L", b"K", b"x", b"g", b"X")  # GNU long name / long link, pax extended / global, Solaris pax
_META_MAX = 1 << 20  # such a header's data is read into memory: a larger one is corrupt
_SIZE_MAX = 1 << 63  # a member size at least this large is corrupt (the reading stays bounded anyway)


class Corrupt(Exception):
    """A block that is not a valid tar header."""


class _Raw:
    """The caller's stream, first bytes put back after sniffing; remembers its own failures so
    they are not mistaken for corrupt compressed data."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.head, self.failed = stream, b"", False

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = (self.head, b"") if n < 0 or n >= len(self.head) else \
                (self.head[:n], self.head[n:])
            return out
        try:
            return self.stream.read(n)
        except BaseException:
            self.failed = True
            raise

    def readable(self) -> bool:
        return True


class Source:
    """Sequential reads over a stream with one carried-over buffer; counts bytes consumed."""

    def __init__(self, stream: BinaryIO | _Raw) -> None:
        self.stream, self.buf, self.pos, self.offset = stream, b"", 0, 0

    def read(self, n: int) -> bytes:
        """n bytes, or fewer only where the stream ends."""
        if n < 0:  # never from a header (sizes are checked): the offset must not go back
            raise ValueError(f"negative read of {n} bytes at offset {self.offset}")
        buf, pos = self.buf, self.pos
        if pos + n <= len(buf):
            self.pos = pos + n
            self.offset += n
            return buf[pos : pos + n]
        parts = [buf[pos:]] if pos < len(buf) else []
        got = len(buf) - pos
        self.buf, self.pos = b"", 0
        while got < n:
            # a large remainder is read on its own (one copy, made by the stream); a small one
            # comes with the next _READ bytes, which serve the headers and members after it
            block = self.stream.read(n - got if n - got >= _DIRECT else _READ)
            if not block:
                break
            want = n - got
            if len(block) > want:
                parts.append(block[:want])
                self.buf, self.pos = block, want
                got = n
                break
            parts.append(block)
            got += len(block)
        self.offset += got
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def skip(self, n: int) -> int:
        """Drop n bytes (reading them: the stream need not seek); returns how many were there."""
        if n < 0:
            raise ValueError(f"negative skip of {n} bytes at offset {self.offset}")
        left = len(self.buf) - self.pos
        if n <= left:
            self.pos += n
            self.offset += n
            return n
        done = left
        self.buf, self.pos = b"", 0
        while done < n:
            block = self.stream.read(min(n - done, _READ))
            if not block:
                break
            done += len(block)
        self.offset += done
        return done


def _number(field: bytes) -> int:
    """A ustar numeric field: GNU base-256 (two's complement when negative) or octal digits,
    optionally space/NUL padded. Anything else (signs, underscores, other digits) is corrupt."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    end = field.find(b"\0")
    digits = (field if end < 0 else field[:end]).strip()
    if not digits:
        return 0
    if not digits.isdigit():
        raise Corrupt(f"bad number {field!r}")
    try:
        return int(digits, 8)
    except ValueError:  # an 8 or a 9
        raise Corrupt(f"bad number {field!r}") from None


def _pax_size(value: bytes, at: int) -> int:
    """A pax ``size`` record: decimal digits only (``int`` would also take signs, spaces, ``_``)."""
    if not value.isdigit() or len(value) > 19 or int(value) >= _SIZE_MAX:
        raise Corrupt(f"invalid pax size {value[:40]!r} at offset {at}: corrupt data")
    return int(value)


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    unsigned = 256 + sum(block[:148]) + sum(block[156:])
    if stored == unsigned:
        return True
    high = sum(1 for b in block[:148] if b & 0x80) + sum(1 for b in block[156:] if b & 0x80)
    return stored == unsigned - 256 * high  # some old tars sum signed chars


def _cstr(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _name(raw: bytes) -> str:
    """Lossless: bytes that are not UTF-8 become lone surrogates (as in tarfile); see stored_name."""
    return raw.decode("utf-8", "surrogateescape")


def stored_name(name: str) -> str:
    """A name as stored and shown: each byte that is not UTF-8 as the text ``\\xNN``."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _pax_records(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        sp = data.find(b" ", pos)
        digits = data[pos:sp] if sp > pos else b""
        if not digits.isdigit() or len(digits) > 9:
            raise Corrupt("bad pax record length")
        length = int(digits)
        rec = data[sp + 1 : pos + length]
        key, eq, value = rec.partition(b"=")
        if length <= sp - pos or pos + length > len(data) or not eq or not rec.endswith(b"\n"):
            raise Corrupt("bad pax record")
        out[key.decode("utf-8", "replace")] = value[:-1]
        pos += length  # > 0: the record holds at least its own length digits
    return out


def _header(src: Source, at: int) -> tuple[bytes, int] | None:
    """The next header block, checked, and its size field; None at the end-of-archive block."""
    block = src.read(BLOCK)
    if len(block) < BLOCK:
        if at == 0:
            raise Corrupt("empty file" if not block else "shorter than one tar block")
        if not block:
            raise EOFError(f"stream ended at member boundary (offset {at}) without the end-of-archive blocks")
        raise EOFError(f"stream ended inside a member header at offset {at}")
    if block == _ZERO:
        return None
    try:
        if not _checksum_ok(block):
            raise Corrupt("bad checksum")
        size = _number(block[124:136])
    except Corrupt as e:
        raise Corrupt(f"invalid member header at offset {at} ({e}): corrupt data or trailing garbage") from None
    if not 0 <= size < _SIZE_MAX:
        raise Corrupt(f"invalid member header at offset {at} (size {size}): corrupt data")
    return block, size


def _meta_data(src: Source, kind: bytes, size: int, at: int) -> bytes:
    """The data of an L/K/x/g header (read into memory, so bounded by _META_MAX)."""
    if size > _META_MAX:
        raise Corrupt(f"invalid member header at offset {at} ({kind.decode()} header of {size} bytes)")
    data = src.read(size)
    pad = -size % BLOCK
    if len(data) < size or src.skip(pad) < pad:
        raise EOFError(f"stream ended inside a {kind.decode()} header's data at offset {at}")
    return data


def _skip_sparse_map(src: Source, block: bytes, at: int) -> None:
    """Old GNU sparse ('S'): header byte 482 set means extension blocks of 21 more map entries
    follow the header, each with its own flag at byte 504; the member's data comes after them."""
    extended = block[482]
    while extended:
        ext = src.read(BLOCK)
        if len(ext) < BLOCK:
            raise EOFError(f"stream ended inside the sparse map of the member at offset {at}")
        extended = ext[504]


def _unsupported(kind: bytes, name: bytes, link: bytes, sparse: bool) -> str:
    """The detail of an unsupported_member error: the kind, the member, a link's target."""
    shown = repr(stored_name(_name(name)))
    if sparse:
        return f"GNU sparse file {shown}"
    what = _KINDS.get(kind)
    if what is None:
        return f"member of type {kind.decode('latin-1')!r} {shown}"
    if kind in (b"1", b"2"):
        return f"{what} {shown} -> {stored_name(_name(link))!r}"
    return f"{what} {shown}"


def members(src: Source) -> Iterator[tuple[str, int, str | None]]:
    """(name, size, unsupported) for each member that is not a directory; `unsupported` is None
    for a regular file, else the detail of its unsupported_member error. The caller consumes
    exactly `size` data bytes (read or skipped) before asking for the next one. Returns at the
    end-of-archive block; raises Corrupt (not a valid header) or EOFError (ended too soon).

    Always moves forward: every header consumes a block, sizes are checked to be >= 0 and
    Source refuses negative lengths; the offset check below makes that explicit."""
    long_name: bytes | None = None
    long_link: bytes | None = None
    pax: dict[str, bytes] = {}
    pax_global: dict[str, bytes] = {}
    last = -1
    while True:
        at = src.offset
        if at <= last:
            raise Corrupt(f"no progress at offset {at} (previous header at {last})")
        last = at
        header = _header(src, at)
        if header is None:
            return
        block, size = header
        kind = block[156:157]
        if kind in _META:
            data = _meta_data(src, kind, size, at)
            if kind == b"L":
                long_name = _cstr(data)
            elif kind == b"K":
                long_link = _cstr(data)
            else:
                try:
                    records = _pax_records(data)
                except Corrupt as e:
                    raise Corrupt(f"invalid pax header at offset {at} ({e})") from None
                (pax_global if kind == b"g" else pax).update(records)
            continue
        fields = {**pax_global, **pax} if pax or pax_global else {}
        name = _cstr(block[:100])
        if kind == b"\0" and name.endswith(b"/"):
            kind = b"5"  # V7 directory
        prefix = _cstr(block[345:500])
        if prefix:
            name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        sparse = False
        if fields:
            name = fields.get("GNU.sparse.name", fields.get("path", name))
            if "size" in fields:
                size = _pax_size(fields["size"], at)
            sparse = any(k.startswith("GNU.sparse.") for k in fields)
        data_size = 0 if kind in _NO_DATA else size
        if kind in _REGULAR and not sparse:
            yield _name(name), data_size, None
        elif kind not in _NOT_SAMPLES:
            if kind == b"S":
                _skip_sparse_map(src, block, at)
                sparse = True
            link = fields.get("linkpath", long_link if long_link is not None else _cstr(block[157:257]))
            yield _name(name), data_size, _unsupported(kind, name, link, sparse)
        elif src.skip(data_size) < data_size:
            raise EOFError(f"stream ended inside the member at offset {at}")
        pad = -data_size % BLOCK
        if src.skip(pad) < pad:
            raise EOFError(f"stream ended inside the padding of the member at offset {at}")
        long_name, long_link, pax = None, None, {}


def open_stream(stream: BinaryIO) -> tuple[Source, _Raw, bool]:
    raw = _Raw(stream)
    head = b""
    while len(head) < 6:
        more = stream.read(6 - len(head))
        if not more:
            break
        head += more
    raw.head = head
    if head.startswith(b"\x1f\x8b"):
        inner: BinaryIO | _Raw = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
    elif head.startswith(b"BZh"):
        inner = bz2.BZ2File(raw)  # type: ignore[arg-type]
    elif head.startswith(b"\xfd7zXZ\x00"):
        inner = lzma.LZMAFile(raw)  # type: ignore[arg-type]
    else:
        return Source(raw), raw, False
    return Source(inner), raw, True
