"""The scale harness: the real driver against simulated workers (`python -m benchmarks.scale`).

`sim` holds the simulated workers (a few async Ray actors, each serving many worker slots,
each slot committing its shards through the real ShardSink after a delay); `s3server` a moto
S3 behind a request-counting proxy in its own process; `__main__` the measurement.
"""
