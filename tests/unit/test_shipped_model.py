"""The trained wintok-mini that ships in the package: pinned bytes, strict load, stated quality."""

from __future__ import annotations

import hashlib
import os

import pytest

from jobs.wintok_mini import evaluate
from wintok_model.checkpoint import WEIGHTS_DIR, load_model, resolve_spec, shipped_models, weights_sha256
from wintok_model.config import PRESETS

# sha256 of wintok_model/weights/wintok-mini/model.safetensors (trained by `python -m jobs.wintok_mini`
# + `wintok train`, see README "wintok-mini"); a change of the file must be a deliberate one
MINI_SHA256 = "2d54a09738deece5a91ffc44630c5d4f6cfdced5e1c08f6f5d0fa07bbcd19262"
# README / benchmarks/RESULTS.md state this mean PSNR on the held-out photos; the test allows 0.3 dB
STATED_PSNR = 23.72


def test_the_files_are_the_trained_ones():
    assert "wintok-mini" in shipped_models()
    path = os.path.join(WEIGHTS_DIR, "wintok-mini", "model.safetensors")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == MINI_SHA256
    assert weights_sha256("wintok-mini") == MINI_SHA256
    assert os.path.getsize(path) < 10 << 20  # a few MB


def test_loads_strictly_by_name_with_the_preset_shape():
    model = load_model("wintok-mini")  # load_pretrained: every key and shape must match
    assert model.config == PRESETS["wintok-mini"]
    assert resolve_spec("wintok-mini") == os.path.join(WEIGHTS_DIR, "wintok-mini")
    from wintok_model import WinTok

    assert WinTok.from_pretrained("wintok-mini").config == model.config


def test_reconstructs_held_out_photos_as_stated():
    trained = evaluate("wintok-mini")
    random = evaluate("wintok-tiny")
    assert trained["mean_psnr"] >= STATED_PSNR - 0.3, trained
    assert trained["mean_psnr"] > random["mean_psnr"] + 5, (trained, random)


@pytest.mark.parametrize("name", ["wintok-mini"])
def test_a_cli_run_names_no_random_weights_warning(name):
    from pipeline.cli import preset_warning

    assert preset_warning(name) is None
    assert preset_warning("wintok-tiny") is not None
