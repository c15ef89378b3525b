"""`wintok inspect` and `wintok reconstruct` on a real OUTPUT (local Ray run, saved tiny model)."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.driver import run_job
from pipeline.inspection import inspect_output
from pipeline.preprocess import PreprocessConfig, decode_image
from pipeline.reconstruct import reconstruct
from pipeline.shard.encode import to_model_input
from pipeline.status import OutputError
from tests import corpus
from tests.e2e.helpers import read_output, small_job
from wintok_model.checkpoint import load_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run(ray_session, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    a = corpus.good_images(5, seed=21, prefix="a")
    b = corpus.good_images(4, seed=22, prefix="b")
    b.append(("b-copy-of-a0", a[0][1], a[0][2]))  # the same image bytes under another key
    bad = corpus.broken_corpus()[:3]
    (tmp / "in").mkdir()
    corpus.write_tar(tmp / "in" / "00000.tar", a)
    corpus.write_tar(tmp / "in" / "00001.tar", b + bad)
    summary = run_job(small_job([str(tmp / "in" / "{00000..00001}.tar")], tmp / "out", tiny_model_dir))
    assert summary.ok
    return tmp, tiny_model_dir, a[0][0], {k: data for k, data, _ in a + b}


def test_inspect_counts_usage_and_duplicates(run):
    tmp, _, dup_key, _ = run
    out = read_output(str(tmp / "out"))
    report = inspect_output(str(tmp / "out"))
    d = report.to_dict()
    assert d["images"] == sum(m["rows"] for m in out["manifests"].values()) == report.rows_read == 10
    assert d["sample_errors"] == sum(m["errors"] for m in out["manifests"].values()) > 0
    assert d["shards_committed"] == 2 and report.shards_read == 2
    ids = np.concatenate([np.array(t.column("pixel_ids").to_pylist()) for t in out["rows"].values()])
    for g, row in enumerate(d["usage"]["pixel_ids"]):  # independent count per codebook
        values, counts = np.unique(ids[:, g], return_counts=True)
        p = counts / counts.sum()
        assert row["used"] == len(values) and row["codes"] == 256  # wintok-tiny: 1024 codes in 4 codebooks
        assert row["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), abs=0.01)
    assert d["duplicate_images"]["groups"] == 1
    (keys,) = report.duplicates.values()
    assert sorted(keys) == ["00000/" + dup_key, "00001/b-copy-of-a0"]
    assert any(c.startswith("pixel_ids") for c in d["schema"]) and d["fingerprint"]["model"]["sha256"]


def test_inspect_cli_writes_a_png(run, tmp_path, capsys):
    tmp, _, _, _ = run
    png = tmp_path / "usage.png"
    assert main(["inspect", str(tmp / "out"), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "pixel_ids[3]:" in text and "duplicate images (same image_hash): 1 groups, 2 rows" in text
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_reconstruct_matches_the_model_run_directly(run, tmp_path, capsys):
    tmp, model_dir, _, images = run
    result = reconstruct(str(tmp / "out"), model_dir, n=6)
    assert len(result.keys) == 6 and all(o is not None for o in result.originals) and not result.unreachable
    # independently: decode the source image, run encoder + decoder in one go, compare
    net = load_model(model_dir).eval()
    cfg = PreprocessConfig(image_size=net.config.image_size)
    for key, orig, rec, p in zip(result.keys, result.originals, result.recon, result.psnr, strict=True):
        pixels = decode_image(images[key], cfg).pixels
        np.testing.assert_array_equal(orig, pixels)
        with torch.inference_mode():
            x = net.img_to_reconstructed_img(to_model_input(torch.from_numpy(pixels[None])))
        direct = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        assert np.abs(direct.astype(int) - rec.astype(int)).max() <= 1
        mse = np.mean((pixels.astype(float) - rec.astype(float)) ** 2)
        assert p == pytest.approx(10 * np.log10(255 ** 2 / mse))
    png = tmp_path / "grid.png"
    assert main(["reconstruct", str(tmp / "out"), "--model", model_dir, "--n", "6", "-o", str(png)]) == 0
    assert "mean PSNR" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.format == "PNG"


def test_reconstruct_refuses_another_model_in_one_line(run, tmp_path, capsys):
    tmp, _, _, _ = run
    with pytest.raises(OutputError, match="not the model this OUTPUT was tokenized with"):
        reconstruct(str(tmp / "out"), "wintok-tiny")
    assert main(["reconstruct", str(tmp / "out"), "--model", "wintok-tiny", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_reconstruct_without_the_sources_still_draws_the_grid(run, tmp_path):
    tmp, model_dir, _, images = run
    out = tmp_path / "out"
    shutil.copytree(tmp / "out", out)
    moved = tmp_path / "moved"
    shutil.copytree(tmp / "in", moved)
    shutil.rmtree(tmp / "in")
    try:
        result = reconstruct(str(out), model_dir, n=3)
    finally:
        shutil.copytree(moved, tmp / "in")
    assert result.originals == [None] * 3 and result.mean_psnr is None and len(result.unreachable) == 1
    assert pq.read_table(out / "shards" / "00000.parquet").num_rows == 5
