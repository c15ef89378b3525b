"""EXIF orientations 1-8 against an independent numpy reference.

The reference is the EXIF specification's own definition of tag 0x0112 (which stored row and
column become the visual top and left), written with np.flip / np.rot90 / transpose on the
stored array; it shares nothing with PIL's ImageOps.exif_transpose or the pipeline's table.
The image is asymmetric and not square (48 x 32 blocks of distinct colours), so every one of
the 8 orientations gives a different picture and the centre crop is taken in the right frame.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.preprocess import PreprocessConfig, decode_image
from pipeline.shard import decode as D

W, H, BLOCK = 48, 32, 8
CFG = PreprocessConfig(image_size=min(W, H))  # crop side = output side: no resampling, exact for PNG


def _stored() -> np.ndarray:
    """(H, W, 3) uint8: 6 x 4 blocks of 8 px, each its own colour (no two blocks alike)."""
    rng = np.random.default_rng(3)
    colours = rng.permutation(np.array([(r, g, b) for r in (20, 110, 200) for g in (30, 130, 230)
                                        for b in (40, 130, 220)], dtype=np.uint8))[: (W // BLOCK) * (H // BLOCK)]
    grid = colours.reshape(H // BLOCK, W // BLOCK, 3)
    return np.repeat(np.repeat(grid, BLOCK, axis=0), BLOCK, axis=1)


def _displayed(a: np.ndarray, k: int) -> np.ndarray:
    """The picture a viewer shows for stored pixels `a` with Orientation=k (EXIF 2.3, tag 0x0112)."""
    if k == 1:  # row 0 = visual top, column 0 = visual left
        return a
    if k == 2:  # row 0 = top, column 0 = right: mirrored left-right
        return a[:, ::-1]
    if k == 3:  # row 0 = bottom, column 0 = right: turned 180 degrees
        return a[::-1, ::-1]
    if k == 4:  # row 0 = bottom, column 0 = left: mirrored top-bottom
        return a[::-1, :]
    if k == 5:  # row 0 = left side, column 0 = top: stored (r, c) shown at (c, r)
        return a.transpose(1, 0, 2)
    if k == 6:  # row 0 = right side, column 0 = top: the camera was turned 90 degrees clockwise
        return np.rot90(a, -1)
    if k == 7:  # row 0 = right side, column 0 = bottom: stored (r, c) shown at (W-1-c, H-1-r)
        return a[::-1, ::-1].transpose(1, 0, 2)
    if k == 8:  # row 0 = left side, column 0 = bottom: turned 90 degrees counter-clockwise
        return np.rot90(a, 1)
    raise ValueError(k)


def _centre_square(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return a[top:top + s, left:left + s]


def _encode(a: np.ndarray, fmt: str, k: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = k
    buf = io.BytesIO()
    kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(a).save(buf, fmt, exif=exif.tobytes(), **kw)
    return buf.getvalue()


def test_reference_is_sane():
    """Checks of the reference itself: the 8 pictures are pairwise different, 3 is 6 applied twice,
    8 is 6 applied three times, and the mirrorings 2, 4, 5, 7 are their own inverses."""
    a = _stored()
    shown = [_displayed(a, k) for k in range(1, 9)]
    for i in range(8):
        for j in range(i + 1, 8):
            assert shown[i].shape != shown[j].shape or not np.array_equal(shown[i], shown[j]), (i + 1, j + 1)
    np.testing.assert_array_equal(_displayed(_displayed(a, 6), 6), shown[2])
    np.testing.assert_array_equal(_displayed(_displayed(_displayed(a, 6), 6), 6), shown[7])
    for k in (2, 4, 5, 7):
        np.testing.assert_array_equal(_displayed(_displayed(a, k), k), a)


@pytest.mark.parametrize("k", range(1, 9))
def test_png_orientation_exact(k):
    a = _stored()
    expected = _displayed(a, k)
    d = decode_image(_encode(a, "PNG", k), CFG)
    assert (d.width, d.height) == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(d.pixels, _centre_square(expected), err_msg=f"orientation {k}")


@pytest.mark.parametrize("k", range(1, 9))
def test_jpeg_orientation_nearest_is_the_expected_one(k):
    """JPEG is lossy: the decoded picture must be close to the expected one and far from the 7 others."""
    a = _stored()
    d = decode_image(_encode(a, "JPEG", k), CFG)
    expected = _displayed(a, k)
    assert (d.width, d.height) == (expected.shape[1], expected.shape[0])
    dist = {j: np.abs(d.pixels.astype(int) - _centre_square(_displayed(a, j)).astype(int)).mean()
            for j in range(1, 9)}
    assert dist[k] < 4, dist
    assert all(v > 20 for j, v in dist.items() if j != k and not np.array_equal(
        _centre_square(_displayed(a, j)), _centre_square(expected))), dist


def test_decode_processes_apply_orientation_too():
    """The spawned decoder children (their own interpreters) give the same pictures."""
    a = _stored()
    jobs = [(f"o{k}", _encode(a, "PNG", k)) for k in range(1, 9)]
    dec = D.ProcessDecoder(1, CFG, slots=8, chunk_size=8)
    try:
        chunk = D.Chunk(jobs)
        dec.submit(chunk)
        results = dec.results(chunk)
        for k, r in zip(range(1, 9), results, strict=True):
            assert isinstance(r, D.Slot), r
            np.testing.assert_array_equal(r.pixels, _centre_square(_displayed(a, k)), err_msg=f"orientation {k}")
            dec.release(r)
    finally:
        dec.close()
