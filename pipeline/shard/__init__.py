"""The shard path as a chain of iterator stages (wired by :mod:`pipeline.shard.processor`).

tar (bytes -> members) -> samples (members -> samples) -> decode (-> pixels) -> batch (-> uint8
buffers) -> encode (-> model outputs) -> sink (-> Parquet, manifest last). Each stage is a plain
iterator over its upstream, testable alone; nothing here imports Ray.
"""
