"""OUTPUT's layout: every folder and file name the pipeline writes, in one place.

    OUTPUT/_run.json               resolved job + fingerprint
    OUTPUT/_lease.json             the one writer's lease (pipeline/lease_file.py)
    OUTPUT/shards/<stem>.parquet   rows of input shard <stem>
    OUTPUT/errors/<stem>.parquet   its failed samples
    OUTPUT/_manifest/<stem>.json   its commit record, written last
    OUTPUT/_failed/<stem>.json     a shard that exhausted its retries

Driver, worker, status and verify import names from here, never spell them.
"""

from __future__ import annotations

SHARDS_DIR, ERRORS_DIR, MANIFEST_DIR, FAILED_DIR = "shards", "errors", "_manifest", "_failed"
RUN_FILE = "_run.json"
LEASE_FILE = "_lease.json"


def shards_rel(stem: str) -> str:
    return f"{SHARDS_DIR}/{stem}.parquet"


def errors_rel(stem: str) -> str:
    return f"{ERRORS_DIR}/{stem}.parquet"


def manifest_rel(stem: str) -> str:
    return f"{MANIFEST_DIR}/{stem}.json"


def failed_rel(stem: str) -> str:
    return f"{FAILED_DIR}/{stem}.json"
