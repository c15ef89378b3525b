"""`wintok download`: URL lists -> webdataset shards, through img2dataset (the `ingest` extra).

img2dataset does the downloading (processes x threads, retries, resizing, its own progress
on stderr) and writes ``OUTPUT/00000.tar`` ... with, per sample, the image, ``.txt`` (the
caption, with a caption column) and ``.json`` (url, status, sizes, exif, sha256), plus per
shard ``00000.parquet`` (every row of the input, failed ones with their error) and
``00000_stats.json``. Nothing of that is changed here: this module maps the options, sets the
S3 endpoint for img2dataset's processes (fsspec reads ``FSSPEC_S3`` from the environment: the
endpoint, profile and anon flag, never a secret: credentials stay in AWS_* variables or the
profile), and sums the stats files into a :class:`DownloadSummary` (downloaded, failed by
reason). `wintok tokenize 'OUTPUT/*.tar' ...` then reads the shards, captions into ``text``
and the ``.json`` into ``meta``.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .config import option
from .io import InputError, StorageOptions, get_fs, s3_options
from .urls import redact_url

URL_LIST_FORMATS = ("txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz",
                    "parquet")
RESIZE_MODES = ("keep_ratio", "no", "center_crop", "border", "keep_ratio_largest")


@dataclass(frozen=True)
class DownloadConfig:
    """`wintok download`'s options (flags generated from these fields by pipeline/cli.py)."""

    url_list: str = option("", "the URL list: .txt (one URL a line), .csv/.tsv/.json/.jsonl(.gz) or .parquet",
                           positional=True)
    output: str = option("", "OUTPUT folder for the shards (local or an fsspec URL such as s3://bucket/prefix)",
                         positional=True)
    input_format: str = option("auto", "the URL list's format; auto: from its extension",
                               choices=("auto", *URL_LIST_FORMATS))
    url_col: str = option("url", "the URL column (csv, tsv, json, parquet lists)")
    caption_col: str | None = option(None, "the caption column: written as each sample's .txt")
    processes: int = option(1, "download processes")
    threads: int = option(64, "download threads per process")
    image_size: int = option(256, "target size in pixels (see --resize-mode)")
    resize_mode: str = option("keep_ratio", "img2dataset's resize: keep_ratio (the smaller side to image-size), "
                                            "no (as downloaded), center_crop, border, keep_ratio_largest",
                              choices=RESIZE_MODES)
    samples_per_shard: int = option(10000, "samples per output tar")
    timeout: int = option(10, "seconds per download")
    retries: int = option(0, "retries of a failed download")
    s3_endpoint_url: str | None = option(None, "S3-compatible endpoint (MinIO, Ceph, ...); default AWS")
    s3_profile: str | None = option(None, "AWS profile for S3 credentials (~/.aws/credentials)")
    s3_anon: bool = option(False, "anonymous S3 access")

    def __post_init__(self) -> None:
        from .config import JobConfigError

        if min(self.processes, self.threads, self.image_size, self.samples_per_shard) < 1:
            raise JobConfigError("processes, threads, image_size and samples_per_shard must be >= 1")


DOWNLOAD_FIELDS = {f.name: f for f in fields(DownloadConfig)}


@dataclass
class DownloadSummary:
    """img2dataset's stats files, summed: every URL of the list is counted once."""

    shards: int = 0
    urls: int = 0
    downloaded: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # img2dataset's status message -> count
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self, output: str) -> str:
        lines = [f"downloaded {self.downloaded} of {self.urls} URLs into {self.shards} shard(s) in {redact_url(output)} "
                 f"({self.failed_to_download} failed to download, {self.failed_to_resize} to resize; "
                 f"{self.seconds:.1f} s of shard time)"]
        for reason, n in sorted(self.failures.items(), key=lambda kv: (-kv[1], kv[0]))[:20]:
            lines.append(f"  {n:8d}  {reason}")
        if self.downloaded:
            lines.append(f"next: wintok tokenize '{output.rstrip('/')}/*.tar' TOKENS --model MODEL")
        return "\n".join(lines)


def url_list_format(cfg: DownloadConfig) -> str:
    if cfg.input_format != "auto":
        return cfg.input_format
    name = cfg.url_list.lower()
    for fmt in sorted(URL_LIST_FORMATS, key=len, reverse=True):
        if name.endswith("." + fmt):
            return fmt
    raise InputError(f"cannot tell the format of URL list {cfg.url_list!r} from its extension: give --input-format")


def s3_environment(cfg: DownloadConfig) -> dict[str, str]:
    """FSSPEC_S3 for img2dataset's processes: fsspec applies it to every s3 filesystem they open."""
    opts: dict[str, Any] = json.loads(os.environ.get("FSSPEC_S3", "{}") or "{}")
    if cfg.s3_endpoint_url:
        opts["endpoint_url"] = cfg.s3_endpoint_url
    if cfg.s3_profile:
        opts["profile"] = cfg.s3_profile
    if cfg.s3_anon:
        opts["anon"] = True
    return {"FSSPEC_S3": json.dumps(opts)} if opts else {}


def download(cfg: DownloadConfig) -> DownloadSummary:
    """Run img2dataset into `cfg.output` (webdataset), then sum its stats files."""
    fmt = url_list_format(cfg)
    storage = s3_options(cfg.s3_endpoint_url, cfg.s3_profile, cfg.s3_anon)
    fs, path = get_fs(cfg.url_list, storage)
    if not fs.exists(path):
        raise InputError(f"URL list {redact_url(cfg.url_list)} not found")
    # albumentations (img2dataset imports it) checks for updates online unless told not to
    with _environment({"NO_ALBUMENTATIONS_UPDATE": "1", **s3_environment(cfg)}):
        try:
            from img2dataset import download as img2dataset_download
        except ImportError:
            raise InputError("wintok download needs img2dataset: pip install 'wintok-pipeline[ingest]'") from None
        img2dataset_download(
            url_list=cfg.url_list, output_folder=cfg.output, output_format="webdataset", input_format=fmt,
            url_col=cfg.url_col, caption_col=cfg.caption_col, processes_count=cfg.processes,
            thread_count=cfg.threads, image_size=cfg.image_size, resize_mode=cfg.resize_mode,
            resize_only_if_bigger=True, number_sample_per_shard=cfg.samples_per_shard, timeout=cfg.timeout,
            retries=cfg.retries, enable_wandb=False, incremental_mode="incremental",
        )
    return read_stats(cfg.output, storage)


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """`env` set for img2dataset's processes (and fsspec's config in this one), as it was after."""
    import fsspec.config

    old_env = {k: os.environ.get(k) for k in env}
    old_conf = copy.deepcopy(fsspec.config.conf)
    os.environ.update(env)
    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read the environment at import
    try:
        yield
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.config.conf.clear()
        fsspec.config.conf.update(old_conf)


def read_stats(output: str, storage: StorageOptions | None = None) -> DownloadSummary:
    """Sum the `*_stats.json` files img2dataset wrote in `output`."""
    fs, root = get_fs(output, storage)
    fs.invalidate_cache()
    s = DownloadSummary()
    failures: Counter[str] = Counter()
    for path in sorted(fs.glob(f"{root.rstrip('/')}/*_stats.json")):
        stats = json.loads(fs.cat_file(path))
        s.shards += 1
        s.urls += int(stats.get("count", 0))
        s.downloaded += int(stats.get("successes", 0))
        s.failed_to_download += int(stats.get("failed_to_download", 0))
        s.failed_to_resize += int(stats.get("failed_to_resize", 0))
        s.seconds += float(stats.get("duration", 0.0))
        failures.update({k: int(v) for k, v in (stats.get("status_dict") or {}).items() if k != "success"})
    s.failures = dict(failures)
    return s
