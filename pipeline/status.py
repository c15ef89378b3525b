"""`wintok status`: what an OUTPUT holds, from its manifests alone (imports no torch, no Ray)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .io import StorageOptions
from .output import Output, OutputError, load_manifests, parse_manifest, read_failures, read_run
from .urls import redact_url

# status reads OUTPUT through pipeline/output.py; these names stay importable from here
__all__ = ["OutputError", "load_manifests", "parse_manifest", "read_failures", "read_run", "render", "status"]


def status(output: str, opts: StorageOptions | None = None) -> dict[str, Any]:
    out = Output(output, opts)
    run = out.run
    manifests = out.manifests()
    committed = {m.stem for m in manifests}
    failures = [f for f in read_failures(out.storage) if f.stem not in committed]
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
        "images_per_worker_second": round(images / seconds, 2) if seconds else 0.0,
        "failed": {f.stem: f"{f.reason}: {f.error[:300]}" for f in failures},
        "output_bytes": sum(m.shards_file.bytes + (m.errors_file.bytes if m.errors_file else 0) for m in manifests),
    }


def render(s: dict[str, Any], speed: bool = True) -> str:
    """`speed=False` leaves the per-worker-second figure out (the demo shows the run's own img/s)."""
    lines = [
        f"{s['output']}: {s['shards_committed']} shards committed, {s['shards_failed']} failed",
        f"images: {s['images']} tokenized, {s['sample_errors']} sample errors"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(s['errors_by_reason'].items()))})"
           if s["sample_errors"] else ""),
        f"output: {s['output_bytes'] / 1e6:.2f} MB"
        + (f"; {s['images_per_worker_second']} images tokenized per worker-second" if speed else ""),
    ]
    lines += [f"FAILED {k}: {v}" for k, v in sorted(s["failed"].items())]
    return "\n".join(lines)
