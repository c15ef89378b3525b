"""A model URL with credentials in it (s3://KEY:SECRET@bucket/model): the secret reaches S3 and
nothing else: not the cached copy's name, not the fingerprint's model name, not `_run.json`,
not the message of a model that is not there. moto S3, no Ray."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from pipeline.config import JobConfig
from pipeline.io import Storage
from pipeline.models import localize
from pipeline.plan import RunRefused, check_run_file, run_fingerprint, storage_options
from pipeline.urls import redact_url

pytestmark = pytest.mark.e2e
KEY, SECRET = "K3YID", "S3CR3T"


@pytest.fixture()
def model_bucket(s3fs_client, tiny_model_dir, tmp_path, monkeypatch):
    """A bucket holding the tiny model twice: under models/wintok-tiny/ and at the bucket's root."""
    monkeypatch.setenv("WINTOK_CACHE", str(tmp_path / "cache"))
    bucket = f"wintok-models-{uuid.uuid4().hex[:8]}"
    s3fs_client.mkdir(bucket)
    for name in os.listdir(tiny_model_dir):
        data = open(os.path.join(tiny_model_dir, name), "rb").read()
        s3fs_client.pipe_file(f"{bucket}/models/wintok-tiny/{name}", data)
        s3fs_client.pipe_file(f"{bucket}/{name}", data)
    return bucket


def _cfg(model: str, endpoint: str, tmp_path) -> JobConfig:
    return JobConfig(inputs=(str(tmp_path / "x.tar"),), output=str(tmp_path / "out"), model=model,
                     s3_endpoint_url=endpoint)


def test_model_url_credentials_are_not_in_the_cache_name_nor_the_fingerprint(model_bucket, s3_endpoint,
                                                                             tmp_path):
    url = f"s3://{KEY}:{SECRET}@{model_bucket}/models/wintok-tiny/"
    local = localize(url, storage_options(_cfg(url, s3_endpoint, tmp_path)))
    assert os.path.basename(local) == "wintok-tiny" and SECRET not in local and KEY not in local
    root = f"s3://{KEY}:{SECRET}@{model_bucket}"  # a model at the bucket's root: named after the bucket
    local = localize(root, storage_options(_cfg(root, s3_endpoint, tmp_path)))
    assert os.path.basename(local) == model_bucket and os.path.isfile(os.path.join(local, "config.json"))
    for model in (url, root):
        cfg = _cfg(model, s3_endpoint, tmp_path)
        fp = run_fingerprint(cfg)
        assert fp["model"]["name"] in ("wintok-tiny", model_bucket)
        storage = Storage(cfg.output)
        check_run_file(storage, fp, cfg)
        run = storage.read_text("_run.json")
        assert SECRET not in run and KEY not in run and SECRET not in json.dumps(fp)
        assert json.loads(run)["job"]["model"] == redact_url(model)
        os.unlink(os.path.join(cfg.output, "_run.json"))


def test_a_missing_model_url_is_refused_without_its_credentials(model_bucket, s3_endpoint, tmp_path):
    url = f"s3://{KEY}:{SECRET}@{model_bucket}/models/nothing-here"
    with pytest.raises(FileNotFoundError) as ei:
        localize(url, storage_options(_cfg(url, s3_endpoint, tmp_path)))
    assert SECRET not in str(ei.value) and f"s3://***@{model_bucket}/models/nothing-here" in str(ei.value)
    with pytest.raises(RunRefused) as ei:
        run_fingerprint(_cfg(url, s3_endpoint, tmp_path))
    assert SECRET not in str(ei.value) and KEY not in str(ei.value)
