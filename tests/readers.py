"""A small OUTPUT for the reader tests, made by the real shard path in-process (no Ray).

`build_output` writes input tars of the given sizes, writes `_run.json` the way the driver does
(plan.check_run_file with the run fingerprint) and runs `ShardProcessor` on each shard: the
files are exactly what `wintok tokenize` writes, with small row groups so that windows and
resumes cross row-group and shard boundaries.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests import corpus


def process_shards(shards: list[str], output: Path, model, **worker) -> Path:
    """Run the shard processor in-process over `shards` (stems 00000, 00001, ...) into `output`,
    with a minimal `_run.json` as a run leaves: an OUTPUT without Ray."""
    import json

    from pipeline.protocol import ShardTask
    from pipeline.shard.processor import ShardProcessor, WorkerConfig
    from schemas import SCHEMA_VERSION

    proc = ShardProcessor(WorkerConfig(output=str(output), model=model,
                                       **{"batch_size": 4, "decode_threads": 1, **worker},
                                       fingerprint={"schema_version": SCHEMA_VERSION}))
    try:
        for i, url in enumerate(shards):
            res = proc.process(ShardTask(str(url), f"{i:05d}", 1))
            assert res.ok, res
    finally:
        proc.close()
    (output / "_run.json").write_text(json.dumps({"fingerprint": {"schema_version": SCHEMA_VERSION}}))
    return output


def build_output(root: Path, sizes: list[int], teacher: str | None = None, broken: dict[int, int] | None = None,
                 row_group_rows: int = 3, uncommitted: int = 0, s3: tuple | None = None) -> dict:
    """{'output', 'inputs' (committed shards' urls), 'extra' (uncommitted input urls), 'plan'}.

    `s3`: (s3fs filesystem, "bucket/prefix", endpoint URL): the tars are uploaded there and the
    run reads them and writes its OUTPUT there, as `wintok tokenize s3://...` does."""
    from pipeline.config import JobConfig
    from pipeline.io import Storage
    from pipeline.plan import check_run_file, model_spec, plan, run_fingerprint, storage_options
    from pipeline.shard.processor import ShardProcessor, WorkerConfig

    os.makedirs(root / "in", exist_ok=True)
    os.makedirs(root / "extra", exist_ok=True)
    samples = {}
    for s, n in enumerate(sizes):
        shard = corpus.good_samples(n, seed=500 + s, prefix=f"{s:05d}_")
        bad = corpus.broken_corpus()[: (broken or {}).get(s, 0)]  # the first ones fail in the pipeline
        shard = shard[:1] + bad + shard[1:]
        corpus.write_tar(root / "in" / f"{s:05d}.tar", shard)
        samples[str(root / "in" / f"{s:05d}.tar")] = shard
    extra = []
    for s in range(uncommitted):
        url = str(root / "extra" / f"x{s}.tar")
        corpus.write_tar(url, corpus.good_samples(4, seed=900 + s, prefix=f"x{s}_"))
        extra.append(url)
    base, s3kw = str(root), {}
    if s3 is not None:
        fs, prefix, endpoint = s3
        for local in [*samples, *extra]:
            fs.put_file(local, f"{prefix}/{os.path.relpath(local, root)}")
        samples = {f"s3://{prefix}/{os.path.relpath(k, root)}": v for k, v in samples.items()}
        extra = [f"s3://{prefix}/{os.path.relpath(u, root)}" for u in extra]
        base, s3kw = f"s3://{prefix}", {"s3_endpoint_url": endpoint}
    cfg = JobConfig(inputs=(f"{base}/in/*.tar",), output=f"{base}/out", model="wintok-tiny", teacher=teacher,
                    batch_size=8, decode_threads=1, row_group_rows=row_group_rows, progress=False, **s3kw)
    opts = storage_options(cfg)
    fp = run_fingerprint(cfg)
    check_run_file(Storage(cfg.output, opts), fp, cfg)
    proc = ShardProcessor(WorkerConfig(output=cfg.output, model=model_spec(cfg), batch_size=8, decode_threads=1,
                                       row_group_rows=row_group_rows, fingerprint=fp, storage=opts))
    try:
        for task in plan(cfg, opts):
            res = proc.process(task)
            assert res.ok, res
    finally:
        proc.close()
    return {"output": cfg.output, "inputs": sorted(samples), "extra": extra, "plan": samples, "storage": opts}
