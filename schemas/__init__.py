"""Schemas of everything the pipeline writes (pure pyarrow, no IO)."""

from .manifest import FailureRecord, FileRecord, Manifest, fingerprint_digest
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
    "build_rows", "column_to_numpy", "errors_schema", "fingerprint_digest", "read_metadata", "tokens_schema",
]
