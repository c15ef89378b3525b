"""`wintok status`: what an OUTPUT holds, from its manifests alone."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from schemas import FailureRecord, Manifest

from .io import Storage, StorageOptions
from .urls import redact_url
from .writer import FAILED_DIR, MANIFEST_DIR, RUN_FILE


def read_manifests(storage: Storage, threads: int = 16) -> list[Manifest]:
    names = [n for n in storage.list(MANIFEST_DIR) if n.endswith(".json")]
    with ThreadPoolExecutor(threads) as pool:
        texts = list(pool.map(lambda n: storage.read_text(f"{MANIFEST_DIR}/{n}"), names))
    return [Manifest.from_json(t) for t in texts]


def read_failures(storage: Storage) -> list[FailureRecord]:
    names = [n for n in storage.list(FAILED_DIR) if n.endswith(".json")]
    return [FailureRecord.from_json(storage.read_text(f"{FAILED_DIR}/{n}")) for n in names]


def status(output: str, opts: StorageOptions | None = None) -> dict[str, Any]:
    storage = Storage(output, opts)
    if not storage.exists(RUN_FILE):
        raise FileNotFoundError(f"{output} holds no wintok run ({RUN_FILE} missing)")
    run = json.loads(storage.read_text(RUN_FILE))
    manifests = read_manifests(storage)
    committed = {m.stem for m in manifests}
    failures = [f for f in read_failures(storage) if f.stem not in committed]
    reasons: Counter[str] = Counter()
    for m in manifests:
        reasons.update(m.errors_by_reason)
    seconds = sum(m.seconds for m in manifests)
    images = sum(m.rows for m in manifests)
    errors = sum(m.errors for m in manifests)
    return {
        "output": redact_url(output),
        "fingerprint_sha256": run.get("fingerprint_sha256"),
        "shards_committed": len(manifests),
        "shards_failed": len(failures),
        "images": images,
        "sample_errors": errors,
        "errors_by_reason": dict(reasons),
        "worker_seconds": round(seconds, 2),
        "images_per_worker_second": round((images + errors) / seconds, 2) if seconds else 0.0,
        "failed": {f.stem: f"{f.reason}: {f.error[:300]}" for f in failures},
        "output_bytes": sum(m.shards_file.bytes + (m.errors_file.bytes if m.errors_file else 0) for m in manifests),
    }


def render(s: dict[str, Any]) -> str:
    lines = [
        f"{s['output']}: {s['shards_committed']} shards committed, {s['shards_failed']} failed",
        f"images: {s['images']} tokenized, {s['sample_errors']} sample errors"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(s['errors_by_reason'].items()))})"
           if s["sample_errors"] else ""),
        f"output: {s['output_bytes'] / 1e6:.2f} MB; {s['images_per_worker_second']} img/s per worker-second",
    ]
    lines += [f"FAILED {k}: {v}" for k, v in sorted(s["failed"].items())]
    return "\n".join(lines)
