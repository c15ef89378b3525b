"""How tensor columns are stored (schema v2), and the one way back to numpy for every reader.

A per-image tensor of shape (d1, ..., dk) is stored as nested Arrow fixed-size lists,
``fixed_size_list<fixed_size_list<..., dk>, d1>``, with the shape also kept in the field's
metadata (``wintok.shape``). Measured on this machine (benchmarks/RESULTS.md, "Tensor
columns"): HF ``datasets`` and polars read this layout natively with its shape, and
pyarrow's canonical ``arrow.fixed_shape_tensor`` extension (schema v1) cannot be loaded by
HF ``datasets`` at all. Libraries that read the nested lists as Python objects or as
variable-size lists (pandas, DuckDB, Ray Data) get their (n, *shape) array from
:func:`tensor_to_numpy` or, for Ray Data's torch batches, :func:`as_tensor_extension`.

Pure pyarrow + numpy: no IO here.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

SHAPE_KEY = b"wintok.shape"


def tensor_type(dtype: pa.DataType, shape: tuple[int, ...]) -> pa.DataType:
    """The Arrow type of one (d1, ..., dk) tensor per row: nested fixed-size lists."""
    if not shape or any(int(s) <= 0 for s in shape):
        raise ValueError(f"a tensor column needs a non-empty shape of positive sizes, got {shape}")
    t = dtype
    for size in reversed(shape):
        t = pa.list_(t, int(size))
    return t


def tensor_field(name: str, dtype: pa.DataType, shape: tuple[int, ...], nullable: bool = False) -> pa.Field:
    return pa.field(name, tensor_type(dtype, shape), nullable=nullable,
                    metadata={SHAPE_KEY: json.dumps([int(s) for s in shape]).encode()})


def tensor_shape(t: pa.DataType) -> tuple[tuple[int, ...], pa.DataType] | None:
    """(shape, value type) of a tensor column's type (nested fixed-size lists or the v1
    fixed_shape_tensor extension); None for any other type."""
    if isinstance(t, pa.FixedShapeTensorType):
        return tuple(int(s) for s in t.shape), t.value_type
    shape = []
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return (tuple(shape), t) if shape else None


def is_tensor_type(t: pa.DataType) -> bool:
    return tensor_shape(t) is not None


def tensor_array(values: np.ndarray, dtype: pa.DataType, shape: tuple[int, ...]) -> pa.Array:
    """(n, *shape) ndarray -> one Arrow array of `tensor_type(dtype, shape)` (no copy beyond the cast)."""
    np_dtype = np.dtype(dtype.to_pandas_dtype())
    arr = np.ascontiguousarray(np.asarray(values).astype(np_dtype, copy=False))
    if arr.shape[1:] != tuple(shape):
        raise ValueError(f"expected (n, {', '.join(map(str, shape))}), got {arr.shape}")
    out: pa.Array = pa.array(arr.reshape(-1), type=dtype)
    for size in reversed(shape):
        out = pa.FixedSizeListArray.from_arrays(out, int(size))
    return out


def _as_arrow(values: Any) -> pa.Array:
    if isinstance(values, pa.RecordBatchReader):
        values = values.read_all()
    if isinstance(values, pa.Table):
        if values.num_columns != 1:
            raise ValueError(f"give one column, not a table of {values.num_columns}")
        values = values.column(0)
    if not isinstance(values, pa.Array | pa.ChunkedArray):
        values = pa.array(values)  # pandas Series (object or ArrowDtype), lists of arrays, ...
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    return values


def tensor_to_numpy(values: Any) -> np.ndarray:
    """A tensor column from any reader -> one (n, *shape) ndarray in its stored dtype.

    Takes a pyarrow Array/ChunkedArray/one-column Table, a DuckDB ``.arrow()`` result, a
    pandas Series, or anything ``pyarrow.array`` takes. Fixed-size lists give their shape
    directly; variable-size lists (DuckDB) must be rectangular, else ValueError.
    """
    arr = _as_arrow(values)
    n = len(arr)
    if isinstance(arr.type, pa.FixedShapeTensorType):  # v1 files
        return arr.to_numpy_ndarray()
    if arr.null_count:
        raise ValueError(f"{arr.null_count} of {n} rows are null: not a tensor column")
    shape: list[int] = []
    while pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        if pa.types.is_fixed_size_list(arr.type):
            size = arr.type.list_size
            flat = arr.flatten()
        else:
            lengths = np.asarray(arr.value_lengths().fill_null(0))
            size = int(lengths[0]) if len(lengths) else 0
            if len(lengths) and (lengths != size).any():
                raise ValueError(f"ragged lists (lengths {int(lengths.min())}..{int(lengths.max())}): not a tensor")
            flat = arr.flatten()
        shape.append(size)
        arr = flat
    if not shape:
        raise ValueError(f"type {arr.type} is not a tensor column")
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)


def as_tensor_extension(batch: pa.Table | pa.RecordBatch) -> pa.Table:
    """Nested-list tensor columns -> ``arrow.fixed_shape_tensor`` (zero copy); other columns kept.

    For Ray Data: ``ds.map_batches(as_tensor_extension, batch_format="pyarrow")`` makes
    ``iter_torch_batches`` yield (B, *shape) tensors.
    """
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    cols = []
    for name in table.column_names:
        col = table.column(name)
        found = tensor_shape(col.type)
        if found is not None and not isinstance(col.type, pa.FixedShapeTensorType):
            shape, value_type = found
            values = _as_arrow(col)
            for _ in shape:  # fixed-size lists flatten to slices of their values: no copy
                values = values.flatten()
            storage = pa.FixedSizeListArray.from_arrays(values, int(np.prod(shape)))
            col = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(value_type, list(shape)), storage)
        cols.append(col)
    return pa.table(cols, names=table.column_names)
