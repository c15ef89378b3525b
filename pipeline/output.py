"""The one reader of an OUTPUT: `_run.json`, committed shards (from `_manifest/`), their Parquet files.

`wintok status`, `verify`, the training readers (pipeline/dataset.py, pipeline/distill.py) and
later `inspect` / `reconstruct` read an OUTPUT only through this module, so that "what is
committed" has one definition: a shard is committed iff `_manifest/<stem>.json` exists and
parses; its rows are in `shards/<stem>.parquet` (the manifest's `shards_file.path`). Imports no
torch and no Ray.

    out = Output("s3://bucket/tokens")         # or a local folder
    out.run                                    # _run.json as a dict (OutputError when absent)
    for shard in out.shards():                 # committed shards, sorted by stem
        table = out.read(shard, ["key", "pixel_ids"])

`Output.of_files([...])` reads a plain list of shard files (no `_manifest/`): their row counts
come from the Parquet footers instead.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import FailureRecord, FileRecord, Manifest, read_metadata

from .io import Storage, StorageOptions, get_fs
from .layout import FAILED_DIR, MANIFEST_DIR, RUN_FILE
from .urls import redact_url


class OutputError(ValueError):
    """OUTPUT holds no run, or a file of it that cannot be read. One line for the user."""


@dataclass(frozen=True)
class ShardFile:
    """One committed shard's rows file: `url` is what fsspec opens (credentials kept, never shown)."""

    stem: str
    url: str
    rows: int
    input_url: str = ""  # the input shard (redacted), from the manifest; "" for a plain file list


def _check_types(m: Manifest) -> None:
    ints = (m.samples, m.rows, m.errors, m.attempts)
    files = [f for f in (m.shards_file, m.errors_file) if f is not None]
    if not all(type(v) is int and v >= 0 for v in ints) or not isinstance(m.seconds, int | float) \
            or not isinstance(m.stem, str) or not isinstance(m.errors_by_reason, dict) \
            or not all(isinstance(f, FileRecord) and isinstance(f.path, str) and isinstance(f.sha256, str)
                       and type(f.bytes) is int and type(f.rows) is int for f in files):
        raise TypeError("a field has the wrong type")


def parse_manifest(name: str, text: str | bytes) -> Manifest:
    """One `_manifest/<name>` file -> Manifest; ValueError (with the reason) when it is damaged."""
    stem = name[: -len(".json")]
    try:
        m = Manifest.from_json(text)
        _check_types(m)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"not a manifest ({type(e).__name__}: {e})") from None
    if m.stem != stem:
        raise ValueError(f"records shard {m.stem!r}, not {stem!r}")
    return m


def load_manifests(storage: Storage, threads: int = 16) -> tuple[list[Manifest], dict[str, str]]:
    """Committed shards' manifests, and {stem: why} for the manifest files that are damaged."""
    names = [n for n in storage.list(MANIFEST_DIR) if n.endswith(".json")]

    def one(name: str) -> Manifest | str:
        try:
            return parse_manifest(name, storage.read_bytes(f"{MANIFEST_DIR}/{name}"))
        except FileNotFoundError:
            return "vanished while being read"
        except ValueError as e:
            return str(e)

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, names))
    good = [r for r in results if isinstance(r, Manifest)]
    bad = {n[: -len(".json")]: r for n, r in zip(names, results, strict=True) if isinstance(r, str)}
    return good, bad


def read_failures(storage: Storage) -> list[FailureRecord]:
    out = []
    for name in (n for n in storage.list(FAILED_DIR) if n.endswith(".json")):
        try:
            out.append(FailureRecord.from_json(storage.read_text(f"{FAILED_DIR}/{name}")))
        except (ValueError, TypeError) as e:  # a damaged record still says that the shard failed
            out.append(FailureRecord(name[: -len(".json")], "", "unreadable_record", str(e), 0))
    return out


def read_run(storage: Storage, output: str) -> dict[str, Any]:
    """`_run.json` of OUTPUT; OutputError (one line: what to do) when it is absent or damaged."""
    if not storage.exists(RUN_FILE):
        raise OutputError(f"{output} holds no wintok run ({RUN_FILE} missing): check the OUTPUT URL")
    try:
        run = json.loads(storage.read_bytes(RUN_FILE))
        if not isinstance(run, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise OutputError(f"{output}/{RUN_FILE} is damaged ({str(e).splitlines()[0]}): rerun the tokenize "
                          "command with --overwrite to redo this OUTPUT") from None
    return run


def open_parquet(url: str, opts: StorageOptions | None = None) -> pq.ParquetFile:
    """One shard file opened for reading its footer and row groups (not read whole)."""
    fs, path = get_fs(url, opts)
    return pq.ParquetFile(fs.open(path, "rb"))


class Output:
    """An OUTPUT folder (or a plain list of shard files), read-only."""

    def __init__(self, url: str, opts: StorageOptions | None = None) -> None:
        self.url, self.opts = url, opts or StorageOptions()
        self.storage = Storage(url, self.opts)
        self._run: dict[str, Any] | None = None
        self._files: list[ShardFile] | None = None

    @classmethod
    def of_files(cls, urls: list[str], opts: StorageOptions | None = None) -> Output:
        """Shard files without an OUTPUT around them: row counts from each file's footer."""
        if not urls:
            raise OutputError("no shard files given")
        out = cls.__new__(cls)
        out.url, out.opts, out.storage, out._run = "", opts or StorageOptions(), None, None

        def one(url: str) -> ShardFile:
            try:
                rows = out.parquet(url).metadata.num_rows
            except FileNotFoundError:
                raise OutputError(f"shard file {redact_url(url)} not found") from None
            stem = url.rsplit("/", 1)[-1].removesuffix(".parquet")
            return ShardFile(stem, url, rows)

        with ThreadPoolExecutor(16) as pool:
            out._files = list(pool.map(one, urls))
        return out

    @property
    def run(self) -> dict[str, Any]:
        """`_run.json` (job, fingerprint); OutputError when absent or damaged."""
        if self._run is None:
            if self.storage is None:
                raise OutputError("a plain list of shard files has no _run.json")
            self._run = read_run(self.storage, self.storage.url)
        return self._run

    def manifests(self) -> list[Manifest]:
        """Committed shards' manifests, sorted by stem; OutputError when one is damaged."""
        if self.storage is None:
            raise OutputError("a plain list of shard files has no manifests")
        manifests, damaged = load_manifests(self.storage)
        if damaged:
            out = self.storage.url
            stem, why = next(iter(sorted(damaged.items())))
            more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
            raise OutputError(f"{out}/{MANIFEST_DIR}/{stem}.json is damaged ({why}){more}: run "
                              f"`wintok verify {out} --repair`, then rerun the tokenize command")
        return sorted(manifests, key=lambda m: m.stem)

    def shards(self) -> list[ShardFile]:
        """Committed shards (with their row counts), sorted by stem; listed once per Output."""
        if self._files is None:
            self.run  # noqa: B018 - an OUTPUT without _run.json is refused with its one-line message
            base = self.url.rstrip("/")
            self._files = [ShardFile(m.stem, f"{base}/{m.shards_file.path}", m.rows, m.input_url)
                           for m in self.manifests()]
        return list(self._files)

    def parquet(self, url: str) -> pq.ParquetFile:
        return open_parquet(url, self.opts)

    def schema(self) -> pa.Schema:
        """The Arrow schema of the first committed shard (every shard of a run has the same one)."""
        files = self.shards()
        if not files:
            raise OutputError(f"{redact_url(self.url) or 'the file list'} holds no committed shard yet")
        return self.parquet(files[0].url).schema_arrow

    def fingerprint(self) -> dict[str, Any]:
        """The run's fingerprint: from `_run.json`, or from the first file's metadata for a file list."""
        if self.storage is not None:
            return dict(self.run.get("fingerprint") or {})
        return dict(read_metadata(self.schema()).get("fingerprint") or {})

    def read(self, shard: ShardFile, columns: list[str] | None = None) -> pa.Table:
        """A whole shard's table (selected columns)."""
        return self.parquet(shard.url).read(columns=columns)
