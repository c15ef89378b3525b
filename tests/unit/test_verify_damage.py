"""`wintok verify` catches each kind of damage on its own.

An OUTPUT is committed by the real ShardSink (real Parquet, real manifests, a `_run.json`
with the fingerprint digest). Each test then damages one shard the way a buggy writer or a
bad merge would: the Parquet file is rewritten with pyarrow (same schema and metadata) and the
manifest's size and sha256 are updated to match, so the file-integrity check passes and only
the check under test can notice. Each damage must be reported as exactly that problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.io import Storage
from pipeline.layout import RUN_FILE, manifest_rel
from pipeline.shard.sink import ShardSink
from pipeline.verify import verify
from schemas import Manifest, TokenLayout, fingerprint_digest, tokens_schema

FINGERPRINT = {"model": {"name": "test"}, "preprocess": {"image_size": 8}}
LAYOUT = TokenLayout(pixel_ids=(4, 2, 2), semantic_dim=3)
# shard 00000: 8 samples, samples 2 and 5 are errors; shard 00001: 3 samples, no errors
ERRORS = {2: "truncated", 5: "unidentified"}


def _commit(storage: Storage, stem: str, samples: int, errors: dict[int, str], tmp: str) -> None:
    digest = fingerprint_digest(FINGERPRINT)
    w = ShardSink(storage, stem, f"/data/{stem}.tar", tokens_schema(LAYOUT, FINGERPRINT), FINGERPRINT,
                    row_group_rows=3, tmp_root=tmp)
    rng = np.random.default_rng(int(stem))
    good = [i for i in range(samples) if i not in errors]
    for i in range(samples):
        if i in errors:
            w.add_error(f"s{stem}_{i:03d}", i, "decode", errors[i], f"{errors[i]}: damaged on purpose")
    for start in range(0, len(good), 2):  # batches of two, as a worker adds them
        idx = good[start:start + 2]
        w.add_rows({
            "key": [f"s{stem}_{i:03d}" for i in idx], "shard": [f"/data/{stem}.tar"] * len(idx),
            "sample_index": idx, "image_hash": [hashlib.blake2b(bytes([i]), digest_size=16).digest() for i in idx],
            "width": [8] * len(idx), "height": [8] * len(idx),
            "pixel_ids": rng.integers(0, 1024, (len(idx), 4, 2, 2)), "semantic_pooled": rng.normal(size=(len(idx), 3)),
            "text": [None] * len(idx), "meta": [None] * len(idx)})
    w.commit(input_size=1000, input_etag=None, attempts=1, seconds=0.1, run_fingerprint=digest)
    w.cleanup()


@pytest.fixture()
def output(tmp_path) -> str:
    out = str(tmp_path / "out")
    storage = Storage(out)
    storage.put_bytes(json.dumps({"fingerprint_sha256": fingerprint_digest(FINGERPRINT),
                                  "fingerprint": FINGERPRINT}).encode(), RUN_FILE)
    os.makedirs(tmp_path / "tmp")
    _commit(storage, "00000", 8, ERRORS, str(tmp_path / "tmp"))
    _commit(storage, "00001", 3, {}, str(tmp_path / "tmp"))
    report = verify(out)
    assert report.clean(strict=True), report.render()
    assert (report.shards_checked, report.rows, report.errors) == (2, 9, 2)
    return out


def _manifest(out: str, stem: str) -> Manifest:
    with open(os.path.join(out, manifest_rel(stem))) as f:
        return Manifest.from_json(f.read())


def _save_manifest(out: str, m: Manifest) -> None:
    with open(os.path.join(out, manifest_rel(m.stem)), "w") as f:
        f.write(m.to_json())


def _rewrite(out: str, stem: str, which: str, edit, **manifest_changes) -> Manifest:
    """Rewrite shards/ (which="shards_file") or errors/ (which="errors_file") of `stem` with
    edit(table) -> table, keep the schema and its metadata, and record the new file's size, sha256
    and row count in the manifest (plus `manifest_changes`), so that the file matches its manifest."""
    m = _manifest(out, stem)
    rec = getattr(m, which)
    path = os.path.join(out, rec.path)
    table = pq.read_table(path)
    new = edit(table)
    assert new.schema.equals(table.schema, check_metadata=True)
    pq.write_table(new, path, compression="zstd")
    data = open(path, "rb").read()
    rec = dataclasses.replace(rec, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), rows=new.num_rows)
    m = dataclasses.replace(m, **{which: rec}, **manifest_changes)
    _save_manifest(out, m)
    return m


def _only_problem(out: str, needle: str) -> str:
    report = verify(out)
    assert not report.clean(), "verify missed the damage"
    assert len(report.problems) == 1, report.problems
    assert needle in report.problems[0], report.problems
    assert "00000" in report.problems[0]
    return report.problems[0]


def _set_key(table: pa.Table, row: int, key: str) -> pa.Table:
    keys = table.column("key").to_pylist()
    keys[row] = key
    return table.set_column(table.schema.get_field_index("key"), table.schema.field("key"),
                            pa.array(keys, pa.string()))


def test_duplicated_row_breaks_exactly_once(output):
    """A row written twice (under a fresh key, so only the sample accounting can tell): one sample
    index appears twice. Counts are made consistent (manifest rows and samples + 1)."""
    m = _manifest(output, "00000")

    def dup(t: pa.Table) -> pa.Table:
        again = _set_key(t.slice(1, 1), 0, "s00000_copy")
        return pa.concat_tables([t, again])

    _rewrite(output, "00000", "shards_file", dup, rows=m.rows + 1, samples=m.samples + 1)
    problem = _only_problem(output, "not accounted for exactly once")
    assert "1 duplicates" in problem
    assert cli_main(["verify", output]) == 1


def test_sample_both_a_row_and_an_error_breaks_exactly_once(output):
    """An error record for a sample that is also a row (its index once in each file)."""
    m = _manifest(output, "00000")

    def add_error(t: pa.Table) -> pa.Table:
        extra = pa.Table.from_pylist([{"key": "s00000_000", "shard": "/data/00000.tar", "sample_index": 0,
                                       "stage": "model", "reason": "x", "error": "x"}], schema=t.schema)
        return pa.concat_tables([t, extra])

    _rewrite(output, "00000", "errors_file", add_error, errors=m.errors + 1, samples=m.samples + 1)
    _only_problem(output, "not accounted for exactly once")


def test_dropped_row_breaks_exactly_once(output):
    """A row lost (the manifest's row count lowered to match): one sample index is missing."""
    m = _manifest(output, "00000")
    _rewrite(output, "00000", "shards_file", lambda t: pa.concat_tables([t.slice(0, 3), t.slice(4)]),
             rows=m.rows - 1)
    problem = _only_problem(output, "not accounted for exactly once")
    assert f"{m.samples - 1} of {m.samples} indices" in problem


def test_duplicate_key_is_reported(output):
    """Two rows with one key but distinct sample indices: counts and indices are all right."""
    _rewrite(output, "00000", "shards_file", lambda t: _set_key(t, 3, t.column("key")[0].as_py()))
    _only_problem(output, "duplicate keys")


def test_file_row_count_differs_from_its_record(output):
    """The data file's record says one row more than the file holds (everything else consistent)."""
    m = _manifest(output, "00000")
    _save_manifest(output, dataclasses.replace(m, shards_file=dataclasses.replace(m.shards_file,
                                                                                  rows=m.shards_file.rows + 1)))
    problem = _only_problem(output, "rows, manifest says")
    assert problem.startswith("shards/00000.parquet: 6 rows, manifest says 7")


def test_manifest_row_and_error_counts_are_checked(output):
    """rows/errors in the manifest wrong (their sum still = samples, so the accounting holds)."""
    m = _manifest(output, "00000")
    _save_manifest(output, dataclasses.replace(m, rows=m.rows + 1, errors=m.errors - 1))
    problem = _only_problem(output, "differ from the manifest")
    assert "[6, 2]" in problem and "(7, 1)" in problem
    assert cli_main(["verify", output]) == 1
