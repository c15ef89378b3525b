"""Output schemas (v2): the single source of truth for every Parquet file we write. Pure pyarrow."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .tensors import tensor_array, tensor_field, tensor_shape, tensor_to_numpy

SCHEMA_VERSION = 2  # 2: tensor columns as nested fixed-size lists (schemas/tensors.py); 1: fixed_shape_tensor
METADATA_KEY = b"wintok"


@dataclass(frozen=True)
class TokenLayout:
    """Shapes of the per-image arrays; None leaves the column out."""

    pixel_ids: tuple[int, ...] | None = None         # (C, H, W) per-codebook ids
    semantic_dim: int | None = None                   # D of semantic_pooled
    semantic_tokens: tuple[int, int] | None = None    # (N, D), optional
    semantic_ids: tuple[int, int] | None = None       # (N, G or R) codebook ids, optional
    semantic_codes: int = 1 << 16                     # codes per group / level: uint16 up to 65536, else uint32
    teacher_dim: int | None = None                    # Dt of teacher_embedding
    teacher_patch_tokens: tuple[int, int] | None = None  # (Np, Dp), optional


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
        fields.append(tensor_field("pixel_ids", pa.uint16(), layout.pixel_ids))
    if layout.semantic_dim is not None:
        fields.append(tensor_field("semantic_pooled", pa.float16(), (layout.semantic_dim,)))
    if layout.semantic_tokens is not None:
        fields.append(tensor_field("semantic_tokens", pa.float16(), layout.semantic_tokens))
    if layout.semantic_ids is not None:
        id_type = pa.uint16() if layout.semantic_codes <= 1 << 16 else pa.uint32()
        fields.append(tensor_field("semantic_ids", id_type, layout.semantic_ids))
    if layout.teacher_dim is not None:
        fields.append(tensor_field("teacher_embedding", pa.float16(), (layout.teacher_dim,)))
    if layout.teacher_patch_tokens is not None:
        fields.append(
            tensor_field("teacher_patch_tokens", pa.float16(), layout.teacher_patch_tokens)
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
        found = tensor_shape(field.type)
        if found is not None:
            shape, value_type = found
            try:
                arrays.append(tensor_array(value, value_type, shape))
            except ValueError as e:
                raise ValueError(f"column {field.name}: {e}") from None
        else:
            arrays.append(pa.array(value, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def column_to_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column back as one (n, *shape) ndarray (either schema version)."""
    return tensor_to_numpy(table.column(name))


def tensor_shapes(schema: pa.Schema) -> dict[str, tuple[int, ...]]:
    """{name: per-row shape} of the schema's tensor columns, whatever their storage layout."""
    return {f.name: found[0] for f in schema if (found := tensor_shape(f.type)) is not None}
