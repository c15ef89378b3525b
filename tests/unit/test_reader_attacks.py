"""pipeline.reader on hostile or unusual tars: corrupt numbers never loop."""

from __future__ import annotations

import io
import tarfile
import threading

import pytest

from pipeline.reader import RawSample, ShardReadError, iter_samples

LATIN1_NAMES = ["café.jpg", "cafè.jpg", "cafë.jpg", "cafê.jpg"]  # one byte each differs, none UTF-8


def read_all(data: bytes, **kw) -> list[RawSample]:
    return list(iter_samples(io.BytesIO(data), "shard-under-test", **kw))


def read_bounded(data: bytes, seconds: float = 10.0) -> list[RawSample] | BaseException:
    """iter_samples in a daemon thread: the samples, or what it raised; fails the test (instead
    of hanging it) when the reader has not finished within `seconds`."""
    out: list = []

    def run() -> None:
        try:
            out.append(read_all(data))
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the reader did not finish within {seconds} s (loops on this input)"
    return out[0]


def reheader(block: bytes | bytearray) -> bytes:
    """A header block with its checksum recomputed."""
    block = bytearray(block)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax_tar(members: list[tuple[str, bytes, dict[str, str]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, pax in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = pax
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ---- item 1: numbers in headers are validated, the parser always moves forward


@pytest.mark.parametrize("size", ["-1536", "-1024", "-512", "-1", "+1", "1_0", " 1", "0x10", "", "1e3",
                                  "9" * 30, "9" * 5000])
def test_bad_pax_size_fails_the_shard_and_never_loops(size):
    """-1536 is the reported hang: b's pax header (2 blocks) + its ustar header, so a reader that
    takes the size moves back onto that pax header and reads it again, forever."""
    data = pax_tar([("a.jpg", b"A" * 1000, {}), ("b.jpg", b"B" * 100, {"size": size}), ("c.jpg", b"C", {})])
    got = read_bounded(data)
    assert isinstance(got, ShardReadError), got
    assert "shard-under-test" in str(got) and "pax size" in str(got)


def test_pax_size_that_is_valid_overrides_the_header():
    data = pax_tar([("a.jpg", b"A" * 100, {"size": "100"})])  # tarfile writes it as given
    assert [(s.key, s.image) for s in read_all(data)] == [("a", b"A" * 100)]


@pytest.mark.parametrize("field", [b"\xff" * 12, b"\xff" + b"\xff" * 10 + b"\x00", b"-0000001000\0",
                                   b"00000001_00\0", b"\x80" + b"\x7f" + b"\xff" * 10])
def test_bad_ustar_size_fails_the_shard(field):
    data = pax_tar([("a.jpg", b"A" * 600, {})])
    assert data[156:157] == b"0"  # no pax header in front
    got = read_bounded(reheader(data[:124] + field + data[136:512]) + data[512:])
    assert isinstance(got, ShardReadError), got
    assert "invalid member header at offset 0" in str(got)


def test_gnu_base256_size_is_read():
    data = pax_tar([("a.jpg", b"A" * 600, {})])
    field = b"\x80" + (600).to_bytes(11, "big")
    assert [(s.key, s.image) for s in read_all(reheader(data[:124] + field + data[136:512]) + data[512:])] \
        == [("a", b"A" * 600)]


@pytest.mark.parametrize("record", [b"-5 size=1\n", b"+9 path=x\n", b"0 size=1\n", b"99999 path=x\n"])
def test_bad_pax_record_length_fails_the_shard(record):
    data = pax_tar([("a.jpg", b"A", {"comment": "x" * 5})])
    assert data[156:157] == b"x"
    length = int(data[124:135], 8)
    body = (record + data[512 + len(record) : 512 + length])[:length]
    head = reheader(data[:124] + b"%011o\0" % len(body) + data[136:512])
    got = read_bounded(head + body.ljust(512, b"\0") + data[1024:])
    assert isinstance(got, ShardReadError), got
