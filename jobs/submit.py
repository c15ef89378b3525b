"""`wintok submit`: the same job as `wintok tokenize --job`, run on a Ray cluster through Ray Jobs.

What travels in the submission (`ray.job_submission.JobSubmissionClient.submit_job`):
- the code, as `py_modules`: the package's own directories (wintok_model, schemas, pipeline, jobs),
  whether they sit in a checkout or in site-packages; nothing else of a checkout (tests, .venv,
  outputs, benchmarks) is zipped. The cluster's nodes bring the third-party packages themselves
  (torch, ray, pyarrow, s3fs: the same environment on every node), so nothing is pip-installed
  per job;
- the resolved job as `job.yaml` in a small `working_dir` made here; the entrypoint is
  `python -m pipeline.cli tokenize --job job.yaml` on the head node;
- S3 settings by reference only: the endpoint and the profile NAME; credentials come from each
  node's own environment (AWS_* variables given to `ray start`, ~/.aws, an instance role).
  A job holding a secret (s3_key / s3_secret, or credentials inside a URL) is refused: Ray keeps
  the runtime_env and entrypoint in plain text in its dashboard. Of this machine's environment
  only the non-secret WINTOK_* variables the workers read (`pipeline.worker.worker_env`) go along.

The submission id is `wintok-` + a digest of the resolved job, so submitting the same job twice is
one job: the second submit finds it and reports it. A job that ended FAILED or STOPPED is taken up
again with `--resubmit` (a new id with a suffix; committed shards are skipped as in any rerun).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from typing import Any

import yaml

from pipeline.config import FIELDS, JobConfig
from pipeline.io import protocol_of
from pipeline.urls import redact_url, split_url

PACKAGES = ("wintok_model", "schemas", "pipeline", "jobs")
EXCLUDES = ["__pycache__", "*.pyc"]
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
# fields that do not change what the job computes or writes: left out of its digest
NOT_IN_DIGEST = ("address", "progress")


class SubmitError(ValueError):
    """The job cannot be submitted, or the Jobs server cannot be reached; one line for the user."""


def cluster_job(cfg: JobConfig) -> JobConfig:
    """The job as it runs on the cluster: local paths absolute, no address (the job driver joins the
    cluster it runs on, through RAY_ADDRESS), progress as lines in the job's log; refused when it
    holds a secret."""
    secrets = [n for n, f in FIELDS.items() if f.metadata["secret"] and getattr(cfg, n)]
    if secrets:
        raise SubmitError(f"the job sets {', '.join(secrets)}: a submitted job is stored in plain text by Ray; "
                          "give the nodes their S3 credentials themselves (AWS_* variables in the environment of "
                          "`ray start` on every node, a profile in ~/.aws on every node with --s3-profile, or an "
                          "instance role) and leave s3_key/s3_secret out")
    for url in (*cfg.inputs, cfg.output, cfg.model or "", cfg.teacher or "", cfg.encoder_config or ""):
        if split_url(url).userinfo:
            raise SubmitError(f"{redact_url(url)} holds credentials in the URL: a submitted job is stored in "
                              "plain text by Ray; give the nodes their credentials (AWS_* variables, a profile)")

    def local(p: str | None, must_exist: bool = False) -> str | None:
        if p is None or protocol_of(p) != "file" or "://" in p or (must_exist and not os.path.exists(p)):
            return p
        return os.path.abspath(p)

    return cfg.replace(inputs=tuple(local(u) for u in cfg.inputs), output=local(cfg.output),
                       model=local(cfg.model, True), teacher=local(cfg.teacher, True),
                       encoder_config=local(cfg.encoder_config, True), address=None)


def job_values(cfg: JobConfig) -> dict[str, Any]:
    """The job file sent along: every key of the job (none of them secret, see `cluster_job`)."""
    d = dataclasses.asdict(cfg)
    d["inputs"] = list(cfg.inputs)
    for name, f in FIELDS.items():
        if f.metadata["secret"] or name == "address":
            d.pop(name)
    return d


def submission_id(cfg: JobConfig) -> str:
    """Stable id of the job: the same resolved job gives the same id (digest of its canonical JSON)."""
    d = {k: v for k, v in job_values(cfg).items() if k not in NOT_IN_DIGEST}
    return "wintok-" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def local_paths(cfg: JobConfig) -> list[str]:
    """The job's local inputs/output: they must be the same path on every node (a shared filesystem)."""
    return [u for u in (*cfg.inputs, cfg.output) if protocol_of(u) == "file"]


def _package_dirs() -> list[str]:
    import importlib

    return [os.path.dirname(importlib.import_module(name).__file__) for name in PACKAGES]


def runtime_env(cfg: JobConfig, working_dir: str, environ: Any = None) -> dict[str, Any]:
    """The submission's runtime_env: the code (py_modules), the job file (working_dir), the
    workers' non-secret WINTOK_* variables, and how long `--stop` waits for the driver after its
    SIGTERM before Ray kills it (Ray's default, 3 s, is shorter than the job's stop_grace)."""
    from pipeline.worker import worker_env  # imports torch: only on submit, not for --status/--logs/--stop

    variables = worker_env(os.environ if environ is None else environ)
    variables["RAY_JOB_STOP_WAIT_TIME_S"] = str(math.ceil(cfg.stop_grace) + 5)
    return {"py_modules": _package_dirs(), "working_dir": working_dir, "excludes": EXCLUDES,
            "env_vars": variables}


def entrypoint(python: str = "python") -> str:
    return f"{python} -m pipeline.cli tokenize --job job.yaml"


@dataclasses.dataclass(frozen=True)
class Submitted:
    job_id: str
    status: str          # the job's status now
    existed: bool        # found, not submitted by this call
    address: str


def client(address: str | None) -> Any:
    """A Jobs client for `address` (http://HEAD:8265; None: RAY_API_SERVER_ADDRESS / RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "(none)"
        raise SubmitError(f"cannot reach the Ray Jobs server at {where}: {str(e).splitlines()[0]}; give "
                          "--address http://HEAD:8265 (the head's dashboard port; the dashboard must be running: "
                          "`ray start --head --dashboard-host 0.0.0.0`)") from None


def job_status(jobs: Any, job_id: str) -> str | None:
    """The job's status name, or None when the server has no job of that id."""
    try:
        return str(jobs.get_job_status(job_id).value)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            return None
        raise


def submit(cfg: JobConfig, address: str | None, *, python: str = "python", resubmit: bool = False) -> Submitted:
    """Submit `cfg` as a Ray job, or find the one already submitted for it."""
    cfg = cluster_job(cfg)
    jobs = client(address)
    base = sid = submission_id(cfg)
    status = job_status(jobs, sid)
    n = 1
    while status is not None and resubmit and status in ("FAILED", "STOPPED"):
        n += 1
        sid = f"{base}-{n}"
        status = job_status(jobs, sid)
    if status is not None:
        return Submitted(sid, status, True, jobs.get_address())
    with tempfile.TemporaryDirectory(prefix="wintok-submit-") as wd:
        with open(os.path.join(wd, "job.yaml"), "w", encoding="utf-8") as f:
            f.write("# submitted by `wintok submit`\n" + yaml.safe_dump(job_values(cfg), sort_keys=False))
        try:
            jobs.submit_job(entrypoint=entrypoint(python), submission_id=sid, runtime_env=runtime_env(cfg, wd),
                            metadata={"wintok_output": redact_url(cfg.output)})
        except RuntimeError as e:
            status = job_status(jobs, sid)  # submitted meanwhile by someone else: that one is the job
            if status is None:
                raise SubmitError(f"Ray refused the job: {str(e).splitlines()[0]}") from None
            return Submitted(sid, status, True, jobs.get_address())
    return Submitted(sid, job_status(jobs, sid) or "PENDING", False, jobs.get_address())


def follow_commands(job_id: str, address: str) -> list[str]:
    return [f"wintok submit --status {job_id} --address {address}",
            f"wintok submit --logs {job_id} --follow --address {address}",
            f"wintok submit --stop {job_id} --address {address}"]


def info(address: str | None, job_id: str) -> dict[str, Any]:
    """What the Jobs server knows of `job_id`: status, message, times, entrypoint, metadata."""
    jobs = client(address)
    if job_status(jobs, job_id) is None:
        raise SubmitError(f"no job {job_id} on the Ray cluster at {jobs.get_address()}")
    d = jobs.get_job_info(job_id)
    return {"job_id": job_id, "status": str(d.status.value), "message": d.message, "entrypoint": d.entrypoint,
            "start_time": d.start_time, "end_time": d.end_time, "metadata": d.metadata or {},
            "address": jobs.get_address()}


def logs(address: str | None, job_id: str, follow: bool = False, out: Any = None) -> None:
    """The job's log (its driver's stdout and stderr) to `out`; `follow`: until the job ends."""
    import asyncio
    import sys

    out = out or sys.stdout
    jobs = client(address)
    if job_status(jobs, job_id) is None:
        raise SubmitError(f"no job {job_id} on the Ray cluster at {jobs.get_address()}")
    if not follow:
        out.write(jobs.get_job_logs(job_id))
        return

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def stop(address: str | None, job_id: str) -> bool:
    """Ask Ray to stop the job (its driver gets SIGTERM: in-flight shards get stop_grace to finish)."""
    jobs = client(address)
    if job_status(jobs, job_id) is None:
        raise SubmitError(f"no job {job_id} on the Ray cluster at {jobs.get_address()}")
    return bool(jobs.stop_job(job_id))
