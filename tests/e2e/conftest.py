"""End-to-end fixtures: one local Ray per session, a moto S3 server on 127.0.0.1, tiny models."""

from __future__ import annotations

import os
import socket

import pytest

from wintok_model import WinTok, get_preset

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
    "AWS_SESSION_TOKEN": "testing-session-token",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's ThreadedMotoServer on loopback; fake credentials in the environment (set before Ray starts)."""
    from moto.server import ThreadedMotoServer

    for k, v in FAKE_AWS.items():
        os.environ[k] = v
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**FAKE_AWS, "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("models") / "wintok-tiny")
    WinTok(get_preset("wintok-tiny")).save_pretrained(d)
    return d


@pytest.fixture()
def s3fs_client(s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False,
                           skip_instance_cache=True)
    return fs


@pytest.fixture(scope="session", autouse=True)
def _fault_report():
    """With WINTOK_FAULTS_REPORT=path.md, the scenarios' table of faults and outcomes goes to path-e2e.md."""
    yield
    from tests.e2e.helpers import REPORT, write_report

    path = os.environ.get("WINTOK_FAULTS_REPORT")
    if path and REPORT:
        write_report(path)
