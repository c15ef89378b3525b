"""pipeline.shard.decode: thread and process decoders give the same outcomes; a dying child costs one sample."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pipeline.preprocess import PreprocessConfig, SampleError, decode_image
from pipeline.shard import decode as D
from tests import corpus

CFG = PreprocessConfig(image_size=48)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jobs() -> list[tuple[str, bytes]]:
    jobs = [(k, data) for k, data, _ in corpus.good_images(6, seed=7)]
    for s in corpus.broken_corpus():
        data = next((v for k, v in s["members"].items() if k not in ("txt", "json")), None)
        if data is not None:
            jobs.append((s["key"], data))
    return jobs


def _decode_all(dec, jobs, chunk: int) -> list[tuple[str, object]]:
    """Submit in chunks, take results in order, copy pixels out and release, as Decoder.map does."""
    chunks = []
    for i in range(0, len(jobs), chunk):
        c = D.Chunk(list(jobs[i:i + chunk]))
        dec.submit(c)
        chunks.append(c)
    out = []
    for c in chunks:
        for (key, _), r in zip(c.jobs, dec.results(c), strict=True):
            if isinstance(r, SampleError):
                out.append((key, ("error", r.stage, r.reason)))
            else:
                out.append((key, (r.pixels.copy(), r.width, r.height, r.digest)))
                dec.release(r)
    return out


@pytest.fixture(scope="module")
def process_decoder():
    dec = D.ProcessDecoder(2, CFG, slots=64, chunk_size=4)
    yield dec
    dec.close()


def test_process_and_thread_decoders_agree_with_decode_image(process_decoder):
    jobs = _jobs()
    threads = D.ThreadDecoder(2, CFG)
    try:
        a = _decode_all(threads, jobs, 1)
    finally:
        threads.close()
    b = _decode_all(process_decoder, jobs, 4)
    assert [k for k, _ in a] == [k for k, _ in b] == [k for k, _ in jobs]
    n_ok = 0
    for (key, x), (_, y), (_, data) in zip(a, b, jobs, strict=True):
        try:
            ref = decode_image(data, CFG)
        except SampleError as e:
            assert x == y == ("error", e.stage, e.reason), key
            continue
        n_ok += 1
        np.testing.assert_array_equal(x[0], ref.pixels, err_msg=key)
        np.testing.assert_array_equal(y[0], ref.pixels, err_msg=key)
        assert x[1:] == y[1:] == (ref.width, ref.height, hashlib.blake2b(data, digest_size=16).digest()), key
    assert n_ok >= 15 and len(jobs) - n_ok >= 5  # both kinds of outcome were exercised
    assert process_decoder.in_flight() == 0


def test_abandoned_results_give_their_slots_back(process_decoder):
    jobs = _jobs()
    chunks = [D.Chunk(jobs[i:i + 5]) for i in range(0, 20, 5)]
    for c in chunks:
        process_decoder.submit(c)
    assert process_decoder.in_flight() == 20
    for r in process_decoder.results(chunks[0]):  # the first chunk taken, the rest dropped unread
        if isinstance(r, D.Slot):
            process_decoder.release(r)
    for c in chunks[1:]:
        for pos in range(len(c.jobs)):
            process_decoder.abandon(c, pos)
    assert process_decoder.in_flight() == 0


def test_a_child_that_dies_costs_only_its_sample(monkeypatch):
    jobs = [(k, data) for k, data, _ in corpus.good_images(10, seed=9)]
    poison = jobs[6][0]
    monkeypatch.setenv("WINTOK_FAILPOINTS", f"decode@{poison}=exit")  # children inherit it when spawned
    dec = D.ProcessDecoder(2, CFG, slots=16, chunk_size=3)
    try:
        out = _decode_all(dec, jobs, 3)
        assert dec.crashes == 1 and dec.in_flight() == 0
        for (key, r), (_, data) in zip(out, jobs, strict=True):
            if key == poison:
                assert r == ("error", "decode", "decoder_crashed")
            else:
                np.testing.assert_array_equal(r[0], decode_image(data, CFG).pixels)
        again = _decode_all(dec, jobs[:3], 3)  # the replacement pool works
        assert all(isinstance(r[0], np.ndarray) for _, r in again)
    finally:
        dec.close()


def test_make_decoder_chooses_and_falls_back(monkeypatch, caplog):
    t = D.make_decoder("threads", 3, CFG, in_flight=64)
    assert isinstance(t, D.ThreadDecoder) and t.chunk_size == 1
    t.close()
    p = D.make_decoder("processes", 2, CFG, in_flight=64)
    try:
        assert isinstance(p, D.ProcessDecoder) and p.chunk_size == 16 and p.shape == (64, 48, 48, 3)
    finally:
        p.close()
    p = D.make_decoder("processes", 20, CFG, in_flight=513)
    try:
        assert p.chunk_size == 513 // 40  # two chunks per child in flight
    finally:
        p.close()
    monkeypatch.delattr(D.os, "memfd_create")  # the Linux fallback lives in decode_kind, the one rule
    kind = D.decode_kind("processes", gpu_worker=True)
    t = D.make_decoder(kind, 2, CFG, in_flight=513)
    assert isinstance(t, D.ThreadDecoder) and "memfd_create" in caplog.text
    t.close()
    with pytest.raises(ValueError):
        D.make_decoder("auto", 2, CFG, 8)


def test_decode_kind_is_the_one_rule():
    """(configured mode, worker kind, safe mode, platform) -> the decoder kind."""
    assert D.decode_kind("auto", gpu_worker=True) == "processes"
    assert D.decode_kind("auto", gpu_worker=False) == "threads"
    assert D.decode_kind("threads", gpu_worker=True) == "threads"
    assert D.decode_kind("processes", gpu_worker=False) == "processes"
    # safe mode (a worker died on the shard): child processes, where a crash costs one sample
    assert D.decode_kind("threads", gpu_worker=False, safe_mode=True) == "processes"
    assert D.decode_kind("auto", gpu_worker=False, safe_mode=True, memfd=False) == "threads"
    assert D.decode_kind("processes", gpu_worker=True, memfd=False) == "threads"
    with pytest.raises(ValueError):
        D.decode_kind("fork", gpu_worker=False)


def _decode_map(kind: str, samples: list, window: int) -> list:
    dec = D.Decoder(kind, 2, CFG, window)
    try:
        return [(d.sample.key, d.ok, d.error and d.error.reason, None if px is None else px.copy())
                for d, px in dec.map(samples)]
    finally:
        dec.close()


def test_decoder_map_keeps_order_and_agrees_across_kinds():
    """Decoder.map: one (decoded, pixels) per sample in input order, read errors passed through;
    threads and processes give the same pixels, whatever the window."""
    from pipeline.shard.samples import iter_samples

    data = corpus.tar_bytes(corpus.broken_corpus() + corpus.good_samples(9, seed=4))
    samples = list(iter_samples(io.BytesIO(data), "t.tar"))
    threads = _decode_map("threads", samples, window=4)
    assert [k for k, *_ in threads] == [s.key for s in samples]
    assert any(ok for _, ok, _, _ in threads) and any(not ok for _, ok, _, _ in threads)
    for kind, window in (("processes", 3), ("processes", 64), ("threads", 1)):
        other = _decode_map(kind, samples, window)
        assert [(k, ok, r) for k, ok, r, _ in other] == [(k, ok, r) for k, ok, r, _ in threads]
        for (_, _, _, a), (_, _, _, b) in zip(other, threads, strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)


def test_decoder_map_closed_early_frees_every_slot():
    """A consumer that stops early (generator close): what is in flight is abandoned, no slot kept."""
    from pipeline.shard.samples import iter_samples

    samples = list(iter_samples(io.BytesIO(corpus.tar_bytes(corpus.good_samples(40, seed=2))), "t.tar"))
    dec = D.Decoder("processes", 2, CFG, 16)
    try:
        it = dec.map(samples)
        for _ in range(5):
            next(it)
        assert dec.backend.in_flight() > 0
        it.close()
        assert dec.backend.in_flight() == 0
        assert len(list(dec.map(samples))) == 40  # and the decoder goes on
        assert dec.backend.in_flight() == 0
    finally:
        dec.close()


def _shm_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")} if os.path.isdir("/dev/shm") else set()


def test_children_go_and_nothing_is_left_when_the_worker_is_killed(tmp_path):
    """SIGKILL the owning process: its decoding children leave and no named segment ever existed."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from pipeline.shard.decode import Chunk, ProcessDecoder
        from pipeline.preprocess import PreprocessConfig
        if __name__ == "__main__":
            d = ProcessDecoder(2, PreprocessConfig(image_size=16), 8, 2)
            c = Chunk([("a", b"x"), ("b", b"y"), ("c", b"z")])
            d.submit(c)
            d.results(c)
            print("ready", flush=True)
            time.sleep(120)
    """))
    before = _shm_names()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", "the owner did not start"
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children  # at least one decoding child
    assert _shm_names() == before  # the pixel ring is anonymous
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    alive = children
    while time.time() < deadline:
        alive = [c for c in children if os.path.exists(f"/proc/{c}") and
                 "Z" not in open(f"/proc/{c}/stat").read().split()[2]]
        if not alive:
            break
        time.sleep(0.2)
    assert not alive, f"children still running: {alive}"
    assert _shm_names() == before


def test_close_releases_the_pixel_ring():
    dec = D.ProcessDecoder(1, CFG, slots=4, chunk_size=1)
    fd = dec.fd
    os.fstat(fd)
    dec.close()
    assert dec.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
