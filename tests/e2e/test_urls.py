"""Input URLs end to end: reruns over inputs with no common root, and no secret anywhere."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid

import pytest

from pipeline.config import JobConfig
from pipeline.driver import run_job
from pipeline.io import Storage
from pipeline.plan import committed_stems
from pipeline.status import load_manifests
from pipeline.verify import verify
from tests import corpus
from tests.e2e.helpers import file_states, record

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("relative", [True, False], ids=["relative-glob-and-path", "absolute"])
def test_rerun_over_inputs_without_common_root_commits_nothing_new(tmp_path, monkeypatch, s3fs_client, s3_endpoint,
                                                                   ray_session, tiny_model_dir, relative):
    """Local inputs (a relative glob, which comes back absolute, and a relative path; or both
    absolute) next to an s3:// input: no common root."""
    (tmp_path / "in").mkdir()
    (tmp_path / "other").mkdir()
    for i, d in ((0, "in"), (1, "in"), (3, "other")):
        (tmp_path / d / f"0000{i}.tar").write_bytes(corpus.tar_bytes(corpus.good_samples(3, seed=i, prefix=f"s{i}_")))
    (tmp_path / "in" / "00002.tar").write_bytes(corpus.not_a_tar_bytes())
    bucket = f"wintok-roots-{int(relative)}"
    s3fs_client.mkdir(bucket)
    s3fs_client.pipe_file(f"{bucket}/ds/00004.tar", corpus.tar_bytes(corpus.good_samples(3, seed=4, prefix="s4_")))
    monkeypatch.chdir(tmp_path)
    base = "" if relative else f"{tmp_path}/"
    inputs = (f"{base}in/*.tar", f"{base}other/00003.tar", f"s3://{bucket}/ds/00004.tar")
    cfg = JobConfig(inputs=inputs, output=str(tmp_path / "out"),
                    model=tiny_model_dir, s3_endpoint_url=s3_endpoint, batch_size=4, decode_threads=1, workers=1,
                    max_retries=0, retry_backoff=0.05, progress=False)
    first = run_job(cfg)
    assert first.done == 4 and first.failed == 1
    storage = Storage(str(tmp_path / "out"))
    local = "file" + str(tmp_path).replace(os.sep, "/")
    stems = {f"{local}/in/00000", f"{local}/in/00001", f"{local}/other/00003", f"s3/{bucket}/ds/00004"}
    assert committed_stems(storage) == {m.stem for m in load_manifests(storage)[0]} == stems
    committed = file_states(str(tmp_path / "out" / "_manifest")) | file_states(str(tmp_path / "out" / "shards"))

    again = run_job(cfg)  # only the failed shard is tried again
    assert (again.done, again.skipped, again.failed) == (0, 4, 1)
    assert file_states(str(tmp_path / "out" / "_manifest")) | file_states(str(tmp_path / "out" / "shards")) == committed
    report = verify(str(tmp_path / "out"))
    assert report.clean(strict=True) and report.shards_checked == 4 and not report.uncommitted

    failed = f"{local}/in/00002"
    assert (tmp_path / "out" / "_failed" / f"{failed}.json").exists()
    (tmp_path / "in" / "00002.tar").write_bytes(corpus.tar_bytes(corpus.good_samples(2, seed=2, prefix="s2_")))
    fixed = run_job(cfg.replace(retry_failed=True))
    assert (fixed.done, fixed.skipped, fixed.failed) == (1, 4, 0) and fixed.ok
    assert not (tmp_path / "out" / "_failed" / f"{failed}.json").exists()
    assert verify(str(tmp_path / "out")).clean(strict=True)
    record("rerun over inputs with no common folder", "inputs under different roots (local next to s3://), rerun, "
           "then --retry-failed", "the rerun committed nothing new (0 done, 4 skipped, files untouched); "
           "--retry-failed took up exactly the failed one", "1", 0, 0, "-")


class _TokenHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder only to requests that carry the right token (the real URL must be used)."""

    token = ""

    def _allowed(self) -> bool:
        if f"token={self.token}" in self.path:
            return True
        self.send_error(403)
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self._allowed():
            super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if self._allowed():
            super().do_HEAD()

    def log_message(self, *args) -> None:  # the test server's own log is not the pipeline's output
        pass


def _serve(folder: str, token: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = type("H", (_TokenHandler,), {"token": token})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: handler(*a, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _files_with(root: str, secrets: dict[str, str]) -> list[str]:
    hits = []
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                data = open(p, "rb").read()
            except OSError:
                continue
            hits += [f"{name} in {p}" for name, s in secrets.items() if s.encode() in data]
    return hits


def test_no_secret_from_any_source_is_shown_or_stored(tmp_path, s3fs_client, s3_endpoint, tiny_model_dir):
    tag = uuid.uuid4().hex[:8]
    secrets = {name: f"zq{name}{tag}" for name in (
        "envkeyid", "envsecret", "envtoken", "optkeyid", "optsecret", "flagkeyid", "flagsecret",
        "urlkeyid", "urlsecret", "outkeyid", "outsecret", "querytoken", "querysig")}
    s = secrets
    bucket = f"wintok-secrets-{tag}"
    s3fs_client.mkdir(bucket)
    s3fs_client.pipe_file(f"{bucket}/ds/00001.tar", corpus.tar_bytes(corpus.good_samples(3, seed=1, prefix="b_")))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(corpus.tar_bytes(corpus.good_samples(3, seed=0, prefix="a_")))
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "00002.tar").write_bytes(corpus.tar_bytes(corpus.good_samples(3, seed=2, prefix="c_")))
    server, port = _serve(str(tmp_path / "web"), s["querytoken"])
    web = f"http://127.0.0.1:{port}"
    inputs = [str(tmp_path / "in" / "00000.tar"),
              f"s3://{s['urlkeyid']}:{s['urlsecret']}@{bucket}/ds/00001.tar",
              f"{web}/00002.tar?token={s['querytoken']}&X-Amz-Signature={s['querysig']}",
              f"{web}/missing.tar?token={s['querytoken']}"]  # fails: its error quotes the URL
    output = f"s3://{s['outkeyid']}:{s['outsecret']}@{bucket}/out"
    ray_tmp = tempfile.mkdtemp(prefix="wtr", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1",
           "AWS_ACCESS_KEY_ID": s["envkeyid"], "AWS_SECRET_ACCESS_KEY": s["envsecret"],
           "AWS_SESSION_TOKEN": s["envtoken"], "AWS_DEFAULT_REGION": "us-east-1",
           "WINTOK_S3_OPTIONS": json.dumps({"key": s["optkeyid"], "secret": s["optsecret"]})}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline.cli", "tokenize", *inputs, output, "--model", tiny_model_dir,
           "--s3-endpoint-url", s3_endpoint, "--s3-key", s["flagkeyid"], "--s3-secret", s["flagsecret"],
           "--workers", "1", "--decode-threads", "1", "--batch-size", "4", "--max-retries", "0", "--no-progress",
           "--json"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        leaks = [f"{n} in stdout" for n, v in s.items() if v in proc.stdout]
        leaks += [f"{n} in stderr" for n, v in s.items() if v in proc.stderr]
        objects = {p: s3fs_client.cat_file(p) for p in s3fs_client.find(bucket)}
        leaks += [f"{n} in s3://{p}" for p, data in objects.items() for n, v in s.items() if v.encode() in data]
        leaks += _files_with(ray_tmp, s)
        assert os.listdir(os.path.join(ray_tmp, "ray", "session_latest", "logs"))  # Ray's logs were searched
        assert not leaks, leaks
        assert proc.returncode == 1, proc.stderr[-3000:]  # the missing input failed, the rest committed
        summary = json.loads(proc.stdout)
        assert summary["shards_done"] == 3 and summary["shards_failed"] == 1 and summary["images"] == 9
        # what is stored names the inputs without their secrets
        failed = [json.loads(d) for p, d in objects.items() if "/_failed/" in p]
        assert [f["input_url"] for f in failed] == [f"{web}/missing.tar?token=***"]
        assert f"{bucket}/out/_manifest/http/127.0.0.1:{port}/00002.json" in objects
        run = json.loads(objects[f"{bucket}/out/_run.json"])
        assert run["job"]["inputs"][1:3] == [f"s3://***@{bucket}/ds/00001.tar",
                                            f"{web}/00002.tar?token=***&X-Amz-Signature=***"]
        assert run["job"]["output"] == f"s3://***@{bucket}/out"
        record("secrets in every place", "credentials in AWS_*, WINTOK_S3_OPTIONS, --s3-key/--s3-secret, URL "
               "userinfo (input and OUTPUT), http query tokens", "none in stdout, stderr, OUTPUT's objects or "
               "Ray's session logs; inputs read with them", "1", 0, 0, "-")
    finally:
        server.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
