"""pipeline.io against the fault proxy, without Ray: what is retried, what is raised, and as what."""

from __future__ import annotations

import errno

import pytest

from pipeline import io as pio
from tests import corpus
from tests.faults.s3proxy import S3FaultProxy

pytestmark = pytest.mark.e2e


@pytest.fixture()
def opts(s3_proxy, monkeypatch):
    monkeypatch.setenv("WINTOK_IO_RETRIES", "2")
    return pio.s3_options(s3_proxy.url)


@pytest.fixture()
def shard(s3_direct):
    if not s3_direct.exists("flt-io"):
        s3_direct.mkdir("flt-io")
    data = corpus.tar_bytes(corpus.good_samples(3, seed=5))
    s3_direct.pipe_file("flt-io/x.tar", data)
    return data


def _read(url: str, opts: pio.StorageOptions) -> bytes:
    with pio.open_input(url, opts) as f:
        return f.read()


def test_policy_and_options_from_env(monkeypatch):
    monkeypatch.delenv("WINTOK_IO_BACKOFF_MAX")
    monkeypatch.setenv("WINTOK_IO_RETRIES", "7")
    monkeypatch.setenv("WINTOK_IO_BACKOFF", "0.25")
    monkeypatch.setenv("WINTOK_S3_UPLOAD_CHUNKSIZE", "6000000")
    monkeypatch.setenv("WINTOK_S3_OPTIONS", '{"retries": 4, "config_kwargs": {"retries": {"mode": "adaptive"}}}')
    o = pio.s3_options("http://127.0.0.1:1")
    assert o.retry == pio.RetryPolicy(retries=7, backoff=0.25, backoff_max=10.0)
    assert o.upload_chunksize == 6_000_000
    assert o.options["s3"]["endpoint_url"] == "http://127.0.0.1:1" and o.options["s3"]["retries"] == 4
    fs, _ = pio.get_fs("s3://b/k", o)
    assert fs.retries == 4 and fs.config_kwargs == {"retries": {"mode": "adaptive"}}
    monkeypatch.delenv("WINTOK_S3_OPTIONS")
    fs, _ = pio.get_fs("s3://b/k", pio.s3_options("http://127.0.0.1:1"))
    assert fs.retries == pio.S3FS_TRIES
    monkeypatch.setenv("WINTOK_IO_RETRIES", "many")
    with pytest.raises(ValueError, match="WINTOK_IO"):
        pio.s3_options()
    for d in (1, 2, 3, 10):
        assert 0 <= pio.RetryPolicy(backoff=1, backoff_max=4).delay(d) < 6


def test_classification():
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

    def client_error(code: str, status: int) -> OSError:
        from s3fs.errors import translate_boto_error

        return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code},
                                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))

    assert pio.is_transient(client_error("SlowDown", 503))
    assert pio.is_transient(client_error("InternalError", 500))
    assert pio.is_transient(client_error("503", 503))  # a HEAD answers without a code
    assert pio.is_transient(ConnectionClosedError(endpoint_url="http://x"))
    assert pio.is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert pio.is_transient(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert pio.is_transient(pio.ShortReadError(errno.EIO, "short"))
    assert not pio.is_transient(client_error("NoSuchKey", 404))
    assert not pio.is_transient(client_error("AccessDenied", 403))
    assert not pio.is_transient(client_error("InvalidRange", 416))
    assert not pio.is_transient(FileNotFoundError("x")) and not pio.is_transient(ValueError("bug"))
    assert not pio.is_transient(client_error("NoSuchUpload", 404))
    assert pio.is_transient(client_error("NoSuchUpload", 404), upload=True)


def test_reset_on_every_read_ends_as_an_oserror(s3_proxy, opts, shard):
    rule = s3_proxy.add("reset", method="GET", path=r"x\.tar$", times=None)
    with pytest.raises(OSError) as ei:
        _read("s3://flt-io/x.tar", opts)
    assert isinstance(ei.value, pio.StorageIOError) and not isinstance(ei.value, FileNotFoundError)
    assert "failed after 3 tries" in str(ei.value)
    assert rule.hits == 3 * pio.S3FS_TRIES  # io tries x s3fs tries, each one GET


def test_missing_input_is_not_retried(s3_proxy, opts, shard):
    with pytest.raises(FileNotFoundError):
        _read("s3://flt-io/missing.tar", opts)
    with pytest.raises(FileNotFoundError):
        pio.input_info("s3://flt-io/missing.tar", opts)
    heads = s3_proxy.requests("HEAD", r"missing\.tar")
    assert 1 <= len(heads) <= 4  # s3fs may probe a "directory" too; never the retry loop's 3 x


def test_reads_resume_at_their_offset(s3_proxy, opts, shard):
    """Cuts on a later block: the reopened stream continues where it was, the bytes are exact."""
    # the first ranged GET passes; the next block's GET is cut on both s3fs tries of two io tries
    rule = s3_proxy.add("reset", method="GET", path=r"x\.tar$", skip=1, times=2 * pio.S3FS_TRIES, keep=0.3)
    got = bytearray()
    with pio.open_input("s3://flt-io/x.tar", opts, block_size=len(shard) // 3) as f:
        while chunk := f.read(5000):
            got += chunk
        assert f.reopens == 2
    assert bytes(got) == shard and rule.hits == 2 * pio.S3FS_TRIES


def test_an_input_replaced_while_read_is_never_mixed(s3_proxy, s3_direct, opts, shard):
    new = corpus.tar_bytes(corpus.good_samples(3, seed=6))

    def replace(method: str, target: str) -> None:
        s3_direct.pipe_file("flt-io/x.tar", new)

    s3_proxy.add("reset", method="GET", path=r"x\.tar$", times=1, on_hit=replace)
    with pytest.raises(OSError) as ei:
        _read("s3://flt-io/x.tar", opts)
    assert not pio.is_transient(ei.value)
    assert _read("s3://flt-io/x.tar", opts) == new  # a new attempt reads the new version whole


def test_upload_retries_and_gives_up_as_oserror(s3_proxy, s3_direct, opts, monkeypatch):
    if not s3_direct.exists("flt-io"):
        s3_direct.mkdir("flt-io")
    st = pio.Storage("s3://flt-io/out", opts)
    rule = s3_proxy.add("reset", method="PUT", path=r"/out/a\.bin$", times=3, after_backend=False)
    st.put_bytes(b"abc", "a.bin")
    assert s3_direct.cat_file("flt-io/out/a.bin") == b"abc" and rule.hits == 3
    monkeypatch.setenv("WINTOK_S3_OPTIONS", '{"config_kwargs": {"retries": {"total_max_attempts": 1}}}')
    st = pio.Storage("s3://flt-io/out", pio.s3_options(s3_proxy.url))
    rule = s3_proxy.add("slowdown", method="PUT", path=r"/out/b\.bin$", times=None)
    with pytest.raises(pio.StorageIOError, match="failed after 3 tries"):
        st.put_bytes(b"abc", "b.bin")
    assert rule.hits == 3 * pio.S3FS_TRIES and not s3_direct.exists("flt-io/out/b.bin")



def test_a_persistent_slowdown_makes_a_bounded_number_of_requests(s3_proxy, s3_direct, opts):
    """With the default layers, a PUT that is throttled for good is sent BOTO_ATTEMPTS x
    S3FS_TRIES x (io retries + 1) times, here 3 x 1 x 3 (WINTOK_IO_RETRIES=2), then raised."""
    if not s3_direct.exists("flt-io"):
        s3_direct.mkdir("flt-io")
    st = pio.Storage("s3://flt-io/out", opts)
    rule = s3_proxy.add("slowdown", method="PUT", path=r"/out/c\.bin$", times=None)
    with pytest.raises(pio.StorageIOError, match="failed after 3 tries"):
        st.put_bytes(b"abc", "c.bin")
    assert rule.hits == pio.BOTO_ATTEMPTS * pio.S3FS_TRIES * opts.retry.tries == 9
    assert not s3_direct.exists("flt-io/out/c.bin")

def test_proxy_stop_does_not_wait_for_handlers(s3_endpoint):
    """A handler in the middle of a 600 s delay neither blocks stop() nor outlives it long; the
    listener is closed. Every wait here is bounded, so a regression fails instead of hanging."""
    import http.client
    import socket
    import threading
    import time

    proxy = S3FaultProxy(s3_endpoint).start()
    rule = proxy.add("delay", delay=600, times=None)
    host = proxy.url.split("//")[1]
    finished = threading.Event()

    def call():
        try:
            conn = http.client.HTTPConnection(host, timeout=60)
            conn.request("GET", "/")
            conn.getresponse().read()
        except OSError:
            pass
        finally:
            finished.set()

    threading.Thread(target=call, daemon=True).start()
    deadline = time.monotonic() + 10
    while rule.hits == 0:
        assert time.monotonic() < deadline, "the request never reached the proxy's delay"
        time.sleep(0.01)
    stopper = threading.Thread(target=proxy.stop, daemon=True)
    t0 = time.monotonic()
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive(), "stop() waits for a handler that is sleeping out its delay"
    assert time.monotonic() - t0 < 5
    assert finished.wait(10), "the delayed handler outlived stop() by more than 10 s"
    assert rule.hits == 1
    with pytest.raises(OSError):
        socket.create_connection(tuple(host.rsplit(":", 1)), timeout=2).close()
