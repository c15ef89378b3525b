"""`wintok demo` end to end: its output, and one speed figure with one definition."""

from __future__ import annotations

import re

import pytest

from pipeline.demo import run_demo

pytestmark = pytest.mark.e2e
SPEED = re.compile(r"[\d.]+ (img/s|samples/s|images tokenized per worker-second|img/s per worker-second)")


def test_demo_prints_one_speed_figure(tmp_path, ray_session, capsys):
    pytest.importorskip("skimage")
    assert run_demo(str(tmp_path / "demo"), workers=1) == 0
    out = capsys.readouterr().out
    figures = SPEED.findall(out)
    assert figures == ["img/s"], out
    m = re.search(r"throughput: ([\d.]+) img/s \(images tokenized per second of wall time\) over ([\d.]+) s", out)
    counts = re.search(r"images: (\d+) tokenized, (\d+) sample errors", out)
    images, errors = int(counts.group(1)), int(counts.group(2))
    assert m and images > 0 and errors == 2  # the demo's two broken samples: not images, not counted
    assert float(m.group(1)) == pytest.approx(images / float(m.group(2)), rel=0.02, abs=0.02)
    # the Quickstart's demo ends with a reconstruction grid of the trained wintok-mini
    assert "model: wintok-mini, the small WinTok trained by this package" in out
    grid = re.search(r"reconstructions of the first (\d+) images .*?: (\S+\.png), mean PSNR ([\d.]+) dB", out)
    assert grid and int(grid.group(1)) == 16 and float(grid.group(3)) > 18, out
    from PIL import Image

    with Image.open(grid.group(2)) as im:
        assert im.format == "PNG"
