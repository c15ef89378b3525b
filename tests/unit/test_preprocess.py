"""pipeline.preprocess: decode, orient, RGB, resize/crop, and the model-input transform."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from pipeline.preprocess import Decoded, PreprocessConfig, SampleError, decode_image
from pipeline.shard.encode import to_model_input
from tests import corpus

CFG = PreprocessConfig(image_size=64)
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def image_member(sample: dict) -> bytes:
    return next(v for k, v in sample["members"].items() if k not in ("txt", "json"))


DECODABLE = [s for s in corpus.broken_corpus() if s["expect"] != "error:no_image"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("sample", DECODABLE, ids=[s["key"] for s in DECODABLE])
def test_broken_corpus_outcomes(sample):
    data = image_member(sample)
    if sample["expect"] == "ok":
        out = decode_image(data, CFG)
        assert isinstance(out, Decoded)
        assert out.pixels.shape == (64, 64, 3) and out.pixels.dtype == np.uint8
        assert out.pixels.flags["C_CONTIGUOUS"]
        assert (out.width, out.height) == sample["size"]
    else:
        reason = sample["expect"].split(":", 1)[1]
        with pytest.raises(SampleError) as info:
            decode_image(data, CFG)
        assert info.value.reason == reason and info.value.stage == "decode"
        assert str(info.value).startswith(f"{reason}: ")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


def test_config_validation():
    with pytest.raises(ValueError):
        PreprocessConfig(resize="stretch")
    with pytest.raises(ValueError):
        PreprocessConfig(image_size=0)


def test_exif_orientation_swaps_size_and_rotates():
    data = image_member(next(s for s in corpus.broken_corpus() if s["key"] == "broken_exif_rotated"))
    squash = decode_image(data, PreprocessConfig(image_size=64, resize="squash"))
    assert (squash.width, squash.height) == (60, 120)
    # stored 120x60 with a blue strip on the left; orientation 6 puts it on top
    assert np.abs(squash.pixels[:8].astype(int) - (30, 30, 200)).max() < 30
    assert np.abs(squash.pixels[-8:].astype(int) - (200, 30, 30)).max() < 30
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").resize((64, 64), Image.BICUBIC)
    assert np.abs(squash.pixels.astype(int) - np.asarray(ref, dtype=int)).max() <= 3
    crop = decode_image(data, CFG)  # central 60x60 square of the 60x120 view: red
    assert np.abs(crop.pixels[4:-4].astype(int) - (200, 30, 30)).max() < 30


def test_center_crop_and_squash_geometry():
    im = Image.new("RGB", (300, 100), RED)
    im.paste(GREEN, (100, 0, 200, 100))
    im.paste(BLUE, (200, 0, 300, 100))
    crop = decode_image(encode(im), CFG).pixels
    # resize(box=...) lets the bicubic kernel see pixels just outside the box: edges may bleed
    assert (crop[:, 3:-3] == GREEN).all() and (crop[:, :3, 1] > 200).all()
    squash = decode_image(encode(im), PreprocessConfig(image_size=60, resize="squash")).pixels
    assert (squash[:, 5:15] == RED).all() and (squash[:, 25:35] == GREEN).all()
    assert (squash[:, 45:55] == BLUE).all()


def test_extreme_aspect_and_one_pixel():
    wide = decode_image(encode(Image.new("RGB", (4000, 10), (12, 34, 56))), CFG)
    assert (wide.width, wide.height) == (4000, 10) and (wide.pixels == (12, 34, 56)).all()
    one = decode_image(encode(Image.new("RGB", (1, 1), (7, 8, 9))), CFG)
    assert (one.width, one.height) == (1, 1) and (one.pixels == (7, 8, 9)).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_scaled_not_clipped(mode):
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:, :4] = 257 * 100
    if mode == "I;16B":
        im = Image.frombytes(mode, (8, 8), arr.astype(">u2").tobytes())
    else:
        im = Image.fromarray(arr if mode == "I;16" else arr.astype(np.int32))
    assert im.mode == mode
    fmt = "PNG" if mode == "I;16" else "TIFF"
    px = decode_image(encode(im, fmt), PreprocessConfig(image_size=8, resize="squash")).pixels
    assert (px[:, 6:] == 255).all() and (px[:, :2] == 100).all()


def test_float_mode_scaled():
    arr = np.full((8, 8), 1.0, np.float32)
    arr[:, :4] = 0.5
    px = decode_image(
        encode(Image.fromarray(arr), "TIFF"), PreprocessConfig(image_size=8, resize="squash")
    ).pixels
    assert (px[:, 6:] == 255).all() and (px[:, :2] == 128).all()


def test_palette_transparency_composited_on_white():
    data = image_member(next(s for s in corpus.broken_corpus() if s["key"] == "broken_palette_transparent"))
    px = decode_image(data, CFG).pixels
    assert (px[:, :28] == WHITE).all() and (px[:, 36:] == RED).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_white(mode):
    im = Image.new(mode, (40, 40), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    im.paste((0, 0, 255, 255) if mode == "RGBA" else (0, 255), (20, 0, 40, 40))
    px = decode_image(encode(im), PreprocessConfig(image_size=40)).pixels
    assert (px[:, :16] == WHITE).all()
    assert (px[:, 24:] == (BLUE if mode == "RGBA" else (0, 0, 0))).all()


def test_grayscale_and_bilevel_become_grey_rgb():
    for mode, colour in (("L", 90), ("1", 1)):
        px = decode_image(encode(Image.new(mode, (30, 20), colour)), CFG).pixels
        expect = 90 if mode == "L" else 255
        assert (px == expect).all()


def test_cmyk_jpeg_colours():
    im = Image.new("RGB", (40, 40), (200, 60, 30)).convert("CMYK")
    px = decode_image(encode(im, "JPEG", quality=95), CFG).pixels
    assert np.abs(px.astype(int) - (200, 60, 30)).max() < 12


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_first_frame(fmt):
    frames = [Image.new("RGB", (32, 24), c) for c in (RED, GREEN, BLUE)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    px = decode_image(data, CFG).pixels
    assert np.abs(px.astype(int) - RED).max() <= 2


def test_png_named_jpg_is_sniffed():
    data = encode(Image.new("RGB", (10, 10), GREEN), "PNG")
    assert (decode_image(data, CFG).pixels == GREEN).all()


def test_bomb_checked_from_header_without_global_change():
    data = encode(Image.new("RGB", (40, 30), RED))
    with pytest.raises(SampleError) as info:
        decode_image(data, PreprocessConfig(max_image_pixels=40 * 30 - 1))
    assert info.value.reason == "decompression_bomb"
    assert decode_image(data, PreprocessConfig(image_size=8, max_image_pixels=40 * 30)).width == 40
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


def test_unsupported_format_is_unidentified():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(SampleError) as info:
        decode_image(eps, CFG)
    assert info.value.reason == "unidentified"


def test_corrupted_bytes_only_raise_sample_error():
    rng = np.random.default_rng(0)
    sources = [image_member(s) for s in DECODABLE if s["expect"] == "ok"][:8]
    for data in sources:
        for _ in range(6):
            mutated = bytearray(data)
            for pos in rng.integers(0, len(data), 8):
                mutated[pos] = int(rng.integers(0, 256))
            try:
                out = decode_image(bytes(mutated), CFG)
            except SampleError:
                continue
            assert out.pixels.shape == (64, 64, 3)


def test_jpeg_draft_is_used_and_close_to_full_decode(monkeypatch):
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(
        (1600, 1200), Image.BICUBIC
    )
    data = encode(big, "JPEG", quality=92)
    calls = []
    original = JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    fast = decode_image(data, PreprocessConfig(image_size=128)).pixels
    assert calls == [((128, 128), (200, 150))]  # scale 1/8 keeps both sides >= 128
    full = decode_image(data, PreprocessConfig(image_size=128, use_draft=False)).pixels
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


_DECODE_CHILD = """
import hashlib, pickle, sys
from pipeline.preprocess import PreprocessConfig, decode_image
cfg, datas = pickle.load(sys.stdin.buffer)
for d in datas:
    print(hashlib.sha256(decode_image(d, cfg).pixels.tobytes()).hexdigest())
"""


def test_deterministic():
    """Pixels are a pure function of the bytes and the config: fresh interpreters (other hash
    seeds, one thread) decode every sample to the same pixels as this process does."""
    import hashlib
    import os
    import subprocess
    import sys

    datas = [image_member(s) for s in DECODABLE if s["expect"] == "ok"][:16]
    datas += [data for _, data, _ in corpus.good_images(8, seed=3)]  # JPEG (draft) and PNG, resized
    here = [hashlib.sha256(decode_image(d, CFG).pixels.tobytes()).hexdigest() for d in datas]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for seed in ("0", "1"):
        env = {**os.environ, "PYTHONPATH": repo, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        child = subprocess.run([sys.executable, "-c", _DECODE_CHILD], input=pickle.dumps((CFG, datas)),
                               capture_output=True, env=env, timeout=120)
        assert child.returncode == 0, child.stderr.decode()[-2000:]
        assert child.stdout.decode().split() == here, f"PYTHONHASHSEED={seed}"


def test_sample_error_pickles():
    err = pickle.loads(pickle.dumps(SampleError("decode", "truncated", "cut short")))
    assert (err.stage, err.reason, err.detail, str(err)) == (
        "decode",
        "truncated",
        "cut short",
        "truncated: cut short",
    )


def test_to_model_input_matches_totensor_times_two_minus_one():
    batch = torch.tensor(np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)), dtype=torch.uint8)
    batch[0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    out = to_model_input(batch)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32 and out.is_contiguous()
    ref = batch.permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    assert torch.allclose(out, ref, atol=1e-6)
    assert out[0, 0, 0, 0] == -1.0 and out[0, 1, 0, 0] == 1.0
    assert out.min() >= -1.0 and out.max() <= 1.0
    with pytest.raises(ValueError):
        to_model_input(batch.float())
    with pytest.raises(ValueError):
        to_model_input(batch[..., :2])
