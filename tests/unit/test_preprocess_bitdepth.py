"""12-bit images in 16-bit containers: scaled by the depth the file declares, not by 65535.

Every file is written here: PNGs by PIL (with an sBIT chunk through PngInfo) or chunk by chunk
(PIL cannot write 16-bit RGB), TIFFs by PIL (MaxSampleValue) or field by field (12-bit packed
samples, BitsPerSample 12), as a scanner or camera pipeline would leave them."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from pipeline.preprocess import PreprocessConfig, decode_image

CFG = PreprocessConfig(image_size=8, resize="squash")
# left half 2048 (mid grey at 12 bits), right half 4095 (white at 12 bits)
TWELVE = np.where(np.arange(8)[None, :] < 4, 2048, 4095).repeat(8, 0).astype(np.uint16)


def _png16_grey(arr: np.ndarray, sbit: int | None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16_rgb(arr: np.ndarray, sbit: int | None) -> bytes:
    h, w, _ = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    extra = _chunk(b"sBIT", bytes([sbit] * 3)) if sbit else b""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + extra
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


def _tiff12(arr: np.ndarray) -> bytes:
    """A baseline grey TIFF with BitsPerSample 12: two samples in three bytes, MSB first."""
    h, w = arr.shape
    flat = arr.astype(np.uint32).reshape(h, w // 2, 2)
    packed = np.stack([flat[..., 0] >> 4, ((flat[..., 0] & 15) << 4) | (flat[..., 1] >> 8), flat[..., 1] & 255],
                      axis=-1).astype(np.uint8).tobytes()
    tags = [(256, 3, w), (257, 3, h), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 3, h), (279, 4, len(packed))]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = data_at if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + b"\x00\x00\x00\x00" + packed


def _tiff16_max(arr: np.ndarray, top: int | None) -> bytes:
    info = TiffImagePlugin.ImageFileDirectory_v2()
    if top is not None:
        info[281] = top  # MaxSampleValue
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF", tiffinfo=info)
    return buf.getvalue()


def _halves(px: np.ndarray) -> tuple[int, int]:
    assert px.shape == (8, 8, 3)
    return int(px[:, :2].mean()), int(px[:, 6:].mean())


@pytest.mark.parametrize(("make", "want"), [
    (lambda: _png16_grey(TWELVE, 12), (128, 255)),  # 2048 * 255 / 4095 = 127.53 -> 128; 4095 -> 255
    (lambda: _tiff12(TWELVE), (128, 255)),
    (lambda: _tiff16_max(TWELVE, 4095), (128, 255)),
    # 16-bit RGB reaches us as PIL's high bytes (2048 -> 8, 4095 -> 15 of 15): 8 * 255 / 15 = 136
    (lambda: _png16_rgb(np.repeat(TWELVE[..., None], 3, -1), 12), (136, 255)),
], ids=["png-sBIT", "tiff-BitsPerSample-12", "tiff-MaxSampleValue", "png-rgb-sBIT"])
def test_declared_twelve_bits_fill_the_range(make, want):
    px = decode_image(make(), CFG).pixels
    assert _halves(px) == want, _halves(px)
    assert (px[..., 0] == px[..., 2]).all()


def test_the_twelve_bit_tiff_is_what_it_claims():
    """The hand-made TIFF decodes (in PIL) to the 12-bit values written, as 16-bit samples."""
    im = Image.open(io.BytesIO(_tiff12(TWELVE)))
    assert im.mode == "I;16" and im.tag_v2[258] == (12,)
    np.testing.assert_array_equal(np.asarray(im), TWELVE)


@pytest.mark.parametrize("make", [lambda: _png16_grey(TWELVE, None), lambda: _tiff16_max(TWELVE, None),
                                  lambda: _png16_grey(TWELVE, 16)], ids=["png", "tiff", "png-sBIT-16"])
def test_without_a_declared_depth_sixteen_bits_stay_sixteen(make):
    # nothing declared: 4095 of 65535 is dark grey (round(4095 / 257) = 16), as before
    assert _halves(decode_image(make(), CFG).pixels) == (8, 16)
