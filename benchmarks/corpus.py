"""The one picture generator, shared with tests/corpus.py, and the benchmark's corpus of tars.

`picture` makes a deterministic RGB picture from a numpy Generator. Its plain style is the
tests' picture (their shards, sizes and expected outcomes are built from it); `photo=True` is
the benchmark's photo-like style (what benchmarks/RESULTS.md describes and its numbers were
measured on). Both styles draw their shapes with the same code, and each style's output (and
the generator's state afterwards) is byte-for-byte what it was before the two were merged.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from benchmarks import log

_MTIME = 1_700_000_000


def _gradient_noise(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Plain background: a two-colour diagonal gradient + uniform noise (int16 arithmetic)."""
    c0, c1 = rng.integers(0, 256, 3).astype(np.int16), rng.integers(0, 256, 3).astype(np.int16)
    t = (np.arange(w, dtype=np.int16)[None, :] * 64 // max(w, 1)) + (
        np.arange(h, dtype=np.int16)[:, None] * 64 // max(h, 1)
    )
    arr = c0 + ((c1 - c0)[None, None, :] * t[..., None]) // 128
    amp = int(rng.integers(2, 25))
    arr += rng.integers(-amp, amp + 1, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _smooth_field(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Photo background: a bicubic-upscaled random colour field + a linear gradient."""
    gh, gw = (int(v) for v in rng.integers(2, 7, 2))
    field = Image.fromarray(rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8), "RGB")
    base = np.asarray(field.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    gx, gy = rng.uniform(-50, 50, 2)
    base = base + (np.linspace(-1, 1, w, dtype=np.float32)[None, :] * gx
                   + np.linspace(-1, 1, h, dtype=np.float32)[:, None] * gy)[..., None]
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def _shapes(im: Image.Image, rng: np.random.Generator, count: tuple[int, int], ellipse: float,
            rect: float) -> None:
    """Draw rng.integers(*count) shapes: an ellipse below `ellipse`, a rectangle below `rect`, else a line."""
    w, h = im.size
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(*count))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.random()
        if kind < ellipse:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind < rect:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(1, 12)))


def _optics(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Photo finish: soft edges (Gaussian blur), then luma and chroma sensor-like grain."""
    w, h = im.size
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    arr = np.asarray(im, dtype=np.float32)
    arr += rng.standard_normal((h, w, 1), dtype=np.float32) * float(rng.uniform(2, 8))
    arr += rng.standard_normal((h, w, 3), dtype=np.float32) * float(rng.uniform(1, 4))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def picture(rng: np.random.Generator, w: int, h: int, photo: bool = False) -> Image.Image:
    """A w x h RGB picture: background, shapes, and for `photo` blur and grain.

    plain: gradient + uniform noise + 1-4 ellipses/rectangles (the tests' picture).
    photo: smooth colour field + gradient + 4-15 ellipses/rectangles/lines + blur + grain.
    """
    if not photo:
        im = _gradient_noise(rng, w, h)
        _shapes(im, rng, (1, 5), ellipse=0.5, rect=1.0)  # random() < 1.0 always: never a line
        return im
    im = _smooth_field(rng, w, h)
    _shapes(im, rng, (4, 16), ellipse=0.4, rect=0.75)
    return _optics(im, rng)


# =============================================================================== the benchmark corpus
def make_image(args: tuple[int, int]) -> tuple[bytes, int, int]:
    """Image `i` of pool seed `seed` -> (JPEG bytes, w, h). Deterministic."""
    seed, i = args
    rng = np.random.default_rng([seed, i])
    if rng.random() < 0.15:  # large: long side 1024..2048
        long_side = int(rng.integers(1024, 2049))
        short = int(long_side * rng.uniform(0.56, 1.0))
        w, h = (long_side, short) if rng.random() < 0.7 else (short, long_side)
    else:  # typical web image: 300..800 px a side
        w, h = (int(v) for v in rng.integers(300, 801, 2))
    im = picture(rng, w, h, photo=True)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue(), w, h


def image_pool(work: Path, count: int, seed: int, procs: int) -> list[tuple[bytes, int, int]]:
    """`count` unique JPEGs, cached in work/ as a pickle."""
    import pickle
    from multiprocessing import get_context

    path = work / f"pool-{seed}-{count}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with get_context("fork").Pool(max(1, procs)) as pool:
        images = pool.map(make_image, [(seed, i) for i in range(count)], chunksize=8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(images, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    log(f"corpus: made {count} unique JPEGs in {time.monotonic() - t0:.1f} s -> {path.name}")
    return images


def _write_shard(path: Path, samples: list[tuple[str, bytes, bytes]]) -> None:
    """One USTAR tar with `key.jpg`, `key.txt`, `key.json` for each (key, json bytes, JPEG bytes)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, meta, data in samples:
            for ext, payload in (("jpg", data), ("txt", f"a synthetic photo {key}".encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(payload), _MTIME, 0o644
                tf.addfile(info, io.BytesIO(payload))


def corpus(work: Path, images: int, shard_size: int, pool_size: int, seed: int, procs: int) -> dict[str, Any]:
    """`images` samples (jpg + txt + json) in tars of `shard_size`, cycling the unique pool; cached."""
    folder = work / f"corpus-{images}-{shard_size}-{pool_size}-{seed}"
    done = folder / "_done.json"
    if done.exists():
        return json.loads(done.read_text())
    pool = image_pool(work, pool_size, seed, procs)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.monotonic()
    n_shards = max(1, math.ceil(images / shard_size))
    total_bytes, pixels, large = 0, 0, 0
    for s in range(n_shards):
        samples = []
        for j in range(s * shard_size, min(images, (s + 1) * shard_size)):
            data, w, h = pool[j % len(pool)]
            total_bytes += len(data)
            pixels += w * h
            large += max(w, h) >= 1024
            key = f"{s:05d}{j:07d}"
            meta = json.dumps({"key": key, "width": w, "height": h, "source": "bench"}).encode()
            samples.append((key, meta, data))
        _write_shard(folder / f"{s:05d}.tar", samples)
    info = {"folder": str(folder), "glob": str(folder / "*.tar"), "images": images, "shards": n_shards,
            "shard_size": shard_size, "unique_images": min(pool_size, images), "jpeg_bytes": total_bytes,
            "mean_jpeg_kb": round(total_bytes / images / 1024, 1),
            "mean_megapixels": round(pixels / images / 1e6, 3), "large_fraction": round(large / images, 3)}
    done.write_text(json.dumps(info, indent=1))
    log(f"corpus: wrote {images} samples in {n_shards} tars in {time.monotonic() - t0:.1f} s -> {folder.name}")
    return info


def shard_urls(info: dict[str, Any]) -> list[str]:
    """The corpus's tars, in order."""
    return sorted(str(p) for p in Path(info["folder"]).glob("*.tar"))
