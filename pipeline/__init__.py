"""Everything that moves data: read shards, decode, run the model, write and commit Parquet."""
