"""`wintok verify --repair` on a real OUTPUT: damaged shards are un-committed and a plain rerun
redoes exactly those, leaving the other shards' commits untouched."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.cli import main
from tests import corpus

pytestmark = pytest.mark.e2e


def test_verify_repair_then_rerun_redoes_exactly_the_damaged_shards(tmp_path, ray_session, tiny_model_dir,
                                                                     capsys):
    corpus.make_shards(tmp_path / "in", n_shards=4, per_shard=3, seed=21)
    out = str(tmp_path / "out")
    cmd = ["tokenize", f"{tmp_path}/in/{{00000..00003}}.tar", out, "--model", tiny_model_dir,
           "--workers", "1", "--batch-size", "2", "--max-retries", "0", "--no-progress", "--json"]
    assert main(cmd) == 0
    capsys.readouterr()
    mdir = tmp_path / "out" / "_manifest"
    with open(tmp_path / "out" / "shards" / "00001.parquet", "r+b") as f:   # a cut-short upload
        f.truncate(os.path.getsize(f.name) // 2)
    (mdir / "00002.json").write_text((mdir / "00002.json").read_text()[:40])  # a cut-short manifest
    untouched = {n: os.stat(mdir / f"{n}.json").st_mtime_ns for n in ("00000", "00003")}

    assert main(["verify", out]) == 1
    text = capsys.readouterr().out
    problems = [ln for ln in text.splitlines() if ln.startswith("PROBLEM")]
    assert any("shards/00001.parquet: size/sha256 differ" in p for p in problems), text
    assert any("_manifest/00002.json: unreadable manifest: not JSON" in p for p in problems), text
    assert all("00001" in p or "00002" in p for p in problems), text

    assert main(["verify", out, "--repair"]) == 1
    text = capsys.readouterr().out
    removed = {ln.split()[1] for ln in text.splitlines() if ln.startswith("removed ")}
    assert {"_manifest/00001.json", "shards/00001.parquet", "_manifest/00002.json",
            "shards/00002.parquet"} <= removed, text
    assert all("00001" in r or "00002" in r for r in removed)

    assert main(cmd) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_done"] == 2 and summary["shards_skipped"] == 2
    assert {n: os.stat(mdir / f"{n}.json").st_mtime_ns for n in ("00000", "00003")} == untouched
    assert main(["verify", out]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "clean"
    from tests.e2e.helpers import record

    record("damaged commits", "a truncated Parquet file and a cut manifest in 2 of 4 shards",
           "verify reported both; --repair un-committed them; the rerun redid exactly those 2", "1 + rerun",
           0, 0, "-")
