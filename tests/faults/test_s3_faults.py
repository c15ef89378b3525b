"""S3 faults through a fault-injecting proxy (tests/faults/s3proxy.py) in front of moto.

Each test runs the real pipeline (local Ray, tiny model, s3fs) with `s3_endpoint_url` = the
proxy, injects one kind of fault, and then checks the whole OUTPUT straight on moto: every
input sample of a committed shard is exactly once a row or an error record, no key twice,
every visible data file is the one its manifest describes (size + sha256), no multipart
upload left open, no stray object; a failed shard has its reason in the summary and in
`_failed/<stem>.json` and nothing of it is committed.

Who recovers what (found with these tests, asserted through the manifest's `attempts`):
503 SlowDown and 500 on a request are retried by botocore itself (3 attempts, io.BOTO_ATTEMPTS);
a body cut by a reset, a short read (Content-Length not met) or a body that is short but
self-consistent by pipeline.io (s3fs makes 1 try; the stream is reopened at its offset on
the same ETag: EOF before the object's size is never an end); what outlives all of that
fails the attempt as `io` and the driver retries the shard.

Run with WINTOK_FAULTS_REPORT=path.md to get the table of faults and outcomes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.driver import Summary, run_job
from schemas import FailureRecord, Manifest
from tests import corpus
from tests.faults.s3proxy import Rule, S3FaultProxy

pytestmark = pytest.mark.e2e

# lower layers cut down, for the tests that need a fault to outlive them quickly:
# s3fs does not retry (1 try), botocore makes 2 attempts, pipeline.io 1 retry (reopen).
FEW_RETRIES = {"WINTOK_S3_OPTIONS": json.dumps({"retries": 1, "config_kwargs": {"retries": {"total_max_attempts": 2}}}),
               "WINTOK_IO_RETRIES": "1"}

REPORT: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("WINTOK_FAULTS_REPORT")
    if path and REPORT:
        with open(path, "w") as f:
            f.write(render_report(REPORT) + "\n")


def render_report(rows: list[dict]) -> str:
    head = ("| scenario | fault injected | hits | outcome | attempts | samples lost | duplicates | "
            "recovery s |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['fault']} | {r['hits']} | {r['outcome']} | {r['attempts']} | "
                     f"{r['lost']} | {r['duplicates']} | {r['recovery']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers
def _setup(s3, bucket: str, tmp_path, n_shards: int = 4, per_shard: int = 4, seed: int = 61,
           broken: bool = False) -> list[list[dict]]:
    s3.mkdir(bucket)
    for p in corpus.make_shards(tmp_path / "src", n_shards, per_shard, seed, broken=broken):
        s3.put_file(p, f"{bucket}/ds/{os.path.basename(p)}")
    return corpus.shard_plan(n_shards, per_shard, seed, broken=broken)


def _run(bucket: str, n_shards: int, proxy: S3FaultProxy, model: str, **kw) -> Summary:
    cfg = dict(inputs=(f"s3://{bucket}/ds/{{00000..{n_shards - 1:05d}}}.tar",), output=f"s3://{bucket}/out",
               model=model, s3_endpoint_url=proxy.url, batch_size=4, decode_threads=2, workers=2,
               progress=False, max_retries=2, retry_backoff=0.05)
    cfg.update(kw)
    return run_job(JobConfig(**cfg))


def verify_output(s3, bucket: str, plan: list[list[dict]], summary: Summary,
                  failed: set[str] = frozenset()) -> dict:
    """The exactly-once check on moto directly; returns counts for the report."""
    out = f"{bucket}/out"
    stems = [f"{i:05d}" for i in range(len(plan))]
    manifests: dict[str, Manifest] = {}
    lost = duplicates = 0
    allowed = {f"{out}/_run.json", f"{out}/_lease.json"}
    for stem, samples in zip(stems, plan, strict=True):
        want = [s["key"] for s in samples]
        if stem in failed:
            assert not s3.exists(f"{out}/_manifest/{stem}.json"), f"{stem} must not be committed"
            assert not s3.exists(f"{out}/shards/{stem}.parquet"), f"{stem}: a data file of a failed shard"
            assert not s3.exists(f"{out}/errors/{stem}.parquet")
            rec = FailureRecord.from_json(s3.cat_file(f"{out}/_failed/{stem}.json").decode())
            assert rec.stem == stem and rec.reason and rec.attempts >= 1
            assert summary.failures[stem].startswith(rec.reason)
            allowed.add(f"{out}/_failed/{stem}.json")
            continue
        assert not s3.exists(f"{out}/_failed/{stem}.json"), f"{stem} committed but still listed as failed"
        m = Manifest.from_json(s3.cat_file(f"{out}/_manifest/{stem}.json").decode())
        manifests[stem] = m
        allowed.add(f"{out}/_manifest/{stem}.json")
        keys: list[str] = []
        indices: list[int] = []
        for rec in (m.shards_file, m.errors_file):
            if rec is None:
                continue
            data = s3.cat_file(f"{out}/{rec.path}")
            assert len(data) == rec.bytes and hashlib.sha256(data).hexdigest() == rec.sha256, \
                f"{rec.path} is not the file its manifest describes"
            table = pq.read_table(io.BytesIO(data))
            assert table.num_rows == rec.rows
            keys += table.column("key").to_pylist()
            indices += table.column("sample_index").to_pylist()
            allowed.add(f"{out}/{rec.path}")
        if m.errors_file is None:
            assert not s3.exists(f"{out}/errors/{stem}.parquet")
        duplicates += len(keys) - len(set(keys))
        lost += len(set(want) - set(keys))
        assert sorted(keys) == sorted(want), f"{stem}: rows + errors are not the input samples exactly once"
        assert sorted(indices) == list(range(len(want)))
        assert m.samples == len(want) and m.rows + m.errors == len(want)
        assert m.input_size == s3.info(f"{bucket}/ds/{stem}.tar")["size"]
    stray = sorted(set(s3.find(out)) - allowed)
    assert not stray, f"objects outside the commit protocol: {stray}"
    uploads = s3.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert not uploads, f"multipart uploads left open: {[u['Key'] for u in uploads]}"
    assert summary.done + summary.skipped == len(stems) - len(failed) and summary.failed == len(failed)
    assert set(summary.failures) == set(failed)
    if not summary.skipped:
        assert summary.images == sum(m.rows for m in manifests.values())
        assert summary.errors == sum(m.errors for m in manifests.values())
    assert lost == 0 and duplicates == 0
    return {"manifests": manifests, "lost": lost, "duplicates": duplicates}


def recovery_seconds(proxy: S3FaultProxy, rule: Rule) -> str:
    """From the first faulted request to the first clean answer (< 500) of the same method + path after it."""
    if rule.action == "delay":
        return f"+{rule.delay:g} per hit (no failure)"
    ex = [e for e in proxy.requests(rule.method) if rule.matches(e.method, e.target.split("?")[0], _q(e.target))]
    faulted = [e for e in ex if e.fault]
    if not faulted:
        return "-"
    t0 = faulted[0].at
    ok = [e for e in ex if e.at > t0 and not e.fault and e.status and e.status < 500]
    return f"{ok[0].at - t0:.2f}" if ok else f"gave up after {faulted[-1].at - t0:.2f}"


def _q(target: str) -> dict:
    from urllib.parse import parse_qs, urlsplit

    return parse_qs(urlsplit(target).query, keep_blank_values=True)


def record(scenario: str, fault: str, rules: list[Rule], outcome: str, attempts: str, checked: dict,
           proxy: S3FaultProxy) -> None:
    REPORT.append({"scenario": scenario, "fault": fault, "hits": sum(r.hits for r in rules), "outcome": outcome,
                   "attempts": attempts, "lost": checked["lost"], "duplicates": checked["duplicates"],
                   "recovery": ", ".join(recovery_seconds(proxy, r) for r in rules)})


def _shard_get(stem: str) -> str:
    return rf"/ds/{stem}\.tar$"


# --------------------------------------------------------------------------- the proxy itself
def test_proxy_forwards_signed_requests_unchanged(s3_proxy, s3_direct):
    """Host and Authorization reach moto as signed; bodies, ranges and listings pass through."""
    import s3fs

    via = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_proxy.url}, use_listings_cache=False,
                            skip_instance_cache=True)
    via.mkdir("flt-proxy")
    data = os.urandom(70_000)
    via.pipe_file("flt-proxy/a/b.bin", data)
    assert s3_direct.cat_file("flt-proxy/a/b.bin") == data
    assert via.cat_file("flt-proxy/a/b.bin", start=10, end=5000) == data[10:5000]
    assert via.find("flt-proxy") == ["flt-proxy/a/b.bin"]
    rule = s3_proxy.add("slowdown", method="GET", path=r"b\.bin$", times=1)
    assert via.cat_file("flt-proxy/a/b.bin") == data  # botocore retried the 503
    assert rule.hits == 1 and [e.status for e in s3_proxy.requests("GET", r"b\.bin")][-2:] == [None, 200]


def test_proxy_forwards_host_and_authorization_headers():
    """The exact headers a signer covers reach the backend (a recording backend stands in for moto)."""
    import http.client
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    seen: list[dict] = []

    class Rec(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_PUT(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({**{k.lower(): v for k, v in self.headers.items()}, "body": body, "path": self.path})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Rec)
    Thread(target=backend.serve_forever, daemon=True).start()
    try:
        with S3FaultProxy(f"http://127.0.0.1:{backend.server_address[1]}") as proxy:
            host = proxy.url.split("//")[1]
            c = http.client.HTTPConnection(host)
            c.request("PUT", "/bkt/k%20ey?partNumber=2&uploadId=x", body=b"abc",
                      headers={"Authorization": "AWS4-HMAC-SHA256 Credential=x/y, Signature=z",
                               "x-amz-date": "20260101T000000Z", "x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
            assert c.getresponse().status == 200
            c.close()
    finally:
        backend.shutdown()
        backend.server_close()
    (h,) = seen
    assert h["host"] == host and h["authorization"].endswith("Signature=z")
    assert h["x-amz-date"] == "20260101T000000Z" and h["body"] == b"abc"
    assert h["path"] == "/bkt/k%20ey?partNumber=2&uploadId=x"


# --------------------------------------------------------------------------- transient input faults
def test_slowdown_on_shard_reads_is_retried(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path):
    plan = _setup(s3_direct, "flt-slowdown", tmp_path, broken=True)
    rule = s3_proxy.add("slowdown", method="GET", path=_shard_get("00001"), times=2)
    summary = _run("flt-slowdown", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-slowdown", plan, summary)
    assert summary.ok and rule.hits == 2
    assert checked["manifests"]["00001"].attempts == 1  # botocore retried the 503s within the request
    record("503 SlowDown on a shard GET", "503 SlowDown x2", [rule], "ok (botocore retry)", "1", checked, s3_proxy)


def test_internal_error_on_shard_reads_is_retried(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path):
    plan = _setup(s3_direct, "flt-error500", tmp_path)
    rules = [s3_proxy.add("error500", method="GET", path=_shard_get("00000"), times=2),
             s3_proxy.add("error500", method="HEAD", path=_shard_get("00002"), times=1)]
    summary = _run("flt-error500", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-error500", plan, summary)
    assert summary.ok and [r.hits for r in rules] == [2, 1]
    assert checked["manifests"]["00000"].attempts == 1 and checked["manifests"]["00002"].attempts == 1
    record("500 InternalError on a shard GET and HEAD", "500 x2 GET, x1 HEAD", rules, "ok (botocore retry)", "1",
           checked, s3_proxy)


def test_connection_reset_mid_body_is_retried(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path):
    plan = _setup(s3_direct, "flt-reset", tmp_path, broken=True)
    rule = s3_proxy.add("reset", method="GET", path=_shard_get("00002"), times=1, keep=0.4)
    summary = _run("flt-reset", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-reset", plan, summary)
    assert summary.ok and rule.hits == 1
    # pipeline.io reopened the stream at its offset (s3fs makes 1 try): same attempt, one more GET
    assert checked["manifests"]["00002"].attempts == 1
    assert len(s3_proxy.requests("GET", _shard_get("00002"))) == 2
    record("connection reset mid-body (RST)", "reset after 40% of the body x1", [rule], "ok (io reopen at offset)",
           "1", checked, s3_proxy)


def test_slow_responses(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path):
    plan = _setup(s3_direct, "flt-slow", tmp_path)
    rules = [s3_proxy.add("delay", method="GET", path=_shard_get("00001"), times=None, delay=1.5),
             s3_proxy.add("delay", method="PUT", path=r"/out/shards/00003\.parquet$", times=1, delay=1.5)]
    summary = _run("flt-slow", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-slow", plan, summary)
    assert summary.ok and rules[0].hits >= 1 and rules[1].hits == 1
    assert all(m.attempts == 1 for m in checked["manifests"].values())
    record("slow responses", "1.5 s delay on a shard's GETs and on a data PUT", rules, "ok (no retry needed)",
           "1", checked, s3_proxy)


def test_truncated_body_is_never_complete(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path):
    """Content-Length kept, body cut, connection closed: detected and the range read again."""
    plan = _setup(s3_direct, "flt-trunc", tmp_path, broken=True)
    rule = s3_proxy.add("truncate", method="GET", path=_shard_get("00003"), times=1, keep=0.7)
    summary = _run("flt-trunc", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-trunc", plan, summary)
    assert summary.ok and rule.hits == 1 and checked["manifests"]["00003"].attempts == 1
    record("short body (Content-Length not met)", "truncate at 70% x1", [rule], "ok (io reopen at offset)", "1", checked,
           s3_proxy)


def test_short_but_consistent_body_is_not_an_end(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path):
    """Empty 206 answers (Content-Length: 0) to a shard's ranged GET are refetched, whoever notices.

    With the object's checksum header botocore flags the body (FlexibleChecksumError, which
    s3fs does not retry: pipeline.io does); without it (S3 sends no checksum on ranged GETs)
    s3fs returns b'' and only pipeline.io's size check refuses it as an end of the stream.
    """
    plan = _setup(s3_direct, "flt-short", tmp_path)
    rules = [s3_proxy.add("short", method="GET", path=_shard_get("00001"), times=2, keep=0.0),
             s3_proxy.add("short", method="GET", path=_shard_get("00002"), times=2, keep=0.0,
                          strip_checksums=True)]
    summary = _run("flt-short", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-short", plan, summary)
    assert summary.ok and [r.hits for r in rules] == [2, 2]
    assert checked["manifests"]["00001"].attempts == 1 and checked["manifests"]["00002"].attempts == 1
    record("short body, self-consistent headers", "empty 206 x2 with checksum; x2 without", rules,
           "ok (io reopen at offset)", "1", checked, s3_proxy)


def test_truncation_outliving_the_read_retries_fails_the_attempt(s3_direct, s3_proxy, ray_session, tiny_model_dir,
                                                                 tmp_path, monkeypatch):
    """Every GET of the first attempt is cut: the attempt fails as `io`, nothing of it is kept; the retry commits."""
    for k, v in FEW_RETRIES.items():
        monkeypatch.setenv(k, v)
    plan = _setup(s3_direct, "flt-trunc-attempt", tmp_path, broken=True)
    # 2 GETs per attempt: s3fs makes 1 try per request, pipeline.io reopens once
    rule = s3_proxy.add("truncate", method="GET", path=_shard_get("00002"), times=2, keep=0.9)
    summary = _run("flt-trunc-attempt", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-trunc-attempt", plan, summary)
    assert summary.ok and rule.hits == 2
    assert checked["manifests"]["00002"].attempts == 2
    record("short body on every GET of an attempt", "truncate at 90% x2 (few retries)", [rule],
           "attempt 1 failed (io), attempt 2 committed", "2", checked, s3_proxy)


# --------------------------------------------------------------------------- output faults
def test_multipart_complete_failures_are_retried(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path,
                                                 small_parts):
    plan = _setup(s3_direct, "flt-mpu", tmp_path, per_shard=8)
    complete = r"/out/shards/{}\.parquet$"
    rules = [
        # rejected twice: botocore retries the POST ?uploadId
        s3_proxy.add("error500", method="POST", path=complete.format("00000"), query="uploadId", times=2),
        # performed by moto, but the answer is lost: the retried complete must still succeed
        s3_proxy.add("error500", method="POST", path=complete.format("00001"), query="uploadId", times=1,
                     after_backend=True),
        # a part upload reset before it reaches the server
        s3_proxy.add("reset", method="PUT", path=complete.format("00002"), query="partNumber", times=1,
                     after_backend=False),
    ]
    summary = _run("flt-mpu", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-mpu", plan, summary)
    assert summary.ok and [r.hits for r in rules] == [2, 1, 1]
    assert all(m.shards_file.bytes >= 2 * small_parts for m in checked["manifests"].values()), "not multipart"
    assert s3_proxy.requests("POST", r"/out/shards/00003\.parquet\?uploads"), "data files went up as multipart"
    assert all(m.attempts == 1 for m in checked["manifests"].values())
    record("multipart upload of a data file", "500 on complete x2; lost complete response x1; reset part x1",
           rules, "ok (botocore retry)", "1", checked, s3_proxy)


def test_failed_multipart_complete_leaves_nothing_and_the_retry_commits(s3_direct, s3_proxy, ray_session,
                                                                        tiny_model_dir, tmp_path, small_parts,
                                                                        monkeypatch):
    for k, v in FEW_RETRIES.items():
        monkeypatch.setenv(k, v)
    plan = _setup(s3_direct, "flt-mpu-fail", tmp_path, per_shard=8)
    # one attempt = 2 uploads (pipeline.io redoes it once) x 2 botocore attempts of the complete
    rule = s3_proxy.add("slowdown", method="POST", path=r"/out/shards/00001\.parquet$", query="uploadId", times=4)
    summary = _run("flt-mpu-fail", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-mpu-fail", plan, summary)
    assert summary.ok and rule.hits == 4
    assert checked["manifests"]["00001"].attempts == 2
    aborts = s3_proxy.requests("DELETE", r"/out/shards/00001\.parquet\?uploadId=")
    assert len(aborts) == 2, "each failed upload must be aborted"
    record("multipart complete failing for a whole attempt", "503 on complete x4 (few retries)", [rule],
           "attempt 1 failed (io), uploads aborted, attempt 2 committed", "2", checked, s3_proxy)


def test_failed_manifest_put_leaves_shard_uncommitted_until_retry(s3_direct, s3_proxy, ray_session,
                                                                  tiny_model_dir, tmp_path, monkeypatch):
    for k, v in FEW_RETRIES.items():
        monkeypatch.setenv(k, v)
    plan = _setup(s3_direct, "flt-manifest", tmp_path)
    seen: list[tuple[bool, bool]] = []

    def at_hit(method: str, target: str) -> None:  # runs in the proxy as each failing PUT arrives
        seen.append((s3_direct.exists("flt-manifest/out/_manifest/00003.json"),
                     s3_direct.exists("flt-manifest/out/shards/00003.parquet")))

    rule = s3_proxy.add("error500", method="PUT", path=r"/out/_manifest/00003\.json$", times=4, on_hit=at_hit)
    summary = _run("flt-manifest", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-manifest", plan, summary)
    # while its manifest could not be written the shard was not committed (its data file was
    # already up, complete: harmless, the retry overwrites it)
    assert summary.ok and rule.hits == 4 and seen == [(False, True)] * 4
    assert checked["manifests"]["00003"].attempts == 2
    record("manifest PUT failing for a whole attempt", "500 on the manifest PUT x4 (few retries)", [rule],
           "attempt 1 failed (io), not committed, attempt 2 committed", "2", checked, s3_proxy)


def test_data_put_reset_is_retried(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path):
    plan = _setup(s3_direct, "flt-put-reset", tmp_path, broken=True)
    rules = [s3_proxy.add("reset", method="PUT", path=r"/out/shards/00000\.parquet$", times=2, after_backend=False),
             s3_proxy.add("slowdown", method="PUT", path=r"/out/errors/00001\.parquet$", times=2)]
    summary = _run("flt-put-reset", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-put-reset", plan, summary)
    assert summary.ok and [r.hits for r in rules] == [2, 2]
    assert all(m.attempts == 1 for m in checked["manifests"].values())
    record("data/errors file PUT", "reset before upload x2; 503 x2", rules, "ok (botocore retry)", "1", checked,
           s3_proxy)


def test_driver_side_requests_are_retried(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path):
    """Listing _manifest/, writing _run.json and the _failed/ cleanup go through the same retries."""
    plan = _setup(s3_direct, "flt-driver", tmp_path)
    rules = [s3_proxy.add("slowdown", method="GET", path=r"^/flt-driver/?$", query="list-type", times=2),
             s3_proxy.add("error500", method="PUT", path=r"/out/_run\.json$", times=1),
             s3_proxy.add("reset", method="HEAD", path=r"/out/_run\.json$", times=1, after_backend=False)]
    summary = _run("flt-driver", 4, s3_proxy, tiny_model_dir)
    checked = verify_output(s3_direct, "flt-driver", plan, summary)
    assert summary.ok and [r.hits for r in rules] == [2, 1, 1]
    record("driver-side requests", "503 x2 on LIST; 500 x1 on PUT _run.json; reset x1 on its HEAD", rules,
           "ok (botocore retry)", "1", checked, s3_proxy)


def test_lost_response_to_the_lease_create(s3_direct, s3_proxy, ray_session, tiny_model_dir, tmp_path):
    plan = _setup(s3_direct, "flt-lease", tmp_path, n_shards=2)
    """The lease PUT reaches S3 but its answer is lost (500): the retry must see its own lease."""
    rule = s3_proxy.add("error500", method="PUT", path=r"/out/_lease\.json$", times=1, after_backend=True)
    summary = _run("flt-lease", 2, s3_proxy, tiny_model_dir)
    assert rule.hits == 1, "the injected fault never fired: the test proves nothing"
    assert len(s3_proxy.requests("PUT", r"/out/_lease\.json$")) >= 2  # the create was tried again
    assert summary.ok and summary.done == 2
    verify_output(s3_direct, "flt-lease", plan, summary)


# --------------------------------------------------------------------------- persistent faults
def test_persistent_slowdown_fails_one_shard_the_rest_finish(s3_direct, s3_proxy, ray_session, tiny_model_dir,
                                                             tmp_path, monkeypatch):
    for k, v in FEW_RETRIES.items():
        monkeypatch.setenv(k, v)
    plan = _setup(s3_direct, "flt-persist", tmp_path, broken=True)
    rules = [s3_proxy.add("slowdown", method="GET", path=_shard_get("00001"), times=None),
             s3_proxy.add("truncate", method="GET", path=_shard_get("00002"), times=None, keep=0.5)]
    summary = _run("flt-persist", 4, s3_proxy, tiny_model_dir, max_retries=1)
    checked = verify_output(s3_direct, "flt-persist", plan, summary, failed={"00001", "00002"})
    assert not summary.ok and summary.done == 2 and summary.failed == 2
    assert summary.failures["00001"].startswith("io") and "reduce your request rate" in summary.failures["00001"]
    assert summary.failures["00002"].startswith("io") and "payload" in summary.failures["00002"].lower()
    for stem in ("00001", "00002"):
        rec = FailureRecord.from_json(s3_direct.cat_file(f"flt-persist/out/_failed/{stem}.json").decode())
        assert rec.reason == "io" and rec.attempts == 2 and len(rec.history) == 2
    # 2 shard attempts x 2 io tries x (2 botocore attempts for the 503 | 1 GET for the cut body)
    assert rules[0].hits == 8 and rules[1].hits == 4
    record("persistent 503 / persistent cut body on one shard each", "503 always; truncate always (few retries)",
           rules, "those 2 failed (io) with reason in _failed/, other 2 committed", "2 each", checked, s3_proxy)
    # the failure is not permanent: with the fault gone a plain rerun commits them
    s3_proxy.clear()
    again = _run("flt-persist", 4, s3_proxy, tiny_model_dir)
    verify_output(s3_direct, "flt-persist", plan, again)
    assert again.ok and again.done == 2 and again.skipped == 2
