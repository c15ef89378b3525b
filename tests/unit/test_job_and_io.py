"""Job files, flags, input expansion and output naming, schemas and the commit record."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.config import JobConfig, JobConfigError, load_job_file, resolve
from pipeline.io import InputError, Storage, expand_inputs
from pipeline.urls import shard_stems
from schemas import Manifest, TokenLayout, build_rows, column_to_numpy, read_metadata, tokens_schema
from schemas.manifest import FileRecord


def test_job_file_flags_override_and_unknown_keys(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("inputs: [a.tar, b.tar]\noutput: out\nmodel: m\nbatch-size: 32\nresize: squash\n")
    cfg = resolve(str(job), {"batch_size": 8, "model": None, "resize": None})
    assert cfg.inputs == ("a.tar", "b.tar") and cfg.batch_size == 8 and cfg.resize == "squash"
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [a.tar]\noutput: out\nbatchsize: 3\n")
    with pytest.raises(JobConfigError, match="unknown keys.*batchsize"):
        load_job_file(str(bad))
    with pytest.raises(JobConfigError, match="resize"):
        resolve(None, {"inputs": ("a",), "output": "o", "resize": "stretch"})
    with pytest.raises(JobConfigError, match="no inputs"):
        resolve(None, {"output": "o", "model": "m"})


def test_cli_user_mistakes_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [a.tar]\noutput: out\nnot_an_option: 1\n")
    assert cli_main(["tokenize", "--job", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wintok: error: unknown keys") and "\n" not in err
    assert cli_main(["tokenize", str(tmp_path / "nothing-*.tar"), str(tmp_path / "out"), "--model", "wintok-tiny",
                     "--no-progress"]) == 2
    assert "no input matches" in capsys.readouterr().err


def test_expand_inputs_braces_globs_lists(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "00000.tar").write_bytes(b"x")
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# a comment\n{tmp_path}/00002.tar\n\n{tmp_path}/sub/00000.tar\n")
    urls = expand_inputs([f"{tmp_path}/{{00000..00001}}.tar", f"{tmp_path}/*.tar", str(listing)])
    assert urls == [f"{tmp_path}/00000.tar", f"{tmp_path}/00001.tar", f"{tmp_path}/00002.tar",
                    f"{tmp_path}/sub/00000.tar"]
    assert shard_stems(urls) == ["00000", "00001", "00002", "sub/00000"]
    assert shard_stems(["s3://b/ds/part-7.tar", "s3://b/ds/part-8.tar"]) == ["part-7", "part-8"]
    with pytest.raises(InputError):
        expand_inputs([f"{tmp_path}/missing-*.tar"])


def test_storage_put_is_atomic_and_listing_is_fresh(tmp_path):
    st = Storage(str(tmp_path / "out"))
    assert st.list("_manifest") == []
    st.put_bytes(b"one", "_manifest/a.json")
    st.put_bytes(b"two", "_manifest/sub/b.json")
    assert st.list("_manifest") == ["a.json", "sub/b.json"]
    assert st.read_text("_manifest/a.json") == "one"
    assert not [p for p in (tmp_path / "out" / "_manifest").iterdir() if ".tmp" in p.name]


def test_schema_round_trip_with_tensor_columns():
    layout = TokenLayout(pixel_ids=(4, 2, 2), semantic_dim=3, teacher_dim=5)
    schema = tokens_schema(layout, {"model": "x"})
    ids = np.arange(2 * 16).reshape(2, 4, 2, 2)
    batch = build_rows(schema, {
        "key": ["a", "b"], "shard": ["s", "s"], "sample_index": [0, 2], "image_hash": [b"\x01" * 16] * 2,
        "width": [5, 6], "height": [7, 8], "pixel_ids": ids, "semantic_pooled": np.ones((2, 3)),
        "teacher_embedding": np.full((2, 5), 0.5), "text": ["t", None], "meta": [None, "{}"]})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_batches([batch]), buf)
    table = pq.read_table(pa.BufferReader(buf.getvalue()))
    t = table.schema.field("pixel_ids").type  # nested fixed-size lists, shape in the field metadata too
    assert (t.list_size, t.value_type.list_size, t.value_type.value_type.list_size) == (4, 2, 2)
    assert table.schema.field("pixel_ids").metadata == {b"wintok.shape": b"[4, 2, 2]"}
    np.testing.assert_array_equal(column_to_numpy(table, "pixel_ids"), ids.astype(np.uint16))
    assert column_to_numpy(table, "teacher_embedding").dtype == np.float16
    assert read_metadata(table.schema)["fingerprint"] == {"model": "x"}
    with pytest.raises(ValueError, match="pixel_ids"):
        build_rows(schema, {**{f.name: [] for f in schema}, "pixel_ids": np.zeros((1, 4, 3, 3))})


def test_manifest_json_round_trip():
    m = Manifest(stem="a/b", input_url="s3://x/a/b.tar", input_size=10, input_etag="e", samples=3, rows=2,
                 errors=1, shards_file=FileRecord("shards/a/b.parquet", 5, "ab", 2),
                 errors_file=FileRecord("errors/a/b.parquet", 4, "cd", 1), errors_by_reason={"empty": 1},
                 attempts=1, seconds=0.5, run_fingerprint="f")
    assert Manifest.from_json(m.to_json()) == m


def test_worker_shape_per_gpu_and_per_cpu():
    from pipeline.cluster import shape_for

    cfg = JobConfig(inputs=("a.tar",), output="o", model="wintok-tiny")
    gpu = shape_for(cfg, shards=100, cpus=128, gpus=8)  # an 8-GPU node: 16 CPUs per GPU
    assert (gpu.actors, gpu.num_gpus, gpu.decode_threads, gpu.decode_mode, gpu.torch_threads) == \
        (8, 1.0, 14, "processes", None)
    assert gpu.num_cpus == 14
    assert shape_for(cfg, shards=3, cpus=128, gpus=8).actors == 3  # never more actors than shards
    cpu = shape_for(cfg, shards=100, cpus=2, gpus=0)
    assert (cpu.actors, cpu.num_gpus, cpu.decode_threads, cpu.decode_mode, cpu.torch_threads) == \
        (1, 0.0, 2, "threads", 1)  # decoders + torch threads = the worker's 2 CPUs
    cpu16 = shape_for(cfg, shards=100, cpus=16, gpus=0)
    assert (cpu16.actors, cpu16.decode_threads, cpu16.torch_threads) == (4, 2, 2)
    forced = shape_for(cfg.replace(decode_mode="threads", decode_threads=6), shards=100, cpus=128, gpus=8)
    assert (forced.decode_mode, forced.decode_threads) == ("threads", 6)
    assert shape_for(cfg.replace(decode_mode="processes"), shards=1, cpus=2, gpus=0).decode_mode == "processes"
    assert shape_for(cfg.replace(device="cpu"), shards=100, cpus=128, gpus=8).num_gpus == 0.0
    with pytest.raises(JobConfigError, match="decode_mode"):
        cfg.replace(decode_mode="fork")


# ---- how the driver names a remote failure (Ray's own exception objects and texts)

_RAY_OOM_TEXT = (  # the shape of Ray 2.60's memory-monitor message, shortened
    "1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 10.0.0.5, ID: ab12) "
    "was 22.10GB used / 23.54GB limit (0.939)\n"
    "OOM kill reason: Memory usage 23730000000B exceeded threshold of 22360000000B (95.0% of 23540000000B limit)\n"
    "Object store memory usage: [- objects spillable: 0\n- bytes spillable: 0\n- objects errored: 0\n"
    "- bytes errored: 0\n]\nRay killed 1 worker(s) based on the killing policy\n"
    "Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/...\n"
)


def test_remote_failure_causes_are_one_useful_line():
    import ray.exceptions as rex

    from pipeline.pool import _cause_line, _start_death_cause
    from pipeline.pool import actor_failure as _actor_failure
    from pipeline.protocol import Reason, ShardTask

    line = _cause_line(_RAY_OOM_TEXT)
    assert line.startswith("1 worker(s) were killed due to the node running low on memory")
    assert "OOM kill reason: Memory usage" in line and "\n" not in line and "bytes errored" not in line
    oom = rex.OutOfMemoryError(_RAY_OOM_TEXT)
    assert _start_death_cause(oom) == "killed by Ray's memory monitor"
    failed = _actor_failure(ShardTask("s3://b/00001.tar", "00001", 1), oom)
    assert failed.reason is Reason.OOM and failed.error == line
    died = rex.ActorDiedError()  # a system-level death with no context
    assert _start_death_cause(died) == rex.ActorDiedError.BASE_ERROR_MSG
    assert not died.actor_init_failed
    text = ("The actor died unexpectedly before finishing this task.\n\tclass_name: TokenizeWorker\n"
            "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR ...")
    assert _cause_line(text) == "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR ..."


def test_actor_runtime_env_carries_no_storage_secrets(monkeypatch):
    """Ray writes an actor's runtime_env in plain text to its logs: WINTOK_S3_OPTIONS (credentials)
    must not be in it; the storage options reach the workers inside WorkerConfig."""
    from pipeline.worker import make_actor_class

    monkeypatch.setenv("WINTOK_S3_OPTIONS", '{"key": "K3YID", "secret": "S3CR3T"}')
    monkeypatch.setenv("WINTOK_S3_UPLOAD_CHUNKSIZE", "5242880")
    monkeypatch.setenv("WINTOK_FAILPOINTS", "decode@k=raise")
    monkeypatch.setenv("WINTOK_IO_RETRIES", "2")
    env = make_actor_class(0.0, 1.0)._default_options["runtime_env"]["env_vars"]
    assert "S3CR3T" not in repr(env) and "WINTOK_S3_OPTIONS" not in env
    assert env["WINTOK_FAILPOINTS"] == "decode@k=raise" and env["WINTOK_IO_RETRIES"] == "2"
