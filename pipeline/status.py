"""`wintok status`: what an OUTPUT holds, from its manifests alone (imports no torch, no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from schemas import FailureRecord, FileRecord, Manifest

from .io import Storage, StorageOptions
from .layout import FAILED_DIR, MANIFEST_DIR, RUN_FILE
from .urls import redact_url


class OutputError(ValueError):
    """OUTPUT holds no run, or a file of it that status cannot read. One line for the user."""


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


def status(output: str, opts: StorageOptions | None = None) -> dict[str, Any]:
    storage = Storage(output, opts)
    run = read_run(storage, output)
    manifests, damaged = load_manifests(storage)
    if damaged:
        stem, why = next(iter(sorted(damaged.items())))
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise OutputError(f"{output}/{MANIFEST_DIR}/{stem}.json is damaged ({why}){more}: run "
                          f"`wintok verify {output} --repair`, then rerun the tokenize command")
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
