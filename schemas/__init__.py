"""Schemas of everything the pipeline writes (pure pyarrow, no IO)."""

from .manifest import FailureRecord, FileRecord, Manifest, fingerprint_digest
from .tensors import as_tensor_extension, is_tensor_type, tensor_to_numpy
from .tokens import (
    ERRORS_SCHEMA,
    METADATA_KEY,
    SCHEMA_VERSION,
    TokenLayout,
    build_rows,
    column_to_numpy,
    errors_schema,
    read_metadata,
    tokens_schema,
)

__all__ = [
    "ERRORS_SCHEMA", "METADATA_KEY", "SCHEMA_VERSION", "FailureRecord", "FileRecord", "Manifest", "TokenLayout",
    "as_tensor_extension", "build_rows", "column_to_numpy", "errors_schema", "fingerprint_digest",
    "is_tensor_type", "read_metadata", "tensor_to_numpy", "tokens_schema",
]
