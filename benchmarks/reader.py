"""`python -m benchmarks.reader`: TokenDataset samples/s per DataLoader worker vs `pq.read_table`.

Writes an OUTPUT of official-shaped rows through the pipeline's own sink (pixel_ids uint16
[4, 16, 16], semantic_pooled float16 [1152], row groups of 1024; random ids, so zstd cannot
shrink them below what real ids give), then times on the same files, alternating rounds and
keeping each one's best:
  - raw: the Parquet read bandwidth of this machine, `pq.read_table` of every file (all columns);
  - table: `pq.read_table(columns=...)` then `column_to_numpy` (what a user writes by hand);
  - reader: iterating `TokenDataset` in one process (what one DataLoader worker does): per-sample
    dicts of torch tensors, with and without shuffle, and `flat=True`; and through a DataLoader
    with one worker and batches of 64 (collate and the worker's queue included), the DataLoader
    collating single rows or the reader yielding whole batches (`batch_size=64`); and the
    DataLoader's worker -> main hand-off alone (the ceiling of any reader inside a worker).
Prints a Markdown table (and `--json` a JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.harness import hardware


def build(root: str, shards: int, rows: int) -> str:
    from pipeline.io import Storage
    from pipeline.shard.sink import ShardSink
    from schemas import SCHEMA_VERSION, TokenLayout, fingerprint_digest, tokens_schema

    fp = {"schema_version": SCHEMA_VERSION, "model": {"config": {"vocab_size": 16384, "num_codebooks": 4}}}
    storage = Storage(root)
    storage.put_bytes(json.dumps({"fingerprint": fp, "fingerprint_sha256": fingerprint_digest(fp)}).encode(),
                      "_run.json")
    schema = tokens_schema(TokenLayout(pixel_ids=(4, 16, 16), semantic_dim=1152), fp)
    rng = np.random.default_rng(0)
    for s in range(shards):
        sink = ShardSink(storage, f"{s:05d}", f"/in/{s:05d}.tar", schema, fp, row_group_rows=1024)
        for lo in range(0, rows, 1024):
            n = min(1024, rows - lo)
            sink.add_rows({"key": [f"{s:05d}_{i:06d}" for i in range(lo, lo + n)], "shard": [f"/in/{s:05d}.tar"] * n,
                           "sample_index": list(range(lo, lo + n)), "image_hash": [rng.bytes(16) for _ in range(n)],
                           "width": [256] * n, "height": [256] * n, "text": [None] * n, "meta": [None] * n,
                           "pixel_ids": rng.integers(0, 4096, (n, 4, 16, 16)),
                           "semantic_pooled": rng.standard_normal((n, 1152)).astype(np.float16)})
        sink.commit(input_size=None, input_etag=None, attempts=1, seconds=0.0,
                    run_fingerprint=fingerprint_digest(fp))
        sink.cleanup()
    return root


def run(root: str, rounds: int) -> dict[str, float]:
    from pipeline.dataset import TokenDataset
    from schemas import column_to_numpy

    files = sorted(os.path.join(root, "shards", f) for f in os.listdir(os.path.join(root, "shards")))
    cols = ["key", "pixel_ids", "semantic_pooled"]
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    nbytes = sum(os.path.getsize(f) for f in files)

    def raw() -> int:
        return sum(pq.read_table(f).num_rows for f in files)

    def table() -> int:
        n = 0
        for f in files:
            t = pq.read_table(f, columns=cols)
            ids = column_to_numpy(t, "pixel_ids")
            column_to_numpy(t, "semantic_pooled")
            n += len(ids)
        return n

    def reader(**kw) -> int:
        return sum(1 for _ in TokenDataset(root, cols if not kw.get("flat") else ["key", "pixel_ids"], **kw))

    def loader(batched: bool) -> int:
        import torch

        ds = TokenDataset(root, cols, batch_size=64 if batched else None)
        dl = torch.utils.data.DataLoader(ds, batch_size=None if batched else 64, num_workers=1)
        return sum(len(b["key"]) for b in dl)

    def handoff() -> int:
        """The DataLoader's worker -> main process hand-off alone: a copy of one batch each time, nothing
        read (a copy: a tensor already moved to shared memory would be sent again for free)."""
        import torch

        class Same(torch.utils.data.IterableDataset):
            def __iter__(self):
                batch = next(iter(TokenDataset(root, cols, batch_size=64)))
                for lo in range(0, total, 64):
                    n = min(64, total - lo)
                    yield {k: v[:n].clone() if isinstance(v, torch.Tensor) else v[:n] for k, v in batch.items()}

        return sum(len(b["key"]) for b in torch.utils.data.DataLoader(Same(), batch_size=None, num_workers=1))

    cases = {"raw pq.read_table (all columns)": raw, "pq.read_table + column_to_numpy": table,
             "TokenDataset": reader, "TokenDataset shuffle": lambda: reader(shuffle=True, seed=0),
             "TokenDataset flat": lambda: reader(flat=True),
             "TokenDataset(batch_size=64)": lambda: sum(len(b["key"]) for b in TokenDataset(root, cols, batch_size=64)),
             "DataLoader(num_workers=1, batch_size=64) collating rows": lambda: loader(False),
             "DataLoader(num_workers=1) over TokenDataset(batch_size=64)": lambda: loader(True),
             "DataLoader hand-off alone (a copy of one batch sent again and again)": handoff}
    best = {k: 0.0 for k in cases}
    for _ in range(rounds):  # alternate the cases, keep each one's best (this machine drifts)
        for name, fn in cases.items():
            t = time.perf_counter()
            n = fn()
            assert n == total, (name, n, total)
            best[name] = max(best[name], n / (time.perf_counter() - t))
    best["_rows"], best["_mb"] = total, nbytes / 1e6
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=5000, help="rows per shard")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = run(build(os.path.join(d, "out"), a.shards, a.rows), a.rounds)
    rows, mb = res.pop("_rows"), res.pop("_mb")
    ref = res["pq.read_table + column_to_numpy"]
    h = hardware()
    print(f"{h.get('Model name', '?')}, {h['cpu_count']} vCPU, {h['ram_gib']} GiB; torch {h.get('torch')}; {int(rows)} rows in {a.shards} files, {mb:.1f} MB, pyarrow {pa.__version__}; "
          f"one process, best of {a.rounds} alternating rounds")
    print("| read | samples/s | vs read_table + column_to_numpy | MB/s |\n|---|---|---|---|")
    for name, v in res.items():
        print(f"| {name} | {v:,.0f} | {v / ref:.2f}x | {v * mb / rows:,.0f} |")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
