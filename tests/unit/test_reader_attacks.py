"""pipeline.shard.samples (over pipeline.shard.tar) on hostile or unusual tars: corrupt numbers never loop, names that are not
UTF-8 keep their samples apart, every member kind is a sample or an error record, a key is
used once per shard."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import threading

import pytest

from pipeline.shard.samples import RawSample, ShardReadError
from tests.unit.test_reader import msg, read_all

LATIN1_NAMES = ["café.jpg", "cafè.jpg", "cafë.jpg", "cafê.jpg"]  # one byte each differs, none UTF-8


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


# ---- item 4a: names that are not UTF-8


def _latin1_tar(fmt: int, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="latin-1") as tf:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            payload = b"IMG%d" % i
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_latin1_names_stay_distinct_as_webdataset_reads_them(tmp_path, fmt):
    import webdataset as wds

    data = _latin1_tar(fmt, LATIN1_NAMES)
    assert b"caf\xe9.jpg" in data  # the raw Latin-1 bytes, not UTF-8
    path = tmp_path / "latin1.tar"
    path.write_bytes(data)
    got = read_all(data)
    theirs = [d["__key__"] for d in wds.WebDataset(str(path), shardshuffle=False)]
    assert len(got) == len(theirs) == 4 and len(set(theirs)) == 4
    # the stored key: webdataset's (lossless, lone surrogates) with each non-UTF-8 byte as \xNN
    shown = [k.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for k in theirs]
    assert [s.key for s in got] == shown == ["caf\\xe9", "caf\\xe8", "caf\\xeb", "caf\\xea"]
    assert [s.image for s in got] == [b"IMG0", b"IMG1", b"IMG2", b"IMG3"]
    assert all(msg(s) is None for s in got)
    for s in got:
        s.key.encode("utf-8")  # no lone surrogates: writable as a Parquet string


def test_pax_path_that_is_not_utf8_uses_the_same_rule():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:  # utf-8, surrogateescape
        for i, name in enumerate(["dir/caf\udce9.jpg", "dir/caf\udce8.jpg", "dir/café.jpg"]):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"%d" % i))
    data = buf.getvalue()
    assert b"path=dir/caf\xe9.jpg" in data  # a pax path record that is not UTF-8
    got = read_all(data)
    assert [(s.key, s.image, msg(s)) for s in got] == [
        ("dir/caf\\xe9", b"0", None), ("dir/caf\\xe8", b"1", None), ("dir/café", b"2", None)]


def test_messages_about_non_utf8_names_are_writable():
    data = _latin1_tar(tarfile.GNU_FORMAT, ["caf\xe9.jpg", "caf\xe9.jpg"])
    (s,) = read_all(data)
    assert msg(s) == "duplicate_member: extension 'jpg' appears twice in sample 'caf\\\\xe9'"
    msg(s).encode("utf-8")


# ---- item 5: a key is used once per shard


def _plain_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT, encoding: str = "utf-8") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding=encoding) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_a_key_seen_again_is_a_duplicate_key_error():
    data = _plain_tar([("a.jpg", b"1"), ("a.txt", b"t"), ("b.jpg", b"2"), ("a.jpg", b"3"), ("c.jpg", b"4"),
                       ("a.png", b"5")])
    got = read_all(data)
    assert [(s.key, s.index, s.image, s.text) for s in got] == [
        ("a", 0, b"1", "t"), ("b", 1, b"2", None), ("a", 2, None, None), ("c", 3, b"4", None),
        ("a", 4, None, None)]
    assert [msg(s) for s in got] == [
        None, None, "duplicate_key: key 'a' was already used by sample 0 of this shard", None,
        "duplicate_key: key 'a' was already used by sample 0 of this shard"]


def test_names_distinct_as_bytes_but_equal_as_stored_keys_are_duplicates():
    """b'a\\xff' is stored as the text 'a\\\\xff', which is also what the name 'a\\\\xff' gives."""
    data = _plain_tar([("a\xff.jpg", b"1"), ("a\\xff.jpg", b"2")], encoding="latin-1")
    got = read_all(data)
    assert [(s.key, s.image) for s in got] == [("a\\xff", b"1"), ("a\\xff", None)]
    assert msg(got[1]).startswith("duplicate_key: key 'a\\\\xff' was already used by sample 0")


# ---- item 4b: every member kind is a sample or an error record


def _kinds_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        def add(name: str, kind: bytes, payload: bytes = b"", **kw) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(payload)
            for k, v in kw.items():
                setattr(info, k, v)
            tf.addfile(info, io.BytesIO(payload) if payload else None)

        add("d", tarfile.DIRTYPE)
        add("d/000001.jpg", tarfile.REGTYPE, b"JPEG1")
        add("d/000001.txt", tarfile.REGTYPE, b"cap1")
        add("d/000002.jpg", tarfile.SYMTYPE, linkname="000001.jpg")
        add("d/000003.jpg", tarfile.LNKTYPE, linkname="d/000001.jpg")
        add("d/000004.jpg", tarfile.FIFOTYPE)
        add("d/000005.jpg", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("d/000006.jpg", tarfile.BLKTYPE, devmajor=8, devminor=0)
        add("d/000007.jpg", tarfile.REGTYPE, b"JPEG7")
        add("d/000007.json", tarfile.SYMTYPE, linkname="/etc/passwd")
        add("d/000008.jpg", b"N", b"old GNU names" * 50)  # a type this reader does not know
        add("d/000009.jpg", tarfile.CONTTYPE, b"JPEG9")  # contiguous file: a regular file
        add("d/" + "l" * 120 + ".jpg", tarfile.SYMTYPE, linkname="t" * 120 + ".jpg")  # GNU L and K headers
        add("d/._000010.jpg", tarfile.SYMTYPE, linkname="x")  # macOS junk: ignored whatever its kind
        add("d/000010.jpg", tarfile.REGTYPE, b"JPEG10")
    return buf.getvalue()


def test_every_member_kind_is_a_sample_or_an_error_record():
    got = read_all(_kinds_tar())
    expect = {
        "d/000001": None,
        "d/000002": "unsupported_member: symlink 'd/000002.jpg' -> '000001.jpg'",
        "d/000003": "unsupported_member: hardlink 'd/000003.jpg' -> 'd/000001.jpg'",
        "d/000004": "unsupported_member: FIFO 'd/000004.jpg'",
        "d/000005": "unsupported_member: character device 'd/000005.jpg'",
        "d/000006": "unsupported_member: block device 'd/000006.jpg'",
        "d/000007": "unsupported_member: symlink 'd/000007.json' -> '/etc/passwd'",
        "d/000008": "unsupported_member: member of type 'N' 'd/000008.jpg'",
        "d/000009": None,
        "d/" + "l" * 120: f"unsupported_member: symlink 'd/{'l' * 120}.jpg' -> '{'t' * 120}.jpg'",
        "d/000010": None,
    }
    assert [s.key for s in got] == list(expect)
    assert [s.index for s in got] == list(range(len(expect)))
    assert {s.key: msg(s) for s in got} == expect
    assert [(s.image, s.text) for s in got if msg(s) is None] == [
        (b"JPEG1", "cap1"), (b"JPEG9", None), (b"JPEG10", None)]
    assert all(s.image is None for s in got if msg(s))
    with tarfile.open(fileobj=io.BytesIO(_kinds_tar())) as tf:  # nothing else in it is a sample
        names = {m.name.split(".")[0] for m in tf.getmembers() if not m.isdir() and "._" not in m.name}
    assert names == set(expect)


def _gnu_tar() -> str:
    tar = shutil.which("tar")
    if tar is None or b"GNU tar" not in subprocess.run([tar, "--version"], capture_output=True).stdout:
        pytest.skip("GNU tar is not installed (apt-get install tar)")
    return tar


def _sparse_file(path, holes: int) -> None:
    """A file with `holes` data pieces separated by holes; the file system must keep the holes."""
    with open(path, "wb") as f:
        for i in range(holes):
            f.seek(i * 200_000 + 70_000)
            f.write(b"DATA%04d" % i)
        f.truncate(holes * 200_000)


@pytest.mark.parametrize("fmt", ["gnu", "posix", "posix-0.0", "posix-0.1"])
@pytest.mark.parametrize("holes", [2, 12, 40])  # old GNU: 4 map entries in the header, 21 per extension
def test_gnu_sparse_member_is_an_error_record_and_the_rest_reads(tmp_path, fmt, holes):
    tar = _gnu_tar()
    src = tmp_path / "src"
    src.mkdir()
    _sparse_file(src / "000001.jpg", holes)
    (src / "000001.txt").write_bytes(b"caption one")
    (src / "000002.jpg").write_bytes(b"JPEG2" * 300)
    (src / "000003.jpg").write_bytes(b"JPEG3")
    fmt_args = ["--format=" + fmt.split("-")[0]] + (["--sparse-version=" + fmt.split("-")[1]] if "-" in fmt else [])
    out = tmp_path / "s.tar"
    subprocess.run([tar, "--sparse", *fmt_args, "-cf", str(out), "-C", str(src),
                    "000001.jpg", "000001.txt", "000002.jpg", "000003.jpg"], check=True)
    with tarfile.open(out) as tf:  # GNU tar really wrote a sparse member (or the test means nothing)
        first = tf.getmembers()[0]
        assert first.name == "000001.jpg" and first.issparse(), "the file system kept no holes"
        if fmt == "gnu" and holes > 4:
            assert first.offset_data > first.offset + 512  # extended sparse header blocks follow
    got = read_all(out.read_bytes())
    assert [(s.key, s.image, msg(s)) for s in got] == [
        ("000001", None, "unsupported_member: GNU sparse file '000001.jpg'"),
        ("000002", b"JPEG2" * 300, None),
        ("000003", b"JPEG3", None),
    ]
    assert got[0].text is None  # an error record keeps no member data


def test_gnu_sparse_header_cut_inside_its_extension_blocks_is_truncated(tmp_path):
    tar = _gnu_tar()
    _sparse_file(tmp_path / "a.jpg", 40)
    out = tmp_path / "s.tar"
    subprocess.run([tar, "--sparse", "--format=gnu", "-cf", str(out), "-C", str(tmp_path), "a.jpg"], check=True)
    data = out.read_bytes()
    assert data[482] == 1 and data[512 + 504] == 1  # two extension blocks at least
    got = read_bounded(data[:1024 + 100])
    assert isinstance(got, ShardReadError) and "truncated" in str(got), got



# ---- end to end: the worker turns these samples into rows and error records verify accepts


def test_worker_writes_latin1_keys_links_and_repeats_as_verify_expects(tmp_path):
    """Latin-1 names, a symlink and a repeated key through ShardProcessor (no Ray): every
    sample is a row or an error record with the reader's reason, and verify's shard check
    finds nothing wrong (before: 2 rows of 5 images, duplicate keys among rows)."""
    import pyarrow.parquet as pq

    from pipeline.io import Storage
    from pipeline.protocol import ShardTask
    from pipeline.shard.encode import ModelSpec
    from pipeline.shard.processor import ShardProcessor, WorkerConfig
    from pipeline.verify import _check_shard
    from schemas import SCHEMA_VERSION, Manifest
    from tests import corpus

    images = [img for _, img, _ in corpus.good_images(5, seed=11)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        def add(name: str, payload: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(payload)
            if kind == tarfile.SYMTYPE:
                info.linkname = "café.jpg"
            tf.addfile(info, io.BytesIO(payload))

        for name, img in zip(LATIN1_NAMES, images, strict=False):
            add(name, img)
        add("link.jpg", kind=tarfile.SYMTYPE)
        add("café.jpg", images[4])  # the key of sample 0 again
    shard = tmp_path / "in.tar"
    shard.write_bytes(buf.getvalue())
    out = tmp_path / "out"
    cfg = WorkerConfig(output=str(out), model=ModelSpec(model="wintok-tiny", device="cpu"), batch_size=4,
                       decode_threads=1, fingerprint={"schema_version": SCHEMA_VERSION})
    res = ShardProcessor(cfg).process(ShardTask(str(shard), "in", 1))
    assert res.ok, res
    manifest = Manifest.from_json(res.manifest)
    rows = pq.read_table(out / "shards" / "in.parquet").to_pylist()
    errors = pq.read_table(out / "errors" / "in.parquet").to_pylist()
    assert [(r["key"], r["sample_index"]) for r in rows] == [
        ("caf\\xe9", 0), ("caf\\xe8", 1), ("caf\\xeb", 2), ("caf\\xea", 3)]
    assert [(e["key"], e["sample_index"], e["reason"]) for e in errors] == [
        ("link", 4, "unsupported_member"), ("caf\\xe9", 5, "duplicate_key")]
    assert "symlink 'link.jpg' -> 'caf\\\\xe9.jpg'" in errors[0]["error"]
    assert (manifest.samples, manifest.rows, manifest.errors) == (6, 4, 2)
    assert _check_shard(Storage(str(out)), manifest, None)[0] == []
