"""More input kinds for tokenize: image folders and Parquet files (pipeline/inputs.py, shard/folder.py,
shard/parquet.py), through the shard processor without Ray. Real files, the tiny preset."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.io import StorageOptions
from pipeline.plan import input_fingerprint, plan
from pipeline.protocol import Reason, ShardTask
from pipeline.shard.encode import ModelSpec
from pipeline.shard.processor import ShardProcessor, WorkerConfig
from pipeline.shard.sources import ParquetColumns
from schemas import SCHEMA_VERSION, column_to_numpy
from tests import corpus

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = ShardProcessor(WorkerConfig(output=str(out), batch_size=4, decode_threads=1,
                                       model=ModelSpec(model="wintok-tiny", device="cpu"),
                                       parquet=ParquetColumns(key="id", text="caption", meta="info"),
                                       fingerprint={"schema_version": SCHEMA_VERSION}))
    proc.out = out
    yield proc
    proc.close()


def _job(inputs, **kw) -> JobConfig:
    return JobConfig(inputs=tuple(str(i) for i in inputs), output="/unused", model="wintok-tiny", **kw)


def _read(out, stem: str) -> tuple[pa.Table, pa.Table | None]:
    rows = pq.read_table(out / "shards" / f"{stem}.parquet")
    err = out / "errors" / f"{stem}.parquet"
    return rows, pq.read_table(err) if err.exists() else None


def _ids_by_hash(table: pa.Table) -> dict[bytes, list]:
    ids = column_to_numpy(table, "pixel_ids")
    return {h: v.tolist() for h, v in zip(table.column("image_hash").to_pylist(), ids, strict=True)}


def test_folder_units_are_sorted_with_sidecars_and_stems_do_not_depend_on_creation_order(tmp_path):
    corpus.write_image_folder(tmp_path / "one" / "imgs")
    # the same files written in the opposite order
    src = tmp_path / "one" / "imgs"
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for p in reversed(files):
        dest = tmp_path / "two" / "imgs" / p.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    tasks = plan(_job([src], folder_unit_files=3), StorageOptions())
    again = plan(_job([tmp_path / "two" / "imgs"], folder_unit_files=3), StorageOptions())
    assert [(t.stem, t.files) for t in tasks] == [(t.stem, t.files) for t in again]
    assert [t.stem for t in tasks] == ["00000", "00001", "00002"]
    assert {t.kind for t in tasks} == {"folder"} and tasks[0].url == str(src)
    rels = [f.rel for t in tasks for f in t.files]
    assert rels == sorted(rels) and len(rels) == 9  # 7 images, the broken JPEG, notes.md; no sidecar
    by_rel = {f.rel: f for t in tasks for f in t.files}
    first = next(f for rel, f in by_rel.items() if rel.startswith("a/000000."))
    assert (first.text, first.meta) == ("a/000000.txt", "a/000000.json")
    assert not any(r.endswith((".txt", ".json")) for r in rels)
    assert sum(f.meta is not None for f in by_rel.values()) == 3
    # a folder beside a tar: both keep distinct, deterministic names
    (tar,) = corpus.make_shards(tmp_path / "one", 1, 2, seed=3)
    mixed = plan(_job([tar, src], folder_unit_files=4), StorageOptions())
    assert [t.stem for t in mixed] == ["00000", "imgs/00000", "imgs/00001", "imgs/00002"]
    assert input_fingerprint(_job([src], folder_unit_files=4), mixed) == {"inputs": {"folder_unit_files": 4}}
    assert input_fingerprint(_job([tar]), mixed[:1]) == {}  # tar-only runs keep their fingerprint


def test_folder_unit_gives_a_row_or_an_error_for_every_file(tmp_path, processor):
    images = corpus.write_image_folder(tmp_path / "imgs")
    (task,) = plan(_job([tmp_path / "imgs"], folder_unit_files=100), StorageOptions())
    res = processor.process(ShardTask(task.url, "folder-all", 1, kind="folder", files=task.files))
    assert res.ok, res.error
    rows, errors = _read(processor.out, "folder-all")
    assert sorted(rows.column("key").to_pylist()) == sorted(images)
    got = {r["key"]: r for r in rows.select(["key", "text", "meta", "shard"]).to_pylist()}
    assert all(r["shard"] == str(tmp_path / "imgs") for r in got.values())
    assert sum(r["text"] is not None for r in got.values()) == 4
    assert all(r["text"] == f"caption {os.path.basename(k).split('.')[0]}" for k, r in got.items() if r["text"])
    assert sum(r["meta"] is not None for r in got.values()) == 3
    reasons = dict(zip(errors.column("key").to_pylist(), errors.column("reason").to_pylist(), strict=True))
    assert reasons["notes.md"] == "no_image" and reasons["b/broken.jpg"] != "no_image"
    assert rows.num_rows + errors.num_rows == len(task.files)
    # the same images in a tar give the same tokens
    tar = tmp_path / "same.tar"
    corpus.write_tar(tar, [(rel.rsplit(".", 1)[0], data, rel.rsplit(".", 1)[1]) for rel, data in images.items()])
    assert processor.process(ShardTask(str(tar), "folder-as-tar", 1)).ok
    assert _ids_by_hash(_read(processor.out, "folder-as-tar")[0]) == _ids_by_hash(rows)


def test_file_gone_since_the_listing_is_an_error_record(tmp_path, processor):
    corpus.write_image_folder(tmp_path / "imgs")
    (task,) = plan(_job([tmp_path / "imgs"], folder_unit_files=100), StorageOptions())
    gone = task.files[1].rel
    os.unlink(tmp_path / "imgs" / gone)
    res = processor.process(ShardTask(task.url, "folder-gone", 1, kind="folder", files=task.files))
    assert res.ok, res.error
    _, errors = _read(processor.out, "folder-gone")
    assert dict(zip(errors.column("key").to_pylist(), errors.column("reason").to_pylist(),
                    strict=True))[gone] == "missing_file"


def _parquet_rows(n: int, seed: int) -> tuple[list, dict]:
    imgs = corpus.good_images(n, seed=seed)
    return imgs, {"id": [k for k, _, _ in imgs], "caption": [f"caption {k}" for k, _, _ in imgs],
                  "info": [{"i": i} for i in range(n)]}


@pytest.mark.parametrize("layout", ["struct", "binary"])
def test_parquet_image_column_struct_or_binary_gives_the_tokens_of_the_same_tar(tmp_path, processor, layout):
    imgs, cols = _parquet_rows(7, seed=4)
    if layout == "struct":
        image = pa.array([{"bytes": d, "path": f"{k}.{e}"} for k, d, e in imgs], IMAGE_STRUCT)
    else:
        image = pa.array([d for _, d, _ in imgs], pa.binary())
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"image": image, **cols}), path, row_group_size=3)
    (task,) = plan(_job([path]), StorageOptions())
    assert (task.kind, task.stem) == ("parquet", "part")
    res = processor.process(ShardTask(task.url, f"pq-{layout}", 1, kind="parquet"))
    assert res.ok, res.error
    rows, errors = _read(processor.out, f"pq-{layout}")
    assert errors is None and rows.column("key").to_pylist() == cols["id"]
    assert rows.column("sample_index").to_pylist() == list(range(7))
    assert rows.column("text").to_pylist() == cols["caption"]
    assert [json.loads(m) for m in rows.column("meta").to_pylist()] == cols["info"]
    corpus.write_tar(tmp_path / "same.tar", imgs)
    assert processor.process(ShardTask(str(tmp_path / "same.tar"), f"pq-tar-{layout}", 1)).ok
    assert _ids_by_hash(_read(processor.out, f"pq-tar-{layout}")[0]) == _ids_by_hash(rows)


def test_parquet_written_by_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = corpus.good_images(5, seed=6)
    # encoded bytes as they are (a PIL image would be re-encoded), plus one row that only names a file
    (tmp_path / "elsewhere.png").write_bytes(imgs[0][1])
    image = [{"bytes": d, "path": f"{k}.{e}"} for k, d, e in imgs] + [{"bytes": None, "path": str(tmp_path / "elsewhere.png")}]
    ds = datasets.Dataset.from_dict({"image": image, "text": [f"t{k}" for k, _, _ in imgs] + ["path only"]})
    ds = ds.cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    proc = ShardProcessor(WorkerConfig(output=str(tmp_path / "out"), batch_size=4, decode_threads=1,
                                       model=ModelSpec(model="wintok-tiny", device="cpu"),
                                       parquet=ParquetColumns(text="text"),
                                       fingerprint={"schema_version": SCHEMA_VERSION}))
    try:
        res = proc.process(ShardTask(str(tmp_path / "hf.parquet"), "hf", 1, kind="parquet"))
    finally:
        proc.close()
    assert res.ok, res.error
    rows = pq.read_table(tmp_path / "out" / "shards" / "hf.parquet")
    errors = pq.read_table(tmp_path / "out" / "errors" / "hf.parquet")
    assert errors.column("reason").to_pylist() == ["no_image"] and "only a path" in errors.column("error")[0].as_py()
    assert rows.column("key").to_pylist() == [f"{i:08d}" for i in range(5)]
    assert rows.column("text").to_pylist() == [f"t{k}" for k, _, _ in imgs]
    from pipeline.shard.decode import image_hash

    assert rows.column("image_hash").to_pylist() == [image_hash(d) for _, d, _ in imgs]


def _corrupt_row_group(src, dest, rg: int) -> None:
    data = bytearray(src.read_bytes())
    off = pq.ParquetFile(src).metadata.row_group(rg).column(0).data_page_offset
    data[off:off + 24] = b"\xff" * 24  # the page header: not thrift any more
    dest.write_bytes(bytes(data))


def test_damaged_parquet_gives_error_records_or_a_permanent_failure(tmp_path, processor):
    imgs, cols = _parquet_rows(9, seed=8)
    image = pa.array([{"bytes": d, "path": None} for _, d, _ in imgs], IMAGE_STRUCT)
    image = pa.array([None if i == 7 else v for i, v in enumerate(image.to_pylist())], IMAGE_STRUCT)
    cols["id"][8] = cols["id"][0]  # a key used twice
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"image": image, **cols}), good, row_group_size=3)
    _corrupt_row_group(good, tmp_path / "bad.parquet", 1)
    res = processor.process(ShardTask(str(tmp_path / "bad.parquet"), "pq-bad", 1, kind="parquet"))
    assert res.ok, res.error
    rows, errors = _read(processor.out, "pq-bad")
    assert rows.column("sample_index").to_pylist() == [0, 1, 2, 6]
    assert dict(zip(errors.column("sample_index").to_pylist(), errors.column("reason").to_pylist(), strict=True)) \
        == {3: "row_group_unreadable", 4: "row_group_unreadable", 5: "row_group_unreadable", 7: "no_image",
            8: "duplicate_key"}
    # not Parquet at all, or without the image column: the unit fails at once, with a reason that says so
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not a parquet file")
    junk = processor.process(ShardTask(str(tmp_path / "junk.parquet"), "pq-junk", 1, kind="parquet"))
    assert junk.reason is Reason.SHARD_READ and "not a readable Parquet file" in junk.error
    pq.write_table(pa.table({"picture": image}), tmp_path / "other.parquet")
    other = processor.process(ShardTask(str(tmp_path / "other.parquet"), "pq-other", 1, kind="parquet"))
    assert other.reason is Reason.SHARD_READ and "no image column 'image'" in other.error
    assert not (processor.out / "_manifest" / "pq-junk.json").exists()


def test_input_kind_auto_rules(tmp_path):
    from pipeline.inputs import input_kind

    (tmp_path / "imgs").mkdir()
    cases = {str(tmp_path / "imgs"): "folder", str(tmp_path / "missing"): "tar", "s3://b/x/00001.tar": "tar",
             "s3://b/x/00001.tar.gz": "tar", "s3://b/x/part-0.parquet": "parquet", "s3://b/photos/": "folder",
             "s3://b/shard-without-ext": "tar", "https://host/dir/": "tar", f"file://{tmp_path}/imgs": "folder"}
    assert {u: input_kind(u, "auto") for u in cases} == cases
    assert input_kind("s3://b/photos", "folder") == "folder"
    assert input_kind(str(tmp_path / "imgs"), "webdataset") == "tar"


def test_a_folder_of_shards_is_not_taken_for_an_image_folder(tmp_path):
    from pipeline.io import InputError

    corpus.make_shards(tmp_path / "dl", 2, 2, seed=3)
    (tmp_path / "dl" / "00000_stats.json").write_text("{}")
    with pytest.raises(InputError, match=r"holds no images but 2 shard file\(s\).*dl/\*\.tar"):
        plan(_job([tmp_path / "dl"]), StorageOptions())
