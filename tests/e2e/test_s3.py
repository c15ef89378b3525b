"""Shards on S3 (moto's ThreadedMotoServer on 127.0.0.1, through s3fs): tokenize, kill, resume."""

from __future__ import annotations

import pytest

from pipeline.config import JobConfig
from pipeline.driver import run_job
from pipeline.status import status
from schemas import Manifest, column_to_numpy
from tests import corpus
from tests.e2e.helpers import ids_by_key

pytestmark = pytest.mark.e2e


def _upload(fs, bucket: str, tmp_path, n_shards: int, per_shard: int, seed: int, broken: bool = False) -> None:
    fs.mkdir(bucket)
    for p in corpus.make_shards(tmp_path / "src", n_shards, per_shard, seed, broken=broken):
        fs.put_file(p, f"{bucket}/ds/{p.rsplit('/', 1)[1]}")


def _read_tables(fs, prefix: str) -> dict:
    import pyarrow.parquet as pq

    out = {}
    for path in sorted(fs.find(f"{prefix}/shards")):
        with fs.open(path, "rb") as f:
            out[path] = pq.read_table(f)
    return out


def test_tokenize_s3_prefix_and_resume(s3fs_client, s3_endpoint, ray_session, tiny_model_dir, tmp_path):
    fs = s3fs_client
    _upload(fs, "wintok-in", tmp_path, n_shards=4, per_shard=4, seed=31, broken=True)
    cfg = JobConfig(inputs=("s3://wintok-in/ds/{00000..00003}.tar",), output="s3://wintok-in/out",
                    model=tiny_model_dir, s3_endpoint_url=s3_endpoint, batch_size=4, decode_threads=2,
                    workers=2, progress=False, max_retries=1, retry_backoff=0.05)
    summary = run_job(cfg)
    assert summary.ok and summary.done == 4
    plan = corpus.shard_plan(4, 4, seed=31, broken=True)
    n_samples = sum(len(s) for s in plan)
    assert summary.images + summary.errors == n_samples
    tables = _read_tables(fs, "wintok-in/out")
    assert len(tables) == 4
    ids = ids_by_key(tables)
    assert len(ids) == summary.images
    m = Manifest.from_json(fs.cat_file("wintok-in/out/_manifest/00002.json").decode())
    assert m.input_etag and m.input_size == fs.info("wintok-in/ds/00002.tar")["size"]
    assert m.rows == tables["wintok-in/out/shards/00002.parquet"].num_rows
    # a lost commit: the rerun lists _manifest/ once and redoes only that shard
    fs.rm_file("wintok-in/out/_manifest/00001.json")
    again = run_job(cfg)
    assert again.done == 1 and again.skipped == 3
    st = status("s3://wintok-in/out", cfg_storage(cfg))
    assert st["shards_committed"] == 4 and st["images"] == summary.images
    assert column_to_numpy(tables["wintok-in/out/shards/00000.parquet"], "pixel_ids").dtype.name == "uint16"


def cfg_storage(cfg: JobConfig):
    from pipeline.driver import storage_options

    return storage_options(cfg)


def test_missing_s3_input_is_a_clear_failure(s3fs_client, s3_endpoint, ray_session, tiny_model_dir, tmp_path):
    fs = s3fs_client
    _upload(fs, "wintok-missing", tmp_path, n_shards=1, per_shard=2, seed=32)
    cfg = JobConfig(inputs=("s3://wintok-missing/ds/{00000..00001}.tar",), output="s3://wintok-missing/out",
                    model=tiny_model_dir, s3_endpoint_url=s3_endpoint, workers=1, progress=False,
                    max_retries=0)
    summary = run_job(cfg)
    assert summary.done == 1 and summary.failed == 1 and not summary.ok
    assert summary.failures["00001"].startswith("not_found")
    assert fs.exists("wintok-missing/out/_failed/00001.json")


def test_model_on_s3_is_fetched_once_per_machine(s3fs_client, s3_endpoint, ray_session, tiny_model_dir, tmp_path,
                                                  monkeypatch):
    fs = s3fs_client
    _upload(fs, "wintok-models", tmp_path, n_shards=1, per_shard=3, seed=33)
    fs.put(tiny_model_dir, "wintok-models/models/tiny", recursive=True)
    monkeypatch.setenv("WINTOK_CACHE", str(tmp_path / "cache"))
    cfg = JobConfig(inputs=("s3://wintok-models/ds/00000.tar",), output=str(tmp_path / "out"),
                    model="s3://wintok-models/models/tiny", s3_endpoint_url=s3_endpoint, workers=1,
                    progress=False)
    assert run_job(cfg).ok
    cached = list((tmp_path / "cache" / "models").glob("*/tiny/model.safetensors"))
    assert len(cached) == 1
    local = run_job(cfg.replace(output=str(tmp_path / "out-local"), model=tiny_model_dir))
    assert local.ok
    from tests.e2e.helpers import read_output

    a = ids_by_key(read_output(str(tmp_path / "out"))["rows"])
    b = ids_by_key(read_output(str(tmp_path / "out-local"))["rows"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
