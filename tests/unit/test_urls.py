"""Input URLs: output names (stems) and what is shown or stored of a URL (no credentials)."""

from __future__ import annotations

import os
import random

import pytest

from pipeline.config import JobConfig
from pipeline.io import Storage, expand_inputs, get_fs
from pipeline.layout import failed_rel, manifest_rel
from pipeline.plan import committed_stems, failed_stems
from pipeline.urls import normalize_stem, redact_text, redact_url, shard_stems
from pipeline.worker import worker_env

SECRETS = ("K3YID", "S3CR3T", "T0KEN", "S1GNATURE", "PASSW0RD", "FRAGM3NT")


def _random_url(rng: random.Random) -> str:
    name = f"{rng.choice(['part', 'shard', 'x'])}-{rng.randrange(10**6):06d}{rng.choice(['.tar', '.tgz', '.tar.gz'])}"
    folders = "/".join(rng.choice(["a", "b", "ds", "sub", "2024"]) for _ in range(rng.randrange(0, 3)))
    path = f"{folders}/{name}" if folders else name
    kind = rng.randrange(6)
    if kind == 0:
        return f"/{rng.choice(['data', 'mnt', 'tmp'])}/{path}"
    if kind == 1:
        return f"s3://{rng.choice(['bkt', 'other'])}/{path}"
    if kind == 2:
        return f"s3://K3YID:S3CR3T@{rng.choice(['bkt', 'other'])}/{path}"
    if kind == 3:
        return f"https://host.example/{path}?token=T0KEN&X-Amz-Signature=S1GNATURE"
    if kind == 4:
        return f"http://user:PASSW0RD@127.0.0.1:8000/{path}#FRAGM3NT"
    return f"file:///srv/{path}"


def _check_stem(stem: str) -> None:
    assert stem and not stem.startswith("/") and "\\" not in stem and "://" not in stem, stem
    assert all(seg not in ("", ".", "..") for seg in stem.split("/")), stem
    assert "?" not in stem and "#" not in stem and not any(s in stem for s in SECRETS), stem
    assert normalize_stem(stem) == stem


def test_stems_are_a_pure_function_of_the_url_set():
    rng = random.Random(1234)
    for _ in range(300):
        urls = list({_random_url(rng) for _ in range(rng.randrange(1, 9))})
        stems = dict(zip(urls, shard_stems(urls), strict=True))
        for stem in stems.values():
            _check_stem(stem)
        for _ in range(5):  # the same set in another order: the same names
            shuffled = urls[:]
            rng.shuffle(shuffled)
            assert dict(zip(shuffled, shard_stems(shuffled), strict=True)) == stems
        schemes = {u.split("://")[0] if "://" in u else "file" for u in urls}
        if len(schemes) > 1:  # no common root: the scheme leads, so names stay apart
            assert all(stems[u].split("/")[0] == (u.split("://")[0] if "://" in u else "file") for u in urls)


def test_stems_of_inputs_without_a_common_folder():
    assert shard_stems(["/a/x.tar", "/b/y.tar"]) == ["a/x", "b/y"]
    assert shard_stems(["/data/ds/x.tar", "s3://bkt/ds/y.tar"]) == ["file/data/ds/x", "s3/bkt/ds/y"]
    assert shard_stems(["s3://k:s@bkt/a/x.tar", "s3://bkt/b/y.tar"]) == ["a/x", "b/y"]
    assert shard_stems(["https://h/a/x.tar?token=t", "https://h/a/y.tgz?token=u"]) == ["x", "y"]
    assert shard_stems(["s3://b/d/../x.tar", "s3://b/c\\d.tar"]) == ["d/%2E%2E/x", "c%5Cd"]
    assert shard_stems(["/one/x.tar"]) == ["x"]


def test_relative_glob_next_to_relative_path_names_consistently(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "other").mkdir()
    for p in ("in/00000.tar", "in/00001.tar", "other/00002.tar"):
        (tmp_path / p).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    urls = expand_inputs(["in/*.tar", "other/00002.tar"])
    assert urls == [f"{tmp_path}/in/00000.tar", f"{tmp_path}/in/00001.tar", f"{tmp_path}/other/00002.tar"]
    stems = shard_stems(urls)
    assert stems == ["in/00000", "in/00001", "other/00002"]
    # written and listed back through the same names
    st = Storage(str(tmp_path / "out"))
    for s in stems:
        st.put_bytes(b"{}", manifest_rel(s))
        st.put_bytes(b"{}", failed_rel(s))
    assert committed_stems(st) == failed_stems(st) == set(stems)


def test_redact_url_hides_userinfo_query_and_fragment():
    cases = {
        "s3://K3YID:S3CR3T@bkt/ds/x.tar": "s3://***@bkt/ds/x.tar",
        "https://host/a.tar?token=T0KEN": "https://host/a.tar?token=***",
        "https://u:PASSW0RD@host:443/a.tar?X-Amz-Signature=S1GNATURE&b=T0KEN#FRAGM3NT":
            "https://***@host:443/a.tar?X-Amz-Signature=***&b=***#***",
        "https://host?T0KEN": "https://host?***",
        "/local/a?b.tar": "/local/a?b.tar",  # a local name: `?` is a character, nothing to hide
        "s3://bkt/ds/x.tar": "s3://bkt/ds/x.tar",
    }
    for url, shown in cases.items():
        assert redact_url(url) == shown
        assert redact_url(shown) == shown
    msg = ("ClientResponseError: 404, message='Not Found', url='https://host/a.tar?token=T0KEN' "
           "(reading s3://K3YID:S3CR3T@bkt/x.tar)")
    out = redact_text(msg)
    assert not any(s in out for s in SECRETS) and "url='https://host/a.tar?token=***'" in out


def test_http_urls_are_never_globbed():
    # a closed port: listing would fail; the URL is taken literally (`*?[` are characters there)
    url = "http://127.0.0.1:9/shard-*[0].tar?token=T0KEN"
    assert expand_inputs([url]) == [url]


def test_s3_userinfo_becomes_credentials_not_a_bucket_name():
    fs, path = get_fs("s3://K3YID:S3CR3T@bkt/ds/x.tar")
    assert path == "bkt/ds/x.tar" and fs.key == "K3YID" and fs.secret == "S3CR3T"
    st = Storage("s3://K3YID:S3CR3T@bkt/out")
    assert st.url == "s3://***@bkt/out" and st.root == "bkt/out"


def test_worker_env_never_carries_s3_options():
    env = {"WINTOK_S3_OPTIONS": '{"secret": "S3CR3T"}', "WINTOK_FAILPOINTS": "decode=raise",
           "WINTOK_FAILPOINT_MARK": "/tmp/m", "WINTOK_IO_RETRIES": "2", "WINTOK_CACHE": "/c",
           "WINTOK_S3_UPLOAD_CHUNKSIZE": "5", "AWS_SECRET_ACCESS_KEY": "S3CR3T", "PATH": os.environ["PATH"]}
    assert worker_env(env) == {"WINTOK_FAILPOINTS": "decode=raise", "WINTOK_FAILPOINT_MARK": "/tmp/m",
                               "WINTOK_IO_RETRIES": "2", "WINTOK_CACHE": "/c"}


def test_run_file_job_has_no_url_secrets():
    cfg = JobConfig(model="wintok-tiny", inputs=("s3://K3YID:S3CR3T@bkt/x.tar", "https://h/a.tar?token=T0KEN"),
                    output="s3://K3YID:S3CR3T@bkt/out", s3_key="K3YID", s3_secret="S3CR3T")
    text = repr(cfg.public_dict())
    assert not any(s in text for s in SECRETS)
    assert cfg.public_dict()["inputs"] == ["s3://***@bkt/x.tar", "https://h/a.tar?token=***"]


@pytest.mark.parametrize("stem", ["/tmp/x", "a//b", "./a/./b", "a/../b", "a\\b", "a?b#c", "a\nb"])
def test_normalize_stem_is_idempotent_and_safe(stem):
    once = normalize_stem(stem)
    assert normalize_stem(once) == once
    _check_stem(once)
