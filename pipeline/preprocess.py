"""Decode + orient + RGB + resize/crop: image bytes -> (S, S, 3) uint8 pixels.

Choices (each fixed, so the same bytes always give the same pixels):

* Decompression bombs: the pixel count from the header is checked against
  ``cfg.max_image_pixels`` before any pixel is decoded. PIL's own check in
  ``Image.open`` (``DecompressionBombError`` above 2x ``Image.MAX_IMAGE_PIXELS``) is left as
  it is - no PIL global is changed - and is reported as the same ``decompression_bomb``
  reason. So a ``max_image_pixels`` above 2x PIL's limit is capped by PIL unless the
  application raises ``Image.MAX_IMAGE_PIXELS`` itself.
* Truncated data is an error (``truncated``); ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never
  touched (if an application sets it, PIL fills missing data instead).
* Only the raster formats in :data:`SUPPORTED_FORMATS` are tried (content sniffing, the
  file extension is ignored); e.g. EPS, which PIL renders through Ghostscript, is not.
* Animated images (GIF, WebP, APNG): the first frame.
* Modes: CMYK/YCbCr/HSV/... -> RGB by PIL; ``1``/``L`` -> grey RGB; 16-bit ``I;16*`` and
  ``I`` (taken as 16-bit, clipped to 0..65535) -> 8 bit by ``round(v / 257)`` so
  65535 -> 255 - unless the file declares fewer significant bits (PNG ``sBIT``, TIFF
  ``BitsPerSample`` < 16 or ``MaxSampleValue``), e.g. 12-bit data 0..4095 in a 16-bit
  container: then ``round(v * 255 / max)`` with max = 2**bits - 1 (or MaxSampleValue), so
  the declared maximum is white, not 1/16 grey. 16-bit RGB reaches us as PIL's 8-bit high
  bytes; with a declared depth under 16 those are stretched the same way (8 - (16 - bits)
  bits of precision are all that is left). ``F``: values within [0, 1] are scaled by 255, others clipped to 0..255,
  NaN -> 0. Alpha (RGBA, LA, PA, palette or grey/RGB with a transparent colour) is
  composited on white, after resizing (PIL resizes with premultiplied alpha).
* EXIF orientation is applied as ``ImageOps.exif_transpose`` would, but to the resized
  square (cheaper; identical crop region since the crop box is the exact centre).
* ``center-crop``: central square of side min(w, h) in source coordinates (exact, possibly
  fractional centre), resized with BICUBIC via ``resize(box=...)``; ``squash``: the whole
  image resized to S x S. For JPEG, ``draft()`` first lets libjpeg downscale by 2/4/8 while
  both sides stay >= S.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import MAX_IMAGE_PIXELS, RESIZE_MODES
from .shard.errors import SampleError

STAGE = "decode"
# bump when the same bytes decode to other pixels; it is part of the run fingerprint, so an OUTPUT
# written under other rules is not resumed into. 2: 16-bit files scaled by their declared bit depth
PIXELS_VERSION = 2
SUPPORTED_FORMATS: tuple[str, ...] = (
    "JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "JPEG2000", "PPM", "ICO",
)  # fmt: skip

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class PreprocessConfig:
    """How image bytes become model pixels; part of the run fingerprint."""

    image_size: int = 256
    resize: str = RESIZE_MODES[0]  # center-crop, or "squash" (straight to image_size x image_size, like recon.py)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decompression-bomb limit, checked from the header
    use_draft: bool = True  # JPEG draft() (DCT downscale) before resizing

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive, got {self.max_image_pixels}")


@dataclass
class Decoded:
    """Model-ready pixels plus the original size after EXIF orientation."""

    pixels: np.ndarray  # (image_size, image_size, 3) uint8, C-contiguous
    width: int
    height: int


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """SUPPORTED_FORMATS that this PIL build can open (an unregistered name makes open() raise)."""
    Image.init()
    return tuple(f for f in SUPPORTED_FORMATS if f in Image.OPEN)


def _fail(reason: str, detail: str) -> SampleError:
    return SampleError(STAGE, reason, detail)


def decode_image(data: bytes, cfg: PreprocessConfig) -> Decoded:
    """Decode image bytes to (S, S, 3) uint8; bad input raises :class:`SampleError` only."""
    if not data:
        raise _fail("empty", "image member has 0 bytes")
    try:
        with Image.open(io.BytesIO(data), formats=_open_formats()) as im:
            return _process(im, cfg, data)
    except SampleError:
        raise
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise _fail("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise _fail("unidentified", f"not a supported image ({len(data)} bytes)") from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise _fail("truncated", str(exc)) from None
        raise _fail("decode_error", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # PIL plugins raise many types for corrupt data
        raise _fail("decode_error", f"{type(exc).__name__}: {exc}") from None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF: treat as unrotated rather than failing the image
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _process(im: Image.Image, cfg: PreprocessConfig, data: bytes = b"") -> Decoded:
    width, height = im.size
    if width <= 0 or height <= 0:
        raise _fail("bad_size", f"image header says {width}x{height}")
    if width * height > cfg.max_image_pixels:
        raise _fail(
            "decompression_bomb",
            f"{width}x{height} = {width * height} pixels exceeds limit {cfg.max_image_pixels}",
        )
    size = cfg.image_size
    if cfg.use_draft and im.format in ("JPEG", "MPO"):
        im.draft("RGB", (size, size))  # libjpeg picks a scale keeping both sides >= size
    im.load()
    orientation = _orientation(im)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    work = _resizable(im, _declared_max(im, data))
    out = work.resize((size, size), Image.Resampling.BICUBIC, box=_box(work.size, cfg.resize))
    out = _flatten(out)
    if orientation in _TRANSPOSE:
        out = out.transpose(_TRANSPOSE[orientation])
    pixels = np.array(out, dtype=np.uint8)
    if pixels.shape != (size, size, 3):  # pragma: no cover - defensive
        raise _fail("bad_mode", f"unexpected decoded shape {pixels.shape}")
    return Decoded(pixels=np.ascontiguousarray(pixels), width=width, height=height)


def _box(wh: tuple[int, int], resize: str) -> tuple[float, float, float, float]:
    w, h = wh
    if resize == "squash":
        return (0.0, 0.0, float(w), float(h))
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return (left, top, left + side, top + side)


def _png_significant_max(data: bytes) -> int | None:
    """2**bits - 1 for a 16-bit PNG whose sBIT chunk declares fewer bits (PIL ignores sBIT)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 33 or data[24] != 16:  # IHDR bit depth
        return None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind in (b"IDAT", b"IEND"):  # sBIT comes before the image data
            return None
        if kind == b"sBIT":
            colour = data[25]
            bits = data[pos + 8:pos + 8 + length][: 1 if colour in (0, 4) else 3]  # grey or RGB, not alpha
            return (1 << max(bits)) - 1 if bits and 0 < max(bits) < 16 else None
        pos += 12 + length
    return None


def _declared_max(im: Image.Image, data: bytes) -> int | None:
    """The largest sample value the file declares, when it is below its 16-bit container's 65535."""
    if im.format == "PNG":
        return _png_significant_max(data)
    if im.format == "TIFF":
        tags = getattr(im, "tag_v2", {})
        bits = tags.get(258)  # BitsPerSample
        bits = max(bits) if isinstance(bits, tuple) and bits else bits
        if isinstance(bits, int) and 8 < bits < 16:
            return (1 << bits) - 1
        top = tags.get(281)  # MaxSampleValue
        top = max(top) if isinstance(top, tuple) and top else top
        if isinstance(top, int) and 255 < top < 65535 and bits == 16:
            return top
    return None


def _stretch(arr: np.ndarray, top: int) -> np.ndarray:
    """0..top -> 0..255, rounded half up, clipped."""
    arr = np.clip(arr.astype(np.int64), 0, top)
    return ((arr * 255 + top // 2) // top).astype(np.uint8)


def _resizable(im: Image.Image, declared_max: int | None = None) -> Image.Image:
    """Convert to a mode that BICUBIC resizes correctly: RGB, L, RGBA or LA."""
    mode = im.mode
    if declared_max and mode in ("RGB", "RGBA", "LA") and declared_max >> 8:
        # 16-bit colour or grey + alpha: PIL kept the high bytes, whose maximum is declared_max >> 8
        arr = np.asarray(im)
        n = 1 if mode == "LA" else 3
        out = np.concatenate([_stretch(arr[..., :n], declared_max >> 8), arr[..., n:]], axis=-1)
        im = Image.fromarray(np.ascontiguousarray(out), mode=mode)
    if mode in _SIXTEEN_BIT and declared_max:
        return Image.fromarray(_stretch(np.asarray(im), declared_max), mode="L")
    has_key_colour = "transparency" in im.info
    if mode in ("RGBA", "LA"):
        return im
    if mode in ("RGB", "L"):
        return im.convert("RGBA") if has_key_colour else im
    if mode in ("P", "PA"):
        return im.convert("RGBA") if (has_key_colour or mode == "PA") else im.convert("RGB")
    if mode == "1":
        return im.convert("L")
    if mode in ("RGBa", "La"):
        return im.convert(mode.upper())
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.int64)
        arr = np.clip(arr, 0, 65535)
        return Image.fromarray(((arr + 128) // 257).astype(np.uint8), mode="L")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise _fail("bad_mode", f"cannot convert mode {mode!r} to RGB: {exc}") from None


def _flatten(im: Image.Image) -> Image.Image:
    """Composite alpha on white and return RGB."""
    if im.mode == "RGB":
        return im
    if im.mode == "L":
        return im.convert("RGB")
    if im.mode in ("RGBA", "LA"):
        base_mode = im.mode[:-1]
        white = 255 if base_mode == "L" else (255, 255, 255)
        background = Image.new(base_mode, im.size, white)
        background.paste(im.convert(base_mode), mask=im.getchannel("A"))
        return background.convert("RGB")
    raise _fail("bad_mode", f"unexpected mode {im.mode!r} after resize")  # pragma: no cover
