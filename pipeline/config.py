"""The job: one frozen dataclass. YAML job files and CLI flags both resolve into it.

Every option is declared once, here, on its field: default, help, choices and CLI spelling live in
the field's metadata (`option`). `wintok tokenize`/`embed` generate their flags from it
(pipeline/cli.py), `__post_init__` checks choices from it, and jobs/REFERENCE.md is generated from
it (`python -m pipeline.config > jobs/REFERENCE.md`; a test keeps it current).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import Field, dataclass, field, fields
from typing import Any

import yaml

# Values other modules share with JobConfig (preprocess, worker, runner, demo import them):
MAX_IMAGE_PIXELS = 89_478_485                  # PIL's own decompression-bomb limit
RESIZE_MODES = ("center-crop", "squash")       # the first is the default
DTYPES = ("auto", "bf16", "fp32", "fp16")      # auto: bf16 on CUDA, fp32 on CPU
DEVICES = ("auto", "cpu", "cuda")
DECODE_MODES = ("auto", "threads", "processes")
TINY_PRESET = "wintok-tiny"                    # the few-MB preset (random weights): the demo's model
INPUT_FORMATS = ("auto", "webdataset", "folder", "parquet")  # pipeline/inputs.py reads them


class JobConfigError(ValueError):
    """A job file or flag is wrong; the message says which and what to do."""


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None,
           metavar: str | None = None, job_only: bool = False, tokenizer: bool = False,
           secret: bool = False, positional: bool = False) -> Any:
    """A JobConfig field with its one declaration of help, choices and CLI spelling.

    flag: the CLI spelling (default `--field-name`, `--no-field-name` for a bool that defaults to
    True; its help then reads "no <help>"); job_only: no flag, job files only;
    tokenizer: the WinTok model's options, not offered by `wintok embed`; secret: never shown
    (repr) nor written (`public_dict`); positional: given as INPUT... on the command line."""
    meta = {"help": help, "choices": choices, "flag": flag, "metavar": metavar, "job_only": job_only,
            "tokenizer": tokenizer, "secret": secret, "positional": positional}
    return field(default=default, repr=not secret, metadata=meta)


@dataclass(frozen=True)
class JobConfig:
    inputs: tuple[str, ...] = option((), "input shards (fsspec URLs, brace ranges {00000..00099}, globs, or a "
                                         ".txt list)", positional=True)
    output: str = option("", "OUTPUT URL: a local folder or an s3:// URL (instead of the last positional argument)")
    # input kinds (pipeline/inputs.py): tar shards, image folders, Parquet files with image bytes
    input_format: str = option("auto", "what the inputs are; auto: .parquet files are Parquet, folders are image "
                                       "folders, anything else a webdataset tar", choices=INPUT_FORMATS)
    folder_unit_files: int = option(1000, "image folders: files per work unit (one output shard), in sorted order")
    image_column: str = option("image", "Parquet inputs: the image column ({bytes, path} structs as HF datasets "
                                        "writes them, or binary)")
    key_column: str | None = option(None, "Parquet inputs: the key column (default: the row's index in the file)")
    text_column: str | None = option(None, "Parquet inputs: the column passed through as `text` (a caption)")
    meta_column: str | None = option(None, "Parquet inputs: the column passed through as `meta` (JSON if not a "
                                           "string)")
    # model(s): no silent random-weights default, tokenize needs --model (or a teacher)
    model: str | None = option(None, f"model directory, official .pth, or preset name ({TINY_PRESET}...: RANDOM "
                                     "weights); required unless the job file names one", tokenizer=True)
    encoder_config: str | None = option(None, "SigLIP config.json (or folder) for an official .pth", tokenizer=True)
    allow_pickle: bool = option(False, "allow checkpoints that need pickled code (only for files you trust)",
                                tokenizer=True)
    dtype: str = option("auto", "auto: bf16 on GPU, fp32 on CPU", choices=DTYPES, tokenizer=True)
    semantic_tokens: bool = option(False, "also store the (N, D) semantic tokens (large)", tokenizer=True)
    semantic_codebook: str | None = option(None, "semantic codebook file (`wintok fit-semantic-codebook`): write "
                                                 "semantic_ids with it; default: the model directory's "
                                                 "semantic_codebook.safetensors if present; none: no semantic ids",
                                           tokenizer=True, metavar="CODEBOOK")
    teacher: str | None = option(None, "teacher model folder or model id in the local HF cache "
                                       "(its pooled embedding is stored next to the tokens)")
    teacher_dtype: str = option("auto", "precision of the teacher; auto: bf16 on GPU, fp32 on CPU", choices=DTYPES)
    teacher_patch_tokens: bool = option(False, "also store the teacher's patch features")
    device: str = option("auto", "where the models run; auto: cuda if visible", choices=DEVICES)
    compile: bool = option(False, "torch.compile the encoder")
    # preprocessing and batching
    resize: str = option(RESIZE_MODES[0], "center-crop: the central square, resized; squash: the whole image "
                                          "resized", choices=RESIZE_MODES)
    max_image_pixels: int = option(MAX_IMAGE_PIXELS, "images with more pixels (from the header) are "
                                                     "decompression_bomb errors")
    batch_size: int = option(64, "images per model call")
    decode_threads: int | None = option(None, "decoders per worker, threads or processes (default: from "
                                              "the worker's CPU share)")
    decode_mode: str = option("auto", "decode in threads of the worker or in child processes; auto: processes on "
                                      "GPU workers, threads on CPU ones", choices=DECODE_MODES)
    prefetch: int = option(2, "decoded batches queued ahead of the model in each worker", job_only=True)
    row_group_rows: int = option(1024, "rows per Parquet row group", job_only=True)
    # cluster
    address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    workers: int | None = option(None, "CPU workers when there are no GPUs")
    torch_threads: int | None = option(None, "intra-op threads of each CPU worker (default: its CPU share minus its decoders, at least 1)")
    gpus_per_worker: float = option(1.0, "GPUs per worker actor", job_only=True)
    # reliability
    max_retries: int = option(3, "retries of a failed shard before it is recorded in _failed/")
    retry_backoff: float = option(2.0, "seconds before the first retry, doubled each time")
    retry_backoff_max: float = option(120.0, "longest wait in seconds between two tries of a shard", job_only=True)
    shard_timeout: float = option(600.0, "fail a shard (reason timeout) that makes no progress for this long, and "
                                         "replace its worker", metavar="SECONDS")
    stop_grace: float = option(10.0, "on SIGTERM: seconds in-flight shards get to finish before they are "
                                     "abandoned", job_only=True)
    overwrite: bool = option(False, "redo every shard even if OUTPUT holds a different run")
    retry_failed: bool = option(False, "only take up the shards recorded as failed")
    break_lease: bool = option(False, "take over OUTPUT's lease at once, even from a run that may be alive "
                                      "(only when you know it is dead; if it is not, it stops at its next commit)")
    # storage: credentials best come from AWS_* variables or a profile; s3_key/s3_secret are never written out
    s3_endpoint_url: str | None = option(None, "S3-compatible endpoint (MinIO, Ceph, ...); default AWS")
    s3_profile: str | None = option(None, "AWS profile for S3 credentials (~/.aws/credentials)")
    s3_anon: bool = option(False, "anonymous S3 access")
    s3_key: str | None = option(None, "S3 access key id; prefer AWS_* variables or --s3-profile; never written "
                                      "anywhere", secret=True)
    s3_secret: str | None = option(None, "S3 secret key; prefer AWS_* variables or --s3-profile; never written "
                                         "anywhere", secret=True)
    lease_ttl: float = option(60.0, "seconds without renewal after which OUTPUT's lease counts as dead",
                              job_only=True)
    progress: bool = option(True, "progress on stderr (bars on a terminal, a line every 30 s otherwise)")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value not in choices:
                raise JobConfigError(f"{f.name} must be {_one_of(choices)}, not {value!r}")
        if self.batch_size < 1 or (self.decode_threads or 1) < 1 or self.max_retries < 0 \
                or (self.torch_threads or 1) < 1:
            raise JobConfigError("batch_size, decode_threads and torch_threads must be >= 1, max_retries >= 0")
        if not self.shard_timeout > 0 or not self.stop_grace >= 0:
            raise JobConfigError("shard_timeout must be > 0 seconds and stop_grace >= 0")
        if self.folder_unit_files < 1:
            raise JobConfigError("folder_unit_files must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise JobConfigError("workers must be >= 1")
        if self.model is None and self.teacher is None:
            raise JobConfigError("nothing to compute: give --model, --teacher, or both")

    def replace(self, **kw: Any) -> JobConfig:
        return dataclasses.replace(self, **kw)

    def public_dict(self) -> dict[str, Any]:
        """The resolved job as saved in `_run.json`: secrets masked, URLs redacted (`redact_url`)."""
        from .urls import redact_url

        d = dataclasses.asdict(self)
        d["inputs"] = [redact_url(u) for u in self.inputs]
        d["output"] = redact_url(self.output)
        for f in fields(self):
            if f.metadata["secret"]:
                d[f.name] = "***" if d[f.name] else None
        return d


def _one_of(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}"


FIELDS: dict[str, Field] = {f.name: f for f in fields(JobConfig)}
FIELD_NAMES = set(FIELDS)
_TYPES = typing.get_type_hints(JobConfig)


def value_type(name: str) -> type:
    """The field's type without `| None`: int, float, bool, str or tuple."""
    t = _TYPES[name]
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return typing.get_origin(t) or t


def flag_of(name: str) -> str | None:
    """The field's CLI flag (`--batch-size`), or None: job-file only or positional."""
    meta = FIELDS[name].metadata
    if meta["job_only"] or meta["positional"]:
        return None
    negate = "no-" if FIELDS[name].default is True else ""
    return meta["flag"] or f"--{negate}{name.replace('_', '-')}"


def help_of(name: str) -> str:
    """The field's help, with its default where it has one worth saying."""
    f = FIELDS[name]
    default = f.default
    if default is True:
        return f"{f.metadata['help']} (default true)"
    if default is None or default is False or default in ("", ()):
        return f.metadata["help"]
    return f"{f.metadata['help']} (default {default:g})" if isinstance(default, float) \
        else f"{f.metadata['help']} (default {default})"


def job_reference() -> str:
    """jobs/REFERENCE.md: every job-file key, generated from the fields."""
    lines = ["# Job file keys", "",
             "Generated from `pipeline/config.py` (`python -m pipeline.config > jobs/REFERENCE.md`); do not edit.",
             "A job file (`wintok tokenize --job FILE`) is a YAML mapping of these keys (`-` or `_`); flags given",
             "on the command line override it.", "",
             "| key | type | flag | meaning |", "|---|---|---|---|"]
    for name, f in FIELDS.items():
        t = "list of str" if value_type(name) is tuple else value_type(name).__name__
        t += " or null" if isinstance(_TYPES[name], types.UnionType) else ""
        flag = flag_of(name)
        where = f"`{flag}`" if flag else ("INPUT..." if f.metadata["positional"] else "job file only")
        text = help_of(name) + (f"; one of {', '.join(f.metadata['choices'])}" if f.metadata["choices"] else "")
        lines.append(f"| `{name}` | {t} | {where} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


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


if __name__ == "__main__":
    print(job_reference(), end="")
