"""pipeline.shard.samples: tar stream -> webdataset-style samples, strict about broken shards."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import tracemalloc

import numpy as np
import pytest
from webdataset.tariterators import base_plus_ext

from pipeline.shard.errors import SampleError
from pipeline.shard.samples import RawSample, ShardReadError, iter_samples, split_key
from tests import corpus


class NonSeekable(io.RawIOBase):
    """A read-only stream like an S3 body: no seek/tell, short reads, counts bytes served."""

    def __init__(self, data: bytes, chunk: int = 1000):
        self._data, self._pos, self._chunk = data, 0, chunk

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *args, **kwargs):
        raise io.UnsupportedOperation("seek")

    def tell(self):
        raise io.UnsupportedOperation("tell")

    def readinto(self, b) -> int:
        n = min(len(b), self._chunk, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    @property
    def served(self) -> int:
        return self._pos


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def msg(sample: RawSample) -> str | None:
    """A sample's read error as 'reason: detail', None without one (it is a typed SampleError of stage read)."""
    if sample.error is None:
        return None
    assert isinstance(sample.error, SampleError) and sample.error.stage == "read", sample.error
    return str(sample.error)


def read_all(data: bytes, **kw) -> list[RawSample]:
    return list(iter_samples(io.BytesIO(data), "shard-under-test", **kw))


def test_good_samples_round_trip():
    samples = corpus.good_samples(6, seed=3)
    got = read_all(corpus.tar_bytes(samples))
    assert [s.key for s in got] == [s["key"] for s in samples]
    assert [s.index for s in got] == list(range(6))
    for raw, src in zip(got, samples, strict=True):
        ext = next(e for e in src["members"] if e in ("jpg", "png"))
        assert msg(raw) is None
        assert raw.image == src["members"][ext] and raw.image_ext == ext
        assert raw.text == src["members"]["txt"].decode()
        assert raw.meta == src["members"]["json"].decode()


@pytest.mark.parametrize(
    "name",
    [
        "000001.jpg",
        "dir/000001.jpg",
        "a/b/c.d.e.JPG",
        "dir.v2/x.txt",
        "./000007.json",
        "x.tar.gz",
        "k.seg.png",
    ],
)
def test_key_rule_matches_webdataset(name):
    key, ext = split_key(name)
    wds_key, wds_ext = base_plus_ext(name)
    assert (key, ext) == (wds_key, wds_ext.lower())


def test_grouping_by_path_key():
    data = tar_of(
        [("dir/000001.jpg", b"J"), ("dir/000001.txt", b"t"), ("000001.json", b"{}"), ("000001.txt", b"u")]
    )
    got = read_all(data)
    assert [(s.key, s.index) for s in got] == [("dir/000001", 0), ("000001", 1)]
    assert got[0].image == b"J" and got[0].text == "t" and got[0].meta is None
    assert msg(got[1]).startswith("no_image: sample has members [json, txt]")
    assert got[1].text == "u" and got[1].meta == "{}"


def test_image_and_text_priority_and_case():
    data = tar_of([("a.png", b"P"), ("a.JPG", b"J"), ("a.caption", b"c"), ("a.txt", b"t"), ("a.cls", b"3")])
    (s,) = read_all(data)
    assert (s.image, s.image_ext, s.text, msg(s)) == (b"J", "jpg", "t", None)


def test_invalid_utf8_caption_is_replaced_not_dropped():
    data = tar_of([("k.jpg", b"J"), ("k.txt", "café".encode("latin-1")), ("k.json", b'{"a": "\xff"}')])
    (s,) = read_all(data)
    assert msg(s) is None and s.text == "caf\ufffd" and s.meta == '{"a": "\ufffd"}'


def test_nonadjacent_repeated_key_is_a_duplicate_key_error_and_empty_key_is_a_key():
    data = tar_of([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.jpg", b"3"), (".jpg", b"4"), ("a.txt", b"5")])
    got = read_all(data)
    assert [(s.key, s.index, s.image) for s in got] == [
        ("a", 0, b"1"), ("b", 1, b"2"), ("a", 2, None), ("", 3, b"4"), ("a", 4, None)
    ]  # fmt: skip
    dup = "duplicate_key: key 'a' was already used by sample 0 of this shard"
    assert [msg(s) for s in got] == [None, None, dup, None, dup]


def test_duplicate_extension_in_group_fails_that_sample_only():
    data = tar_of([("a.jpg", b"1"), ("a.jpg", b"2"), ("b.jpg", b"3")])
    got = read_all(data)
    assert msg(got[0]).startswith("duplicate_member:") and got[0].image is None
    assert got[1].key == "b" and msg(got[1]) is None


def test_member_without_extension_is_reported():
    (s,) = read_all(tar_of([("README", b"hello")]))
    assert s.key == "README" and msg(s).startswith("no_image") and "(no extension)" in msg(s)


def test_skips_dirs_and_junk_and_reports_links():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("dir/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "x.jpg"
        tf.addfile(link)
        for name, payload in [("dir/x.jpg", b"X"), ("dir/._x.jpg", b"junk"), ("__MACOSX/dir/x.jpg", b"junk"),
                              ("__meta__", b"junk"), ("dir/x.txt", b"cap")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    link, s = read_all(buf.getvalue())
    assert (link.key, msg(link)) == ("dir/link", "unsupported_member: symlink 'dir/link.jpg' -> 'x.jpg'")
    assert (s.key, s.image, s.text, msg(s)) == ("dir/x", b"X", "cap", None)


def test_member_too_large_is_a_sample_error_and_not_read():
    big = b"\x00" * (8 << 20)
    data = tar_of([("a.jpg", big), ("a.txt", b"cap"), ("b.jpg", b"ok")])
    tracemalloc.start()
    try:
        got = read_all(data, max_member_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert msg(got[0]).startswith("member_too_large:") and "a.jpg" in msg(got[0])
    assert got[0].image is None
    assert (got[1].key, got[1].image, msg(got[1])) == ("b", b"ok", None)
    assert peak < (2 << 20), f"peak {peak} bytes: the large member was read into memory"


def test_non_seekable_stream_yields_before_reading_everything():
    samples = corpus.good_samples(8, seed=5)
    data = corpus.tar_bytes(samples)
    stream = NonSeekable(data, chunk=777)
    it = iter_samples(stream, "s3://bucket/shard.tar")
    first = next(it)
    assert first.key == samples[0]["key"] and stream.served < len(data) // 2
    rest = list(it)
    assert [s.key for s in [first, *rest]] == [s["key"] for s in samples]


@pytest.mark.parametrize("where", ["mid_member", "boundary", "header"])
def test_truncated_tar_raises_even_after_yielding(where):
    data = corpus.truncated_tar_bytes(corpus.good_samples(4, seed=1), where=where)
    seen = []
    with pytest.raises(ShardReadError, match="shard-under-test"):
        for s in iter_samples(NonSeekable(data), "shard-under-test"):
            seen.append(s.key)
    assert 0 < len(seen) < 4


@pytest.mark.parametrize("cut", [1, 511, 512, 700, 1024])
def test_truncated_near_start(cut):
    data = tar_of([("a.jpg", b"x" * 600), ("a.txt", b"t")])
    with pytest.raises(ShardReadError):
        read_all(data[:cut])


def test_truncated_inside_skipped_member():
    data = tar_of([("a.jpg", b"x" * 5000), ("b.jpg", b"y")])
    with pytest.raises(ShardReadError):
        read_all(data[:3000], max_member_bytes=100)  # a.jpg too large: skipped, not read
    with pytest.raises(ShardReadError):
        read_all(tar_of([("a.bin", b"x" * 5000), ("b.jpg", b"y")])[:3000])  # unused member


def test_missing_second_end_block_is_accepted():
    data = tar_of([("a.jpg", b"x")])  # header 512 + data 512 + two zero blocks
    assert len(read_all(data[: 1024 + 512])) == 1
    with pytest.raises(ShardReadError, match="end-of-archive"):
        read_all(data[:1024])


@pytest.mark.parametrize("payload", [b"", b"\x00" * 10, corpus.not_a_tar_bytes()])
def test_not_a_tar(payload):
    with pytest.raises(ShardReadError, match="bad-shard"):
        list(iter_samples(io.BytesIO(payload), "bad-shard"))


def test_trailing_garbage_after_member_is_corrupt():
    data = tar_of([("a.jpg", b"x")])[:1024] + b"garbage!" * 100
    with pytest.raises(ShardReadError, match="invalid member header"):
        read_all(data)


def test_empty_tar_has_no_samples():
    assert read_all(tar_of([])) == []


def test_gzip_tar_and_truncated_gzip():
    raw = corpus.tar_bytes(corpus.good_samples(3, seed=2))
    gz = gzip.compress(raw)
    assert len(read_all(gz)) == 3
    with pytest.raises(ShardReadError):
        read_all(gz[: len(gz) // 2])


def test_shard_read_error_pickles():
    err = pickle.loads(pickle.dumps(ShardReadError("s: truncated")))
    assert isinstance(err, ShardReadError) and str(err) == "s: truncated"


def test_make_shards_is_deterministic_and_spreads_broken(tmp_path):
    paths = corpus.make_shards(tmp_path / "a", n_shards=3, per_shard=4, seed=7, broken=True)
    again = corpus.make_shards(tmp_path / "b", n_shards=3, per_shard=4, seed=7, broken=True)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(open(p, "rb").read() == open(q, "rb").read() for p, q in zip(paths, again, strict=True))
    keys = []
    for path in paths:
        with open(path, "rb") as f:
            keys += [s.key for s in iter_samples(f, path)]
    broken = [s["key"] for s in corpus.broken_corpus()]
    assert sorted(k for k in keys if k.startswith("broken_")) == sorted(broken)
    assert len(keys) == len(set(keys)) == 12 + len(broken)


# ---- tar dialects: what tarfile writes and reads, this reader reads the same way


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT, mode: str = "w", **info_kw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in info_kw.items():
                setattr(info, k, v)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _reheader(data: bytes, at: int, typeflag: bytes | None = None, signed: bool = False) -> bytes:
    """Rewrite the header block at `at` (type flag, checksum: unsigned or signed-char sum)."""
    block = bytearray(data[at : at + 512])
    if typeflag is not None:
        block[156:157] = typeflag
    block[148:156] = b" " * 8
    total = sum((b - 256 if signed and b > 127 else b) for b in block)
    block[148:156] = b"%06o\0 " % total
    return data[:at] + bytes(block) + data[at + 512 :]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_paths_in_each_tar_format(fmt):
    deep = "/".join([f"segment-{i:02d}" for i in range(9)])  # 98 chars of directories
    members = [(f"{deep}/000001.jpg", b"J1"), (f"{deep}/000001.txt", b"t1")]
    if fmt != tarfile.USTAR_FORMAT:  # ustar cannot hold a basename over 100 bytes
        members += [("k" * 150 + ".jpg", b"J2"), ("dir/ünïcode-ключ.jpg", b"J3")]
    got = read_all(_tar(members, fmt))
    with tarfile.open(fileobj=io.BytesIO(_tar(members, fmt))) as tf:
        names = [m.name for m in tf.getmembers()]
    assert names == [n for n, _ in members]
    assert [s.key for s in got] == [split_key(n)[0] for n, _ in members if not n.endswith(".txt")]
    assert got[0].image == b"J1" and got[0].text == "t1"
    assert all(msg(s) is None for s in got)


def test_pax_global_header_and_base256_numbers():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tf:
        info = tarfile.TarInfo("a.jpg")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"A"))
    gnu = _tar([("b.jpg", b"B")], tarfile.GNU_FORMAT, uid=2**30, mtime=2**40)  # base-256 fields
    assert gnu[108] == 0x80  # the uid really is in base-256
    assert [(s.key, s.image) for s in read_all(buf.getvalue())] == [("a", b"A")]
    assert [(s.key, s.image) for s in read_all(gnu)] == [("b", b"B")]


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_tars(mode):
    members = [("a.jpg", b"A" * 3000), ("a.txt", b"cap"), ("b.jpg", b"B")]
    data = _tar(members, mode=mode)
    got = [(s.key, s.image, s.text) for s in iter_samples(NonSeekable(data), "z")]
    assert got == [("a", b"A" * 3000, "cap"), ("b", b"B", None)]
    with pytest.raises(ShardReadError, match="z"):
        list(iter_samples(NonSeekable(data[: len(data) - 20]), "z"))


def test_signed_checksum_is_accepted():
    data = _tar([("é.jpg", b"E")], tarfile.USTAR_FORMAT)
    (s,) = read_all(_reheader(data, 0, signed=True))
    assert s.key == "é" and s.image == b"E"


def test_unknown_member_type_and_sparse_are_errors_of_their_sample():
    data = _tar([("x.bin", b"z" * 700), ("a.jpg", b"A")])
    assert data.index(b"x.bin") == 0  # no pax header in front: x.bin's header is the first block
    unknown = _reheader(data, 0, typeflag=b"N")  # an old GNU type: its data is skipped by size
    assert [(s.key, s.image, msg(s)) for s in read_all(unknown)] == [
        ("x", None, "unsupported_member: member of type 'N' 'x.bin'"), ("a", b"A", None)]
    sparse = _reheader(data, 0, typeflag=b"S")  # no extension blocks (byte 482 is 0): data follows
    assert [(s.key, s.image, msg(s)) for s in read_all(sparse)] == [
        ("x", None, "unsupported_member: GNU sparse file 'x.bin'"), ("a", b"A", None)]


class _FailingStream(io.RawIOBase):
    def __init__(self, data: bytes, fail_at: int):
        self.data, self.pos, self.fail_at = data, 0, fail_at

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= self.fail_at:
            raise ConnectionResetError("connection reset by peer")
        n = min(len(b), self.fail_at - self.pos, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_io_errors_of_the_stream_propagate_unchanged(mode):
    data = _tar([("a.jpg", b"A" * 5000), ("b.jpg", b"B" * 5000)], mode=mode)
    with pytest.raises(ConnectionResetError):
        list(iter_samples(_FailingStream(data, len(data) // 2), "s"))


def test_oversized_long_name_header_is_corrupt_not_read():
    data = _tar([("k" * 150 + ".jpg", b"J")], tarfile.GNU_FORMAT)
    block = bytearray(data[:512])
    assert block[156:157] == b"L"
    block[124:136] = b"%011o\0" % (1 << 30)  # a 1 GiB long name
    with pytest.raises(ShardReadError, match="L header of 1073741824 bytes"):
        read_all(_reheader(bytes(block) + data[512:], 0))


@pytest.mark.parametrize("compress", [False, True])
def test_shards_written_by_webdataset_read_as_webdataset_reads_them(tmp_path, compress):
    """A shard written by webdataset's own TarWriter: the same samples, keys and bytes as
    webdataset's reader (tarfile underneath) gives."""
    import webdataset as wds

    path = str(tmp_path / ("s.tar.gz" if compress else "s.tar"))
    rng = np.random.default_rng(9)
    sent = []
    with wds.TarWriter(path, compress=compress) as w:
        for i in range(12):
            key = f"part-{i % 3}/{'x' * (90 + i * 3)}-{i:04d}" if i % 4 == 0 else f"{i:06d}"
            jpg = rng.integers(0, 256, 5000 + 7919 * i, dtype=np.uint8).tobytes()
            w.write({"__key__": key, "jpg": jpg, "txt": f"caption {i}", "json": {"i": i}})
            sent.append((key, jpg))
    with open(path, "rb") as f:
        got = [(s.key, s.image, s.text, msg(s)) for s in iter_samples(f, path)]
    theirs = [(d["__key__"], d["jpg"], d["txt"].decode()) for d in wds.WebDataset(path, shardshuffle=False)]
    assert [(k, img, txt) for k, img, txt, _ in got] == theirs
    assert [(k, img) for k, img, _, _ in got] == sent and all(e is None for *_, e in got)
