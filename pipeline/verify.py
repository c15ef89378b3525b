"""`wintok verify OUTPUT`: check every manifest against its files; exit 0 only when clean.

For each committed shard: the data and error files exist with the recorded size and sha256,
their schemas are ours (v1, with the run's fingerprint), row counts match, keys are unique,
and rows + errors account for every sample index 0..samples-1 exactly once. Data files with
no manifest (left by an attempt that died before committing) are listed as uncommitted;
they are harmless (a rerun overwrites them) and count as problems only with `strict`.

A manifest that cannot be read (not JSON, `{}`, wrong fields) is a problem of its shard.
`repair` un-commits every shard found damaged - its manifest first, then its data and error
files - so that a plain rerun redoes exactly those shards and leaves the others alone.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SCHEMA_VERSION, Manifest, read_metadata

from .io import Storage, StorageOptions
from .layout import ERRORS_DIR, SHARDS_DIR, errors_rel, manifest_rel, shards_rel
from .output import load_manifests, read_run


@dataclass
class VerifyReport:
    shards_checked: int = 0
    rows: int = 0
    errors: int = 0
    problems: list[str] = field(default_factory=list)
    uncommitted: list[str] = field(default_factory=list)
    damaged: dict[str, list[str]] = field(default_factory=dict)  # stem -> its problems
    repaired: list[str] = field(default_factory=list)            # files removed by repair()

    def add(self, stem: str, problems: list[str]) -> None:
        if problems:
            self.problems += problems
            self.damaged.setdefault(stem, []).extend(problems)

    def clean(self, strict: bool = False) -> bool:
        return not self.problems and not (strict and self.uncommitted)

    def to_dict(self) -> dict[str, Any]:
        return {"shards_checked": self.shards_checked, "rows": self.rows, "sample_errors": self.errors,
                "problems": self.problems, "uncommitted": self.uncommitted,
                "damaged_shards": sorted(self.damaged), "repaired": self.repaired}

    def render(self) -> str:
        lines = [f"checked {self.shards_checked} committed shards: {self.rows} rows, {self.errors} sample errors"]
        lines += [f"PROBLEM {p}" for p in self.problems]
        lines += [f"uncommitted (no manifest; a rerun redoes it): {u}" for u in self.uncommitted]
        lines += [f"removed {r}" for r in self.repaired]
        if not self.problems:
            lines.append("clean")
        elif self.repaired:
            lines.append(f"{len(self.problems)} problem(s) in {len(self.damaged)} shard(s), now un-committed: "
                         "rerun the tokenize command to redo exactly those")
        else:
            lines.append(f"{len(self.problems)} problem(s) in {len(self.damaged)} shard(s); "
                         "`wintok verify OUTPUT --repair` un-commits them so that a rerun redoes them")
        return "\n".join(lines)


def _read_file(storage: Storage, rel: str) -> tuple[bytes | None, str | None]:
    try:
        return storage.read_bytes(rel), None
    except FileNotFoundError:
        return None, f"{rel}: missing"


def _check_shard(storage: Storage, m: Manifest, digest: str | None) -> tuple[list[str], int, int]:
    problems: list[str] = []
    indices: list[int] = []
    keys: list[str] = []
    counts = [0, 0]
    for n, rec in enumerate((m.shards_file, m.errors_file)):
        if rec is None:
            continue
        data, err = _read_file(storage, rec.path)
        if err:
            problems.append(err)
            continue
        if len(data) != rec.bytes or hashlib.sha256(data).hexdigest() != rec.sha256:
            problems.append(f"{rec.path}: size/sha256 differ from the manifest")
            continue
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as e:  # noqa: BLE001 - any unreadable file is a problem to report
            problems.append(f"{rec.path}: unreadable Parquet ({e})")
            continue
        meta = read_metadata(table.schema)
        if meta.get("schema_version") != SCHEMA_VERSION:
            problems.append(f"{rec.path}: schema version {meta.get('schema_version')} is not {SCHEMA_VERSION}")
        if table.num_rows != rec.rows:
            problems.append(f"{rec.path}: {table.num_rows} rows, manifest says {rec.rows}")
        indices += table.column("sample_index").to_pylist()
        if n == 0:
            keys += table.column("key").to_pylist()
        counts[n] = table.num_rows
    if m.run_fingerprint and digest and m.run_fingerprint != digest:
        problems.append(f"{m.stem}: committed by a different run (fingerprint {m.run_fingerprint[:12]})")
    if not problems:
        if sorted(indices) != list(range(m.samples)):
            dup = len(indices) - len(set(indices))
            problems.append(f"{m.stem}: samples not accounted for exactly once ({len(set(indices))} of "
                            f"{m.samples} indices, {dup} duplicates)")
        if len(keys) != len(set(keys)):
            problems.append(f"{m.stem}: duplicate keys among rows")
        if counts != [m.rows, m.errors]:
            problems.append(f"{m.stem}: rows/errors {counts} differ from the manifest ({m.rows}, {m.errors})")
    return problems, counts[0], counts[1]


def _check_safely(storage: Storage, m: Manifest, digest: str | None) -> tuple[list[str], int, int]:
    try:
        return _check_shard(storage, m, digest)
    except Exception as e:  # noqa: BLE001 - a file that breaks the check is a problem of its shard
        return [f"{m.stem}: cannot be checked ({type(e).__name__}: {str(e)[:300]})"], 0, 0


def verify(output: str, opts: StorageOptions | None = None, threads: int = 8) -> VerifyReport:
    storage = Storage(output, opts)
    digest = read_run(storage, output).get("fingerprint_sha256")
    report = VerifyReport()
    manifests, unreadable = load_manifests(storage)
    for stem, why in sorted(unreadable.items()):
        report.add(stem, [f"{manifest_rel(stem)}: unreadable manifest: {why}"])
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda m: _check_safely(storage, m, digest), manifests))
    for m, (problems, rows, errors) in zip(manifests, results, strict=True):
        report.shards_checked += 1
        report.rows += rows
        report.errors += errors
        report.add(m.stem, problems)
    by_stem = {m.stem: m for m in manifests}
    for sub in (SHARDS_DIR, ERRORS_DIR):
        for name in storage.list(sub):
            stem = name[: -len(".parquet")] if name.endswith(".parquet") else name
            if stem in unreadable:
                continue
            if stem not in by_stem:
                report.uncommitted.append(f"{sub}/{name}")
            elif sub == ERRORS_DIR and by_stem[stem].errors_file is None:
                report.add(stem, [f"{sub}/{name}: the manifest of {stem} records no error file"])
    return report


def repair(output: str, report: VerifyReport, opts: StorageOptions | None = None) -> VerifyReport:
    """Un-commit every damaged shard of `report` (under the OUTPUT's lease, so never while a run
    writes): its manifest goes first, then its files, so a crash half-way leaves only
    uncommitted leftovers. Records each removed file in `report.repaired`."""
    from .lease import Lease

    storage = Storage(output, opts)
    with Lease(storage):
        for stem in sorted(report.damaged):
            for rel in (manifest_rel(stem), shards_rel(stem), errors_rel(stem)):
                if storage.exists(rel):
                    storage.delete(rel)
                    report.repaired.append(rel)
    return report
