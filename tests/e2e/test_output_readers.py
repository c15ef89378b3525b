"""The output reads back, shape kept, through every library the README documents.

The README's `# read with: LIB` snippets run here as written (OUTPUT replaced by a real
output that the shard processor wrote), and every tensor column is compared with what
pyarrow's plain ``to_pylist`` gives: a path that shares no code with `schemas.tensors`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.shard.encode import ModelSpec
from schemas import as_tensor_extension, tensor_to_numpy
from tests import corpus
from tests.readers import process_shards

README = Path(__file__).resolve().parents[2] / "README.md"
TENSORS = ("pixel_ids", "semantic_pooled", "semantic_tokens")


def snippets() -> dict[str, str]:
    blocks = re.findall(r"```python\n# read with: (\w+)\n(.*?)```", README.read_text(), flags=re.S)
    return dict(blocks)


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("readers")
    shards = corpus.make_shards(tmp / "in", 2, 5, seed=11)
    return process_shards(shards, tmp / "out", ModelSpec(model="wintok-tiny", device="cpu", semantic_tokens=True))


def truth(output: Path) -> dict[str, dict[str, np.ndarray]]:
    """{key: {column: array}} from pyarrow's Python lists (no numpy fast path, no helper)."""
    t = pq.read_table(output / "shards")
    rows: dict[str, dict[str, np.ndarray]] = {}
    cols = {c: t.column(c).to_pylist() for c in TENSORS}
    for i, key in enumerate(t.column("key").to_pylist()):
        rows[key] = {c: np.array(cols[c][i]) for c in TENSORS}
    return rows


def test_readme_documents_every_library():
    assert set(snippets()) == {"pyarrow", "datasets", "polars", "duckdb", "pandas", "ray"}


@pytest.mark.parametrize("lib", ["pyarrow", "datasets", "polars", "duckdb", "pandas", "ray"])
def test_readme_snippet_reads_pixel_ids(lib, output, tmp_path, monkeypatch, request):
    if lib == "ray":
        request.getfixturevalue("ray_session")
    if lib == "datasets":
        monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip(lib)
    code = snippets()[lib].replace("OUTPUT", str(output))
    scope: dict = {}
    exec(compile(code, f"README[{lib}]", "exec"), scope)
    ids = np.asarray(scope["ids"].numpy() if hasattr(scope["ids"], "numpy") else scope["ids"])
    want = truth(output)
    assert ids.shape == (len(want), 4, 8, 8), ids.shape  # wintok-tiny: 4 codebooks on an 8 x 8 grid
    if "keys" in scope:
        assert sorted(scope["keys"]) == sorted(want)
        for key, got in zip(scope["keys"], ids, strict=True):
            np.testing.assert_array_equal(got, want[key]["pixel_ids"])
    else:  # Ray's torch batches carry no strings: compare as a multiset of rows
        assert sorted(r.tobytes() for r in ids.astype(np.int64)) == \
            sorted(w["pixel_ids"].astype(np.int64).tobytes() for w in want.values())


def _readers(output: Path) -> dict:
    files = sorted(str(p) for p in (output / "shards").glob("*.parquet"))

    def hf():
        from datasets import load_dataset
        ds = load_dataset("parquet", data_files=files, split="train").with_format("numpy")
        return ds["key"][:], {c: ds[:][c] for c in TENSORS}

    def polars():
        import polars as pl
        df = pl.read_parquet(files)
        return df["key"].to_list(), {c: df[c].to_numpy() for c in TENSORS}

    def duckdb():
        import duckdb
        t = pa.table(duckdb.sql(f"SELECT * FROM read_parquet({files!r})"))
        return t["key"].to_pylist(), {c: tensor_to_numpy(t[c]) for c in TENSORS}

    def pandas():
        import pandas as pd
        df = pd.concat([pd.read_parquet(f, dtype_backend="pyarrow") for f in files])
        return df["key"].tolist(), {c: tensor_to_numpy(df[c]) for c in TENSORS}

    def pandas_object():  # plain pd.read_parquet: nested numpy object arrays
        import pandas as pd
        df = pd.concat([pd.read_parquet(f) for f in files])
        return df["key"].tolist(), {c: tensor_to_numpy(df[c]) for c in TENSORS}

    def ray_extension():
        t = as_tensor_extension(pq.read_table(files))
        assert all(isinstance(t.schema.field(c).type, pa.FixedShapeTensorType) for c in TENSORS)
        return t["key"].to_pylist(), {c: t[c].combine_chunks().to_numpy_ndarray() for c in TENSORS}

    return {"datasets": hf, "polars": polars, "duckdb": duckdb, "pandas": pandas,
            "pandas_object": pandas_object, "ray_extension": ray_extension}


@pytest.mark.parametrize("reader", ["datasets", "polars", "duckdb", "pandas", "pandas_object", "ray_extension"])
def test_every_tensor_column_round_trips(reader, output, tmp_path, monkeypatch):
    pytest.importorskip({"pandas_object": "pandas", "ray_extension": "pyarrow"}.get(reader, reader))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    keys, cols = _readers(output)[reader]()
    want = truth(output)
    assert sorted(keys) == sorted(want)
    for c in TENSORS:
        shape = want[keys[0]][c].shape
        assert cols[c].shape == (len(keys), *shape), (c, cols[c].shape)
        for key, got in zip(keys, cols[c], strict=True):
            np.testing.assert_array_equal(np.asarray(got, dtype=np.float64), want[key][c].astype(np.float64), c)


def test_tensor_to_numpy_refuses_what_is_not_a_tensor():
    with pytest.raises(ValueError, match="ragged"):
        tensor_to_numpy(pa.array([[1, 2], [3]]))
    with pytest.raises(ValueError, match="not a tensor"):
        tensor_to_numpy(pa.array(["a", "b"]))
    with pytest.raises(ValueError, match="null"):
        tensor_to_numpy(pa.array([[1, 2], None]))


def test_v1_files_still_read(tmp_path):
    """Files written before schema v2 (arrow.fixed_shape_tensor) read through the same helpers."""
    from schemas import column_to_numpy
    from schemas.tokens import tensor_shapes

    ids = np.arange(3 * 2 * 2 * 2, dtype=np.uint16).reshape(3, 2, 2, 2)
    ext = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.uint16(), [2, 2, 2]),
                                         pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), 8))
    pq.write_table(pa.table({"key": ["a", "b", "c"], "pixel_ids": ext}), tmp_path / "v1.parquet")
    t = pq.read_table(tmp_path / "v1.parquet")
    np.testing.assert_array_equal(column_to_numpy(t, "pixel_ids"), ids)
    assert tensor_shapes(t.schema) == {"pixel_ids": (2, 2, 2)}


def test_as_tensor_extension_gives_the_same_arrays(output):
    t = pq.read_table(output / "shards", columns=["pixel_ids"])
    ext = as_tensor_extension(t).column("pixel_ids").combine_chunks()
    np.testing.assert_array_equal(ext.to_numpy_ndarray(), tensor_to_numpy(t.column("pixel_ids")))
