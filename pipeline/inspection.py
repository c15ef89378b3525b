"""`wintok inspect`: what the tokens of an OUTPUT look like (no torch, no Ray).

Counts come from the manifests (as `wintok status`); code usage and duplicates from the data
files of the committed shards, streamed one record batch at a time, so memory stays flat
whatever the OUTPUT's size. Per codebook: the share of its codes that occur and the
perplexity exp(H) of their frequencies (K for perfectly even use, 1 for one code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas import tensor_to_numpy

from .io import StorageOptions
from .output import Output, OutputError
from .status import status

# which id columns are counted, and where their codebook size is in the fingerprint
ID_COLUMNS = ("pixel_ids", "semantic_ids")


@dataclass
class Usage:
    """Code counts of one id column: counts[g, code] for each codebook (or group / level) g."""

    counts: np.ndarray

    @classmethod
    def empty(cls, groups: int, size: int) -> Usage:
        return cls(np.zeros((groups, size), dtype=np.int64))

    def add(self, ids: np.ndarray) -> None:
        """ids (n, G, ...) for the G codebooks of this column."""
        g, k = self.counts.shape
        flat = ids.reshape(ids.shape[0], g, -1).transpose(1, 0, 2).reshape(g, -1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= k):
            raise OutputError(f"an id {int(flat.max())} is outside the codebook of {k} codes: the OUTPUT does "
                              "not match its fingerprint; run `wintok verify`")
        for i in range(g):
            self.counts[i] += np.bincount(flat[i], minlength=k)

    def summary(self) -> list[dict[str, float]]:
        out = []
        for c in self.counts:
            total = int(c.sum())
            p = c[c > 0] / total if total else np.zeros(0)
            out.append({"codes": int(c.size), "used": int((c > 0).sum()),
                        "share_used": round(float((c > 0).mean()), 4),
                        "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2) if total else 0.0})
        return out


@dataclass
class Inspection:
    status: dict[str, Any]
    schema: list[str]
    fingerprint: dict[str, Any]
    usage: dict[str, Usage] = field(default_factory=dict)
    shards_read: int = 0
    rows_read: int = 0
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # image hash -> keys ("shard/key")

    def to_dict(self) -> dict[str, Any]:
        dup_rows = sum(len(v) for v in self.duplicates.values())
        return {**self.status, "schema": self.schema, "fingerprint": self.fingerprint,
                "shards_read": self.shards_read, "rows_read": self.rows_read,
                "usage": {k: u.summary() for k, u in self.usage.items()},
                "duplicate_images": {"groups": len(self.duplicates), "rows": dup_rows,
                                     "examples": dict(list(self.duplicates.items())[:5])}}

    def render(self) -> str:
        s = self.status
        lines = [f"{s['output']}: {s['shards_committed']} shards committed, {s['shards_failed']} failed; "
                 f"{s['images']} images, {s['sample_errors']} sample errors"]
        if s["errors_by_reason"]:
            lines.append("errors by reason: " + ", ".join(f"{k} {v}" for k, v in
                                                          sorted(s["errors_by_reason"].items(), key=lambda kv: -kv[1])))
        model = self.fingerprint.get("model") or {}
        lines.append(f"fingerprint {s['fingerprint_sha256']}: model {model.get('name', '-')} "
                     f"(sha256 {str(model.get('sha256', '-'))[:12]}), dtype {self.fingerprint.get('dtype')}, "
                     f"schema v{self.fingerprint.get('schema_version')}")
        lines.append("columns: " + ", ".join(self.schema))
        lines.append(f"read {self.rows_read} rows of {self.shards_read} shards for usage and duplicates")
        for name, u in self.usage.items():
            for g, row in enumerate(u.summary()):
                lines.append(f"{name}[{g}]: {row['used']}/{row['codes']} codes used ({row['share_used']:.1%}), "
                             f"perplexity {row['perplexity']:.1f}")
        d = self.to_dict()["duplicate_images"]
        lines.append(f"duplicate images (same image_hash): {d['groups']} groups, {d['rows']} rows")
        for h, keys in d["examples"].items():
            lines.append(f"  {h}: {', '.join(keys[:4])}" + (" ..." if len(keys) > 4 else ""))
        return "\n".join(lines)


def _codebook_sizes(fp: dict[str, Any]) -> dict[str, int]:
    sizes = {}
    config = (fp.get("model") or {}).get("config") or {}
    if config.get("vocab_size") and config.get("num_codebooks"):
        sizes["pixel_ids"] = int(config["vocab_size"]) // int(config["num_codebooks"])
    k = (fp.get("semantic_codebook") or {}).get("k")
    if k:
        sizes["semantic_ids"] = int(k)
    return sizes


def inspect_output(output: str, opts: StorageOptions | None = None, max_shards: int | None = None) -> Inspection:
    """Status + schema + code usage + duplicates; usage and duplicates over the first
    `max_shards` committed shards in stem order (all when None)."""
    s = status(output, opts)  # raises OutputError for a missing run or damaged manifests
    out = Output(output, opts)
    fp = out.fingerprint()
    files = out.shards()[:max_shards] if max_shards is not None else out.shards()
    schema = out.schema() if files else None
    report = Inspection(s, [f"{f.name}: {f.type}" for f in schema] if schema else [], fp)
    sizes = _codebook_sizes(fp)
    id_cols = [c for c in ID_COLUMNS if schema is not None and c in schema.names and c in sizes]
    hashes: dict[bytes, list[str]] = {}
    for shard in files:
        for batch in out.parquet(shard.url).iter_batches(batch_size=4096, columns=["key", "image_hash", *id_cols]):
            report.rows_read += batch.num_rows
            for c in id_cols:
                ids = tensor_to_numpy(batch.column(c))
                if c == "semantic_ids":
                    ids = np.moveaxis(ids, -1, 1)  # (n, N, G) -> (n, G, N): one codebook per group
                if c not in report.usage:
                    report.usage[c] = Usage.empty(ids.shape[1], sizes[c])
                report.usage[c].add(ids)
            for key, h in zip(batch.column("key").to_pylist(), batch.column("image_hash").to_pylist(), strict=True):
                hashes.setdefault(h, []).append(f"{shard.stem}/{key}")
        report.shards_read += 1
    report.duplicates = {h.hex(): keys for h, keys in hashes.items() if len(keys) > 1}
    return report


def usage_png(report: Inspection, path: str) -> None:
    """Rank-frequency plot of every codebook's code counts (log scale), one panel per id column."""
    try:
        import matplotlib
    except ImportError:
        raise OutputError("--png needs matplotlib: pip install 'wintok-pipeline[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(report.usage.items()) or [("no id columns", Usage.empty(1, 1))]
    fig, axes = plt.subplots(1, len(cols), figsize=(6 * len(cols), 4), squeeze=False)
    for ax, (name, u) in zip(axes[0], cols, strict=True):
        for g, c in enumerate(u.counts):
            ranked = np.sort(c)[::-1]
            ax.plot(np.arange(1, len(ranked) + 1), np.maximum(ranked, 0.5), label=f"{name}[{g}]")
        ax.set(xscale="log", yscale="log", xlabel="code rank", ylabel="occurrences",
               title=f"{name}: code usage ({report.rows_read} images)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_json(report: Inspection) -> str:
    return json.dumps(report.to_dict(), indent=1, default=str)  # status() already redacted the URL


__all__ = ["Inspection", "Usage", "inspect_output", "render_json", "usage_png"]
