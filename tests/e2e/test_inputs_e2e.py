"""Image folders as tokenize inputs, end to end on a local Ray: local and on S3 (moto), resume."""

from __future__ import annotations

import os

import pytest

from pipeline.driver import run_job
from tests import corpus
from tests.e2e.helpers import file_states, ids_by_key, read_output, small_job

pytestmark = pytest.mark.e2e


def test_folder_end_to_end_with_sidecars_and_resume(ray_session, tiny_model_dir, tmp_path):
    images = corpus.write_image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    cfg = small_job([str(tmp_path / "imgs")], out, tiny_model_dir, folder_unit_files=4)
    summary = run_job(cfg)
    assert summary.ok and summary.done == 3, summary.render()
    got = read_output(str(out))
    assert sorted(got["manifests"]) == ["00000", "00001", "00002"]
    ids = ids_by_key(got["rows"])
    assert sorted(ids) == sorted(images)  # every good image once, keyed by its relative path
    errors = {k: r for t in got["errors"].values()
              for k, r in zip(t.column("key").to_pylist(), t.column("reason").to_pylist(), strict=True)}
    assert set(errors) == {"notes.md", "b/broken.jpg"} and errors["notes.md"] == "no_image"
    assert summary.images + summary.errors == len(images) + 2
    texts = {k: v for t in got["rows"].values()
             for k, v in zip(t.column("key").to_pylist(), t.column("text").to_pylist(), strict=True)}
    assert texts["a/" + next(r for r in os.listdir(tmp_path / "imgs" / "a") if r.startswith("000000.")
                             and not r.endswith((".txt", ".json")))] == "caption 000000"
    m = got["manifests"]["00001"]
    assert m["input_url"] == str(tmp_path / "imgs") and m["samples"] == 4 and len(m["input_etag"]) == 64
    # a second run does nothing: every unit is committed, not a file of OUTPUT is touched
    before = file_states(str(out))
    again = run_job(cfg)
    assert again.ok and again.done == 0 and again.skipped == 3
    assert file_states(str(out)) == before
    # a lost commit: exactly that unit again, the same rows
    os.unlink(out / "_manifest" / "00001.json")
    third = run_job(cfg)
    assert third.done == 1 and third.skipped == 2
    assert ids_by_key(read_output(str(out))["rows"]).keys() == ids.keys()


def test_folder_and_parquet_on_s3_give_the_stems_and_tokens_of_local_inputs(s3fs_client, s3_endpoint, ray_session,
                                                                      tiny_model_dir, tmp_path):
    fs = s3fs_client
    corpus.write_image_folder(tmp_path / "imgs", n=5, seed=9)
    fs.mkdir("wintok-folder")
    for d, _, files in os.walk(tmp_path / "imgs"):
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), tmp_path / "imgs")
            fs.put_file(os.path.join(d, name), f"wintok-folder/imgs/{rel}")
    # a Parquet file beside the folder, in the same run: each kind keeps its own names
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = corpus.good_images(3, seed=10)
    with fs.open("wintok-folder/p/part.parquet", "wb") as f:
        pq.write_table(pa.table({"image": pa.array([{"bytes": d, "path": None} for _, d, _ in imgs],
                                                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}),
                       f, row_group_size=2)
    local = run_job(small_job([str(tmp_path / "imgs")], tmp_path / "local", tiny_model_dir, folder_unit_files=3))
    remote_cfg = small_job(["s3://wintok-folder/imgs/", "s3://wintok-folder/p/part.parquet"],
                           "s3://wintok-folder/out", tiny_model_dir, folder_unit_files=3, s3_endpoint_url=s3_endpoint)
    remote = run_job(remote_cfg)
    assert local.ok and remote.ok and local.done == 3 and remote.done == 4
    assert (remote.images, remote.errors) == (local.images + 3, local.errors) == (8, 2)
    names = sorted(p.split("/_manifest/", 1)[1] for p in fs.find("wintok-folder/out/_manifest"))
    assert names == ["imgs/" + n for n in sorted(os.listdir(tmp_path / "local" / "_manifest"))] + ["p/part.json"]
    tables = {}
    for path in fs.find("wintok-folder/out/shards/imgs"):
        with fs.open(path, "rb") as f:
            tables[path] = pq.read_table(f)
    remote_ids = ids_by_key(tables)
    local_ids = ids_by_key(read_output(str(tmp_path / "local"))["rows"])
    assert remote_ids.keys() == local_ids.keys()
    assert all((remote_ids[k] == local_ids[k]).all() for k in local_ids)
    with fs.open("wintok-folder/out/shards/p/part.parquet", "rb") as f:
        assert pq.read_table(f).column("key").to_pylist() == ["00000000", "00000001", "00000002"]
    assert run_job(remote_cfg).skipped == 4  # resume on S3: nothing to do


def test_parquet_columns_chosen_by_flags_end_to_end(ray_session, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cli import _job_from_args, build_parser

    imgs = corpus.good_images(6, seed=12)
    table = pa.table({"jpg": pa.array([d for _, d, _ in imgs] + [None], pa.binary()),
                      "name": [f"img-{k}" for k, _, _ in imgs] + ["empty"],
                      "cap": [f"caption {k}" for k, _, _ in imgs] + [None]})
    (tmp_path / "in").mkdir()
    for part in (0, 1):
        pq.write_table(table, tmp_path / "in" / f"part-{part}.parquet", row_group_size=4)
    args = build_parser().parse_args(["tokenize", str(tmp_path / "in" / "*.parquet"), str(tmp_path / "out"),
                                      "--model", tiny_model_dir, "--image-column", "jpg", "--key-column", "name",
                                      "--text-column", "cap", "--workers", "1", "--batch-size", "4",
                                      "--no-progress"])
    cfg = _job_from_args(args, teacher_only=False)
    summary = run_job(cfg)
    assert summary.ok and summary.done == 2 and (summary.images, summary.errors) == (12, 2)
    got = read_output(str(tmp_path / "out"))
    assert sorted(got["manifests"]) == ["part-0", "part-1"]
    rows = got["rows"]["part-1"].select(["key", "text"]).to_pylist()
    assert rows == [{"key": f"img-{k}", "text": f"caption {k}"} for k, _, _ in imgs]
    assert got["errors"]["part-0"].column("key").to_pylist() == ["empty"]
    import json

    run = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert run["fingerprint"]["inputs"]["parquet_columns"] == {"image": "jpg", "key": "name", "text": "cap",
                                                               "meta": None}
