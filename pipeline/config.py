"""The job: one frozen dataclass. YAML job files and CLI flags both resolve into it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml


class JobConfigError(ValueError):
    """A job file or flag is wrong; the message says which and what to do."""


@dataclass(frozen=True)
class JobConfig:
    inputs: tuple[str, ...] = ()
    output: str = ""
    # model(s)
    model: str | None = None            # required (or a teacher): no silent random-weights default
    encoder_config: str | None = None
    allow_pickle: bool = False
    dtype: str = "auto"
    device: str = "auto"
    semantic_tokens: bool = False
    teacher: str | None = None
    teacher_dtype: str = "auto"
    teacher_patch_tokens: bool = False
    compile: bool = False
    # preprocessing and batching
    resize: str = "center-crop"
    max_image_pixels: int = 89_478_485
    batch_size: int = 64
    decode_threads: int | None = None   # decoders per worker; None: CPUs per GPU - 2 on GPU workers, half a CPU worker's share
    decode_mode: str = "auto"           # threads | processes | auto (processes on GPU workers, threads on CPU ones)
    prefetch: int = 2
    row_group_rows: int = 1024
    # cluster
    address: str | None = None
    workers: int | None = None          # CPU workers when the cluster has no GPUs
    torch_threads: int | None = None    # CPU workers: intra-op threads (default: the worker's CPU share)
    gpus_per_worker: float = 1.0
    # reliability
    max_retries: int = 3
    retry_backoff: float = 2.0
    retry_backoff_max: float = 120.0
    shard_timeout: float = 600.0        # seconds a shard may go without progress before it fails (timeout)
    stop_grace: float = 10.0            # on SIGTERM: seconds in-flight shards get to finish before abandoned
    overwrite: bool = False
    retry_failed: bool = False
    # storage: credentials best come from AWS_* variables or a profile; s3_key/s3_secret are never written out
    s3_endpoint_url: str | None = None
    s3_profile: str | None = None
    s3_anon: bool = False
    s3_key: str | None = field(default=None, repr=False)      # prefer AWS_* variables or a profile
    s3_secret: str | None = field(default=None, repr=False)
    lease_ttl: float = 60.0
    break_lease: bool = False           # take over OUTPUT's lease even from a holder that may be alive
    progress: bool = True

    def __post_init__(self) -> None:
        if self.decode_mode not in ("auto", "threads", "processes"):
            raise JobConfigError(f"decode_mode must be auto, threads or processes, not {self.decode_mode!r}")
        if self.resize not in ("center-crop", "squash"):
            raise JobConfigError(f"resize must be center-crop or squash, not {self.resize!r}")
        for name in ("dtype", "teacher_dtype"):
            if getattr(self, name) not in ("auto", "bf16", "fp32", "fp16"):
                raise JobConfigError(f"{name} must be auto, bf16 or fp32, not {getattr(self, name)!r}")
        if self.batch_size < 1 or (self.decode_threads or 1) < 1 or self.max_retries < 0 \
                or (self.torch_threads or 1) < 1:
            raise JobConfigError("batch_size, decode_threads and torch_threads must be >= 1, max_retries >= 0")
        if not self.shard_timeout > 0 or not self.stop_grace >= 0:
            raise JobConfigError("shard_timeout must be > 0 seconds and stop_grace >= 0")
        if self.workers is not None and self.workers < 1:
            raise JobConfigError("workers must be >= 1")
        if self.model is None and self.teacher is None:
            raise JobConfigError("nothing to compute: give --model, --teacher, or both")

    def replace(self, **kw: Any) -> JobConfig:
        return dataclasses.replace(self, **kw)

    def public_dict(self) -> dict[str, Any]:
        """The resolved job as saved in `_run.json`: credentials masked, URLs redacted (`redact_url`)."""
        from .urls import redact_url

        d = dataclasses.asdict(self)
        d["inputs"] = [redact_url(u) for u in self.inputs]
        d["output"] = redact_url(self.output)
        for secret in ("s3_key", "s3_secret"):
            d[secret] = "***" if d[secret] else None
        return d


FIELD_NAMES = {f.name for f in fields(JobConfig)}


def load_job_file(path: str) -> dict[str, Any]:
    """A YAML job file -> dict of JobConfig fields; unknown keys are an error."""
    if not os.path.isfile(path):
        raise JobConfigError(f"job file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise JobConfigError(f"job file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise JobConfigError(f"job file {path} must be a mapping of options")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise JobConfigError(f"unknown keys in {path}: {', '.join(unknown)} (known: {', '.join(sorted(FIELD_NAMES))})")
    if "inputs" in data:
        v = data["inputs"]
        data["inputs"] = tuple([v] if isinstance(v, str) else v)
    return data


def resolve(job_file: str | None, overrides: dict[str, Any]) -> JobConfig:
    """Job file values, then flags that were given (None = not given)."""
    values: dict[str, Any] = load_job_file(job_file) if job_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "inputs" in values:
        values["inputs"] = tuple(values["inputs"])
    try:
        cfg = JobConfig(**values)
    except TypeError as e:
        raise JobConfigError(str(e)) from None
    if not cfg.inputs:
        raise JobConfigError("no inputs: give INPUT shards (URLs, globs, brace ranges or a .txt list)")
    if not cfg.output:
        raise JobConfigError("no output: give OUTPUT (a local folder or an s3:// URL)")
    return cfg
