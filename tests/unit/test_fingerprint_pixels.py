"""The pixel rules are part of the run fingerprint: an OUTPUT written under other decoding rules
(e.g. before 16-bit files were scaled by their declared bit depth) is not resumed into."""

from __future__ import annotations

from pipeline import preprocess
from pipeline.config import JobConfig
from pipeline.plan import run_fingerprint
from schemas import fingerprint_digest


def test_pixels_version_is_in_the_fingerprint(monkeypatch):
    cfg = JobConfig(model="wintok-tiny", inputs=("a.tar",), output="out")
    fp = run_fingerprint(cfg)
    assert fp["preprocess"]["pixels_version"] == preprocess.PIXELS_VERSION
    monkeypatch.setattr(preprocess, "PIXELS_VERSION", preprocess.PIXELS_VERSION + 1)
    other = run_fingerprint(cfg)
    assert fingerprint_digest(other) != fingerprint_digest(fp)
