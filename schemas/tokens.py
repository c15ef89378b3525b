"""Output schemas (v1): the single source of truth for every Parquet file we write. Pure pyarrow."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
METADATA_KEY = b"wintok"


@dataclass(frozen=True)
class TokenLayout:
    """Shapes of the per-image arrays; None leaves the column out."""

    pixel_ids: tuple[int, ...] | None = None         # (C, H, W) per-codebook ids
    semantic_dim: int | None = None                   # D of semantic_pooled
    semantic_tokens: tuple[int, int] | None = None    # (N, D), optional
    teacher_dim: int | None = None                    # Dt of teacher_embedding
    teacher_patch_tokens: tuple[int, int] | None = None  # (Np, Dp), optional


def _tensor(dtype: pa.DataType, shape: tuple[int, ...]) -> pa.DataType:
    return pa.fixed_shape_tensor(dtype, list(shape))


def tokens_schema(layout: TokenLayout, fingerprint: dict[str, Any] | None = None) -> pa.Schema:
    """Row schema for shards/<stem>.parquet. Column order is fixed; optional columns keep their slot."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("image_hash", pa.binary(16), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
    if layout.pixel_ids is not None:
        fields.append(pa.field("pixel_ids", _tensor(pa.uint16(), layout.pixel_ids), nullable=False))
    if layout.semantic_dim is not None:
        fields.append(pa.field("semantic_pooled", _tensor(pa.float16(), (layout.semantic_dim,)), nullable=False))
    if layout.semantic_tokens is not None:
        fields.append(pa.field("semantic_tokens", _tensor(pa.float16(), layout.semantic_tokens), nullable=False))
    if layout.teacher_dim is not None:
        fields.append(pa.field("teacher_embedding", _tensor(pa.float16(), (layout.teacher_dim,)), nullable=False))
    if layout.teacher_patch_tokens is not None:
        fields.append(
            pa.field("teacher_patch_tokens", _tensor(pa.float16(), layout.teacher_patch_tokens), nullable=False)
        )
    fields += [pa.field("text", pa.string()), pa.field("meta", pa.string())]
    return pa.schema(fields, metadata=_metadata(fingerprint))


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),   # read | decode | model
        pa.field("reason", pa.string(), nullable=False),  # short code: truncated, unidentified, ...
        pa.field("error", pa.string(), nullable=False),   # full message
    ]
)


def errors_schema(fingerprint: dict[str, Any] | None = None) -> pa.Schema:
    return ERRORS_SCHEMA.with_metadata(_metadata(fingerprint))


def _metadata(fingerprint: dict[str, Any] | None) -> dict[bytes, bytes]:
    meta = {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint or {}}
    return {METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}



def build_rows(schema: pa.Schema, columns: dict[str, Any]) -> pa.RecordBatch:
    """A record batch from plain python lists / numpy arrays, in the schema's order and types."""
    arrays = []
    for field in schema:
        value = columns[field.name]
        if isinstance(field.type, pa.FixedShapeTensorType):
            np_dtype = np.uint16 if field.type.value_type == pa.uint16() else np.float16
            arr = np.ascontiguousarray(np.asarray(value).astype(np_dtype, copy=False))
            shape = tuple(field.type.shape)
            if arr.shape[1:] != shape:
                raise ValueError(f"column {field.name}: expected (n, {shape}), got {arr.shape}")
            storage = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), int(np.prod(shape)))
            arrays.append(pa.ExtensionArray.from_storage(field.type, storage))
        else:
            arrays.append(pa.array(value, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def column_to_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A fixed_shape_tensor column back as one (n, *shape) ndarray."""
    col = table.column(name).combine_chunks()
    return col.to_numpy_ndarray()


def tensor_shapes(schema: pa.Schema) -> dict[str, tuple[int, ...]]:
    """{name: per-row shape} of the schema's tensor columns, whatever their storage layout."""
    return {f.name: tuple(f.type.shape) for f in schema if isinstance(f.type, pa.FixedShapeTensorType)}
