"""Fault-injection fixtures: moto (from the e2e fixtures), a fault proxy in front of it, local Ray."""

from __future__ import annotations

import os

import pytest

from tests.e2e.conftest import FAKE_AWS, s3_endpoint, tiny_model_dir  # noqa: F401 - fixtures reused
from tests.faults.s3proxy import S3FaultProxy


@pytest.fixture(scope="module")
def ray_session(s3_endpoint):  # noqa: F811 - the fixture imported above
    """A local Ray for this module; a Ray already started in this process (e2e's) is reused."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**FAKE_AWS, "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture()
def s3_proxy(s3_endpoint):  # noqa: F811
    """A fault-injecting proxy on 127.0.0.1 in front of moto; stopped after the test."""
    with S3FaultProxy(s3_endpoint) as proxy:
        yield proxy


@pytest.fixture()
def s3_direct(s3_endpoint):  # noqa: F811
    """s3fs straight to moto (no faults): to set up inputs and to check outputs."""
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False,
                             skip_instance_cache=True)


@pytest.fixture()
def small_parts(monkeypatch):
    """Multipart uploads of small files: s3fs parts of 4 KiB, and moto accepting parts that small."""
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 1)
    monkeypatch.setenv("WINTOK_S3_UPLOAD_CHUNKSIZE", "4096")
    return 4096


@pytest.fixture(autouse=True)
def _fast_io_backoff(monkeypatch):
    """Keep the io-layer backoff short (its policy is read by s3_options from WINTOK_IO_*)."""
    monkeypatch.setenv("WINTOK_IO_BACKOFF", os.environ.get("WINTOK_IO_BACKOFF", "0.05"))
    monkeypatch.setenv("WINTOK_IO_BACKOFF_MAX", "0.5")
