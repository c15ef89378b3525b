"""`wintok download` (img2dataset) from a local HTTP server into shards on moto S3, then tokenize them:
captions and img2dataset's metadata in the rows, every dead or broken URL in its stats."""

from __future__ import annotations

import csv
import importlib.util
import json
import time

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.driver import run_job
from tests.e2e.helpers import small_job
from tests.http_images import image_files, serve

# found, not imported: importing img2dataset pulls in albumentations, which checks for updates online
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(importlib.util.find_spec("img2dataset") is None,
                                                  reason="needs the ingest extra (img2dataset)")]


def test_download_to_s3_then_tokenize_carries_captions_and_metadata(s3fs_client, s3_endpoint, ray_session,
                                                                     tiny_model_dir, tmp_path, capsys):
    fs = s3fs_client
    fs.mkdir("wintok-dl")
    files = image_files()
    with serve(files) as base:
        good = {f"{base}/{n}": n for n in files if n != "broken.jpg"}
        rows = [(f"{base}/{n}", f"a picture named {n}") for n in files] + \
               [(f"{base}/gone{i}.jpg", "dead") for i in range(2)]
        with open(tmp_path / "urls.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            w.writerows(rows)
        t0 = time.monotonic()
        status = main(["download", str(tmp_path / "urls.csv"), "s3://wintok-dl/shards", "--caption-col", "caption",
                       "--processes", "1", "--threads", "4", "--samples-per-shard", "5", "--timeout", "5",
                       "--s3-endpoint-url", s3_endpoint, "--json"])
        seconds = time.monotonic() - t0
    out = capsys.readouterr().out
    assert status == 0, out
    summary = json.loads(out[out.index("{"):])
    print(f"img2dataset: {len(rows)} URLs in {seconds:.1f} s (processes=1, threads=4)")
    assert summary["urls"] == len(rows) and summary["downloaded"] == len(good)
    assert summary["failures"] == {"HTTP Error 404: Not Found": 2, "Image decoding error": 1}
    assert summary["shards"] == 2 == len(fs.glob("wintok-dl/shards/*_stats.json"))
    assert fs.glob("wintok-dl/shards/*.parquet")  # img2dataset's own per-shard tables are kept

    cfg = small_job(["s3://wintok-dl/shards/*.tar"], "s3://wintok-dl/tokens", tiny_model_dir,
                    s3_endpoint_url=s3_endpoint)
    result = run_job(cfg)
    assert result.ok and result.done == 2 and result.errors == 0 and result.images == len(good)
    got = []
    for path in fs.find("wintok-dl/tokens/shards"):
        with fs.open(path, "rb") as f:
            got += pq.read_table(f, columns=["key", "text", "meta"]).to_pylist()
    metas = [json.loads(r["meta"]) for r in got]
    assert sorted(m["url"] for m in metas) == sorted(good)
    assert all(m["status"] == "success" and m["width"] and m["height"] for m in metas)
    assert all(r["text"] == f"a picture named {good[m['url']]}" for r, m in zip(got, metas, strict=True))
    assert all(r["key"] == m["key"] for r, m in zip(got, metas, strict=True))
