"""`wintok submit` without a cluster: the submission id is a function of the job, the submission
holds no secret (a job with one is refused in one line), the runtime_env carries the package's own
directories and only non-secret variables, and the job file sent resolves to the same job."""

from __future__ import annotations

import os

import pytest
import yaml

from jobs import submit
from pipeline.cli import EXIT_USAGE, main
from pipeline.config import JobConfig, resolve

SECRET = "wJalrXUtnFEMI-K7MDENG-secret"


def _cfg(**kw) -> JobConfig:
    base = dict(inputs=("s3://b/ds/{00000..00009}.tar",), output="s3://b/out", model="wintok-tiny")
    return JobConfig(**{**base, **kw})


def test_the_submission_id_is_a_function_of_the_job(tmp_path, monkeypatch):
    a = submit.submission_id(submit.cluster_job(_cfg()))
    assert a == submit.submission_id(submit.cluster_job(_cfg())) and a.startswith("wintok-")
    # what does not change what the job writes does not change its id
    assert a == submit.submission_id(submit.cluster_job(_cfg(progress=False, address="ray://x:10001")))
    for other in (_cfg(output="s3://b/out2"), _cfg(batch_size=8), _cfg(inputs=("s3://b/ds/*.tar",))):
        assert submit.submission_id(submit.cluster_job(other)) != a
    # a relative local path is the same job as its absolute path
    monkeypatch.chdir(tmp_path)
    rel = submit.cluster_job(_cfg(inputs=("in/*.tar",), output="out"))
    assert rel.inputs == (f"{tmp_path}/in/*.tar",) and rel.output == f"{tmp_path}/out"
    assert submit.submission_id(rel) == submit.submission_id(
        submit.cluster_job(_cfg(inputs=(f"{tmp_path}/in/*.tar",), output=f"{tmp_path}/out")))
    assert submit.cluster_job(_cfg()).model == "wintok-tiny"  # a preset name is no path


@pytest.mark.parametrize("secret", [dict(s3_secret=SECRET), dict(s3_key="AKIA", s3_secret=SECRET),
                                    dict(output=f"s3://AKIA:{SECRET}@b/out"),
                                    dict(model=f"s3://AKIA:{SECRET}@b/models/tiny")])
def test_a_job_holding_a_secret_is_refused(secret):
    with pytest.raises(submit.SubmitError) as ei:
        submit.cluster_job(_cfg(**secret))
    msg = str(ei.value)
    assert SECRET not in msg and "plain text" in msg and "credentials" in msg


def test_the_runtime_env_carries_the_package_and_no_secret(tmp_path):
    environ = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIA", "WINTOK_S3_OPTIONS": SECRET,
               "WINTOK_FAILPOINTS": "shard_start=sleep:1", "WINTOK_IO_RETRIES": "5", "HOME": "/root"}
    env = submit.runtime_env(_cfg(), str(tmp_path), environ)
    assert [os.path.basename(d) for d in env["py_modules"]] == list(submit.PACKAGES)
    assert all(os.path.isfile(os.path.join(d, "__init__.py")) for d in env["py_modules"])
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"] == {"WINTOK_FAILPOINTS": "shard_start=sleep:1", "WINTOK_IO_RETRIES": "5",
                               "RAY_JOB_STOP_WAIT_TIME_S": "15"}  # stop_grace 10 s + 5
    assert SECRET not in repr(env)


def test_the_job_file_sent_resolves_to_the_same_job(tmp_path):
    cfg = submit.cluster_job(_cfg(batch_size=8, teacher="/nowhere/teacher", s3_endpoint_url="http://minio:9000",
                                  s3_profile="wintok", progress=False))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(submit.job_values(cfg)))
    assert resolve(str(path), {}) == cfg


def test_cli_refuses_a_secret_in_one_line_before_reaching_any_cluster(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"inputs": ["s3://b/x.tar"], "output": "s3://b/out", "model": "wintok-tiny",
                                   "s3_key": "AKIA", "s3_secret": SECRET}))
    assert main(["submit", str(job), "--address", "http://127.0.0.1:1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("wintok: error: the job sets s3_key, s3_secret") and len(err.splitlines()) == 1
    assert SECRET not in err


def test_cli_unreachable_jobs_server_is_one_line(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"inputs": ["s3://b/x.tar"], "output": "s3://b/out", "model": "wintok-tiny"}))
    assert main(["submit", str(job), "--address", "http://127.0.0.1:1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot reach the Ray Jobs server at http://127.0.0.1:1" in err and len(err.splitlines()) == 1
    assert main(["submit", "--status", "wintok-0", "--address", "http://127.0.0.1:1"]) == EXIT_USAGE
    assert main(["submit"]) == EXIT_USAGE
