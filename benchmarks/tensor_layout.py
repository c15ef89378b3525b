"""Tensor-column storage: v1 (arrow.fixed_shape_tensor) against v2 (nested fixed-size lists).

    python -m benchmarks.tensor_layout [--rows 2000] [--rounds 3]

Writes the so400m-256 shapes (pixel_ids 4x16x16 uint16, semantic_tokens 32x1152 and
semantic_pooled 1152 float16) in both layouts with the pipeline's writer options, then
(a) times pyarrow's read of each column into one (n, *shape) array, alternating the layouts
and keeping the best of each, and (b) asks every documented library to load each file and
says whether the array comes out with its shape, without help.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.tensors import tensor_array, tensor_to_numpy


def _ext(a: np.ndarray) -> pa.Array:
    shape = list(a.shape[1:])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), int(np.prod(shape)))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.from_numpy_dtype(a.dtype), shape), storage)


def _nested(a: np.ndarray) -> pa.Array:
    return tensor_array(a, pa.from_numpy_dtype(a.dtype), a.shape[1:])


def _native(lib: str, path: str, expect: tuple[int, ...]) -> str:
    """What `lib` gives for pixel_ids without our helpers: the shape, or the error."""
    try:
        if lib == "datasets":
            from datasets import load_dataset
            ds = load_dataset("parquet", data_files=path, split="train", columns=["pixel_ids"])
            a = np.asarray(ds.with_format("numpy")[:]["pixel_ids"])
        elif lib == "polars":
            import polars as pl
            a = pl.read_parquet(path, columns=["pixel_ids"])["pixel_ids"].to_numpy()
        elif lib == "duckdb":
            import duckdb
            a = duckdb.sql(f"SELECT pixel_ids FROM '{path}'").fetchnumpy()["pixel_ids"]
        elif lib == "pandas":
            import pandas as pd
            a = pd.read_parquet(path, columns=["pixel_ids"])["pixel_ids"].to_numpy()
        else:
            raise ValueError(lib)
    except Exception as e:  # noqa: BLE001 - the finding is the error
        return f"fails: {type(e).__name__}: {str(e)[:90]}"
    a = np.asarray(a)
    return "shape kept" if a.shape == expect else f"{a.shape} {a.dtype}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    n = a.rows
    cols = {"pixel_ids": rng.integers(0, 4096, (n, 4, 16, 16), dtype=np.uint16),
            "semantic_tokens": rng.standard_normal((n, 32, 1152)).astype(np.float16),
            "semantic_pooled": rng.standard_normal((n, 1152)).astype(np.float16)}
    tmp = tempfile.mkdtemp(prefix="wintok-layout-")
    files = {}
    for name, fn in (("v1 fixed_shape_tensor", _ext), ("v2 nested lists", _nested)):
        files[name] = os.path.join(tmp, name.split()[0] + ".parquet")
        pq.write_table(pa.table({k: fn(v) for k, v in cols.items()}), files[name], compression="zstd",
                       use_dictionary=False)
    # the write side (what a worker's sink pays per shard): build the arrays + write the file
    write = dict.fromkeys(files, float("inf"))
    for _ in range(a.rounds):
        for name, fn in (("v1 fixed_shape_tensor", _ext), ("v2 nested lists", _nested)):
            t0 = time.perf_counter()
            pq.write_table(pa.table({k: fn(v) for k, v in cols.items()}), os.path.join(tmp, "w.parquet"),
                           compression="zstd", use_dictionary=False)
            write[name] = min(write[name], time.perf_counter() - t0)
    best = {(f, c): float("inf") for f in files for c in cols}
    for _ in range(a.rounds):
        for f, path in files.items():
            for c in cols:
                t0 = time.perf_counter()
                arr = tensor_to_numpy(pq.read_table(path, columns=[c]).column(c))
                best[f, c] = min(best[f, c], time.perf_counter() - t0)
                assert np.array_equal(arr, cols[c])
    print(f"pyarrow read into (n, *shape), {n} rows, best of {a.rounds} alternating rounds:")
    print("| column | " + " | ".join(files) + " | v2 / v1 |\n|---|---|---|---|")
    v1, v2 = files
    for c in cols:
        print(f"| {c} | {best[v1, c] * 1e3:.1f} ms | {best[v2, c] * 1e3:.1f} ms | {best[v2, c] / best[v1, c]:.2f} |")
    print("| file size | " + " | ".join(f"{os.path.getsize(p) / 1e6:.1f} MB" for p in files.values()) + " | |")
    v1w, v2w = write.values()
    print(f"| write all three (build + zstd) | {v1w * 1e3:.0f} ms | {v2w * 1e3:.0f} ms | {v2w / v1w:.2f} |")
    print("\npixel_ids through each library, no helper:")
    print("| library | " + " | ".join(files) + " |\n|---|---|---|")
    for lib in ("datasets", "polars", "duckdb", "pandas"):
        print(f"| {lib} | " + " | ".join(_native(lib, p, cols["pixel_ids"].shape) for p in files.values()) + " |")


if __name__ == "__main__":
    main()
