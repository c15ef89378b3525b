"""Reading an OUTPUT back for assertions."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from pipeline.config import JobConfig
from schemas import column_to_numpy


def read_output(output: str) -> dict:
    """{'rows': {stem: table}, 'errors': {stem: table}, 'manifests': {stem: dict}} of a local OUTPUT."""
    out: dict = {"rows": {}, "errors": {}, "manifests": {}}
    for kind, sub, ext in (("rows", "shards", ".parquet"), ("errors", "errors", ".parquet"),
                           ("manifests", "_manifest", ".json")):
        base = os.path.join(output, sub)
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            stem = name[: -len(ext)]
            path = os.path.join(base, name)
            out[kind][stem] = json.load(open(path)) if ext == ".json" else pq.read_table(path)
    return out


def ids_by_key(tables: dict) -> dict:
    res = {}
    for t in tables.values():
        ids = column_to_numpy(t, "pixel_ids")
        for k, v in zip(t.column("key").to_pylist(), ids, strict=True):
            assert k not in res, f"duplicate row for {k}"
            res[k] = v
    return res


def file_states(root: str) -> dict:
    """path -> (mtime_ns, size) of every file below root."""
    states = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            states[p] = (st.st_mtime_ns, st.st_size)
    return states


# The fault table (benchmarks/RESULTS.md): scenarios call `record`; with WINTOK_FAULTS_REPORT=path.md
# the session writes them to path-e2e.md (tests/e2e/conftest.py).
REPORT: list[dict] = []


def record(scenario: str, fault: str, outcome: str, attempts: str, lost: int, duplicates: int,
           recovery: float | str) -> None:
    REPORT.append({"scenario": scenario, "fault": fault, "outcome": outcome, "attempts": attempts, "lost": lost,
                   "duplicates": duplicates, "recovery": recovery if isinstance(recovery, str) else f"{recovery:.2f}"})


def write_report(path: str) -> None:
    root, ext = os.path.splitext(path)
    with open(f"{root}-e2e{ext or '.md'}", "w") as f:
        f.write("| scenario | fault injected | outcome | attempts | samples lost | duplicates | recovery s |\n"
                "|---|---|---|---|---|---|---|\n")
        for r in REPORT:
            f.write(f"| {r['scenario']} | {r['fault']} | {r['outcome']} | {r['attempts']} | {r['lost']} | "
                    f"{r['duplicates']} | {r['recovery']} |\n")


def small_job(inputs, output, model, **kw) -> JobConfig:
    """A fault scenario's job: one CPU worker, small batches, fast retries; `kw` overrides."""
    base = dict(inputs=tuple(inputs), output=str(output), model=model, batch_size=4, decode_threads=2,
                max_retries=2, retry_backoff=0.05, progress=False, workers=1)
    base.update(kw)
    return JobConfig(**base)
