"""Test corpus built in code: real image bytes made with PIL, written as webdataset tars.

Used by unit and e2e tests (plain functions, no pytest fixtures). A sample is a dict
``{"key": str, "members": {ext: bytes}, "expect": "ok" | "error:<reason>"}``; ok samples
of :func:`broken_corpus` also carry ``"size": (width, height)`` after EXIF orientation.
Everything is deterministic for a given seed, and the whole corpus builds well under 1 s.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageDraw

from benchmarks.corpus import picture  # the one picture generator, shared with the benchmark

Sample = dict[str, Any]
_MTIME = 1_700_000_000


def _encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def good_images(n: int, seed: int, prefix: str = "") -> list[tuple[str, bytes, str]]:
    """n varied JPEG/PNG pictures (50..400 px, mostly non-square) as (key, bytes, ext)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(50, 401, 2))
        im = picture(rng, w, h)
        if rng.random() < 0.7:
            data, ext = _encode(im, "JPEG", quality=int(rng.integers(75, 96))), "jpg"
        else:
            data, ext = _encode(im, "PNG", compress_level=1), "png"
        out.append((f"{prefix}{i:06d}", data, ext))
    return out


def good_samples(n: int, seed: int, prefix: str = "") -> list[Sample]:
    """good_images with .txt caption and .json metadata sidecars."""
    samples = []
    for key, data, ext in good_images(n, seed, prefix):
        meta = {"key": key, "seed": seed, "source": "synthetic"}
        members = {ext: data, "txt": f"a synthetic picture {key}".encode(), "json": json.dumps(meta).encode()}
        samples.append({"key": key, "members": members, "expect": "ok"})
    return samples


def _png_with_header_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed): a cheap bomb."""
    data = bytearray(_encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))
    ihdr = 8  # chunk: length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def _exif_rotated_jpeg() -> bytes:
    """Stored 120 wide x 60 high, EXIF orientation 6: displayed 60 x 120."""
    im = Image.new("RGB", (120, 60), (200, 30, 30))
    ImageDraw.Draw(im).rectangle((0, 0, 29, 59), fill=(30, 30, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(im, "JPEG", quality=95, exif=exif.tobytes())


def _palette_transparent_png() -> bytes:
    """64x64 palette PNG: left half transparent (index 0), right half red."""
    im = Image.new("P", (64, 64), 0)
    im.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    ImageDraw.Draw(im).rectangle((32, 0, 63, 63), fill=1)
    return _encode(im, "PNG", transparency=0)


def _rgba_png() -> bytes:
    """64x48 RGBA: left half fully transparent (black colour), right half opaque blue."""
    arr = np.zeros((48, 64, 4), np.uint8)
    arr[:, 32:] = (0, 0, 255, 255)
    return _encode(Image.fromarray(arr, "RGBA"), "PNG")


def _png16() -> bytes:
    """64x48 16-bit grey PNG with a white (65535) top-left 16x16 block."""
    arr = np.tile(np.linspace(0, 40000, 64).astype(np.uint16), (48, 1))
    arr[:16, :16] = 65535
    return _encode(Image.fromarray(arr), "PNG")


def _animated(fmt: str) -> bytes:
    """Three 64x48 frames, red then green then blue."""
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    kw: dict[str, Any] = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        kw["lossless"] = True
    return _encode(frames[0], fmt, **kw)


def broken_corpus() -> list[Sample]:
    """Hard and broken samples, each with the outcome the pipeline must produce."""
    rng = np.random.default_rng(1234)
    jpeg = _encode(picture(rng, 128, 96), "JPEG", quality=90)
    png = _encode(picture(rng, 96, 80), "PNG", compress_level=1)
    cmyk = _encode(picture(rng, 90, 70).convert("CMYK"), "JPEG", quality=90)
    gray = _encode(picture(rng, 70, 90).convert("L"), "JPEG", quality=90)
    webp = _encode(picture(rng, 80, 60), "WEBP", quality=80)
    wide = _encode(picture(rng, 4000, 10), "PNG", compress_level=1)
    one = _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    cases: list[tuple[str, dict[str, bytes], str, tuple[int, int] | None]] = [
        ("truncated_jpeg", {"jpg": jpeg[: len(jpeg) // 2]}, "error:truncated", None),
        ("truncated_png", {"png": png[: len(png) // 2]}, "error:truncated", None),
        ("zero_bytes", {"jpg": b""}, "error:empty", None),
        ("random_bytes", {"jpg": rng.bytes(2000)}, "error:unidentified", None),
        ("png_named_jpg", {"jpg": png}, "ok", (96, 80)),
        ("cmyk_jpeg", {"jpg": cmyk}, "ok", (90, 70)),
        ("gray_jpeg", {"jpg": gray}, "ok", (70, 90)),
        ("png16", {"png": _png16()}, "ok", (64, 48)),
        ("palette_transparent", {"png": _palette_transparent_png()}, "ok", (64, 64)),
        ("rgba_png", {"png": _rgba_png()}, "ok", (64, 48)),
        ("exif_rotated", {"jpg": _exif_rotated_jpeg()}, "ok", (60, 120)),
        ("animated_gif", {"gif": _animated("GIF")}, "ok", (64, 48)),
        ("animated_png", {"png": _animated("PNG")}, "ok", (64, 48)),
        ("webp", {"webp": webp}, "ok", (80, 60)),
        ("one_pixel", {"png": one}, "ok", (1, 1)),
        ("wide_4000x10", {"png": wide}, "ok", (4000, 10)),
        ("bomb_huge", {"png": _png_with_header_size(100_000, 100_000)}, "error:decompression_bomb", None),
        ("bomb_limit", {"png": _png_with_header_size(10_000, 10_000)}, "error:decompression_bomb", None),
        ("no_image", {"txt": b"a caption without an image"}, "error:no_image", None),
        ("latin1_caption", {"jpg": jpeg, "txt": "caf\xe9 cr\xe8me".encode("latin-1")}, "ok", (128, 96)),
    ]
    out = []
    for name, members, expect, size in cases:
        sample: Sample = {"key": f"broken_{name}", "members": members, "expect": expect}
        if size is not None:
            sample["size"] = size
        out.append(sample)
    return out


def _as_sample(item: Sample | tuple[str, bytes, str]) -> Sample:
    if isinstance(item, tuple):
        key, data, ext = item
        return {"key": key, "members": {ext: data}, "expect": "ok"}
    return item


def write_tar(
    target: str | os.PathLike[str] | BinaryIO, samples: Sequence[Sample | tuple[str, bytes, str]]
) -> None:
    """Write samples as members ``<key>.<ext>`` in order (deterministic bytes)."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            write_tar(f, samples)
        return
    with tarfile.open(fileobj=target, mode="w") as tf:
        for item in samples:
            sample = _as_sample(item)
            for ext, data in sample["members"].items():
                info = tarfile.TarInfo(f"{sample['key']}.{ext}")
                info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
                tf.addfile(info, io.BytesIO(data))


def tar_bytes(samples: Sequence[Sample | tuple[str, bytes, str]]) -> bytes:
    """write_tar into memory."""
    buf = io.BytesIO()
    write_tar(buf, samples)
    return buf.getvalue()


def shard_plan(n_shards: int, per_shard: int, seed: int, broken: bool = False) -> list[list[Sample]]:
    """Samples of each shard make_shards writes; broken samples are spread round-robin."""
    shards = [good_samples(per_shard, seed * 1000 + s, prefix=f"{s:05d}_") for s in range(n_shards)]
    if not broken or n_shards == 0:
        return shards
    extra: list[list[Sample]] = [[] for _ in range(n_shards)]
    for j, sample in enumerate(broken_corpus()):
        extra[j % n_shards].append(sample)
    plan = []
    for good, bad in zip(shards, extra, strict=True):
        merged: list[Sample] = []
        for i, sample in enumerate(good):
            merged.append(sample)
            if bad and i % 2 == 1:
                merged.append(bad.pop(0))
        plan.append(merged + bad)
    return plan


def make_shards(
    directory: str | os.PathLike[str], n_shards: int, per_shard: int, seed: int, broken: bool = False
) -> list[str]:
    """Write ``NNNNN.tar`` shards into directory; returns their paths in order."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for s, samples in enumerate(shard_plan(n_shards, per_shard, seed, broken)):
        path = os.path.join(os.fspath(directory), f"{s:05d}.tar")
        write_tar(path, samples)
        paths.append(path)
    return paths


def truncated_tar_bytes(samples: Sequence[Sample] | None = None, where: str = "mid_member") -> bytes:
    """A tar cut short at its last member.

    where: ``mid_member`` (inside the member's data), ``boundary`` (after its padded data,
    end-of-archive blocks missing) or ``header`` (inside its header block).
    """
    full = tar_bytes(samples if samples is not None else good_samples(3, seed=0))
    with tarfile.open(fileobj=io.BytesIO(full), mode="r:") as tf:
        last = tf.getmembers()[-1]
    if where == "mid_member":
        if last.size < 2:
            raise ValueError("last member too small to cut in the middle")
        return full[: last.offset_data + last.size // 2]
    if where == "boundary":
        return full[: last.offset_data + -(-last.size // 512) * 512]
    if where == "header":
        return full[: last.offset + 256]
    raise ValueError(f"unknown cut {where!r}")


def not_a_tar_bytes() -> bytes:
    """Bytes that are not a tar (what an HTML error page or a wrong object would give)."""
    return b"<html><body>This is not a tar archive.</body></html>\n" * 40


def write_image_folder(root: str | os.PathLike[str], n: int = 7, seed: int = 1) -> dict[str, bytes]:
    """An image folder tree: n good images in ``a/`` and ``b/c/``, every other one with a ``.txt``
    caption beside it, every third with a ``.json``; plus ``notes.md`` (not an image) and
    ``b/broken.jpg`` (not decodable). Returns rel path -> bytes of the good images."""
    root = os.fspath(root)
    images = {}
    for i, (key, data, ext) in enumerate(good_images(n, seed=seed)):
        rel = f"{'a' if i < n // 2 else 'b/c'}/{key}.{ext}"
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        images[rel] = data
        base = os.path.join(root, rel.rsplit(".", 1)[0])
        if i % 2 == 0:
            with open(f"{base}.txt", "w") as f:
                f.write(f"caption {key}")
        if i % 3 == 0:
            with open(f"{base}.json", "w") as f:
                json.dump({"k": key}, f)
    with open(os.path.join(root, "notes.md"), "w") as f:
        f.write("not an image")
    os.makedirs(os.path.join(root, "b"), exist_ok=True)
    with open(os.path.join(root, "b", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    return images
