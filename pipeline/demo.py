"""`wintok demo`: the embedded default job.

Writes a small corpus of real photos (the sample images scikit-image ships) as webdataset
tar shards, with two deliberately broken samples, tokenizes it with `wintok-mini` (the small
WinTok this package trains and ships; `wintok-tiny`'s random weights if it is missing) on a
local Ray (CPU is fine), prints where the output is and how to read it, and ends with a grid
of originals beside their reconstructions from the pixel ids, with PSNR.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile

from .io import Storage

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "text", "clock", "brick", "grass", "gravel",
          "colorwheel", "logo", "microaneurysms", "retina"]


# photos wintok-mini never saw in training: its reconstruction PSNR is measured on these
HELD_OUT = ("chelsea", "coins", "clock")
MINI = "wintok-mini"


def _photos(names: list[str] | tuple[str, ...] = tuple(PHOTOS)) -> list[tuple[str, bytes]]:
    try:
        import skimage.data as data
    except ImportError:
        raise SystemExit("wintok demo needs scikit-image for its sample photos: pip install -e '.[demo]'") from None
    from PIL import Image

    out = []
    for name in names:
        try:
            arr = getattr(data, name)()
        except Exception:  # noqa: BLE001 - an image that needs a download is skipped
            continue
        img = Image.fromarray(arr)
        buf = io.BytesIO()
        if img.mode == "RGBA":
            img.save(buf, "PNG")
            out.append((f"{name}.png", buf.getvalue()))
        else:
            img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(buf, "JPEG", quality=90)
            out.append((f"{name}.jpg", buf.getvalue()))
    return out


def write_corpus(directory: str, shards: int = 4, names: list[str] | tuple[str, ...] = tuple(PHOTOS)) -> list[str]:
    """Photos spread over `shards` tars, plus a truncated JPEG and a caption without image."""
    os.makedirs(directory, exist_ok=True)
    photos = _photos(names)
    samples = [(f"{i:06d}", fname, payload, f"scikit-image sample photo '{fname.split('.')[0]}'")
               for i, (fname, payload) in enumerate(photos)]
    samples.append((f"{len(samples):06d}", "broken.jpg", photos[0][1][: len(photos[0][1]) // 3], "truncated file"))
    samples.append((f"{len(samples):06d}", None, b"", "a caption whose image is missing"))
    paths = []
    for s in range(shards):
        path = os.path.join(directory, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for key, fname, payload, caption in samples[s::shards]:
                members = [(f"{key}.txt", caption.encode())]
                if fname:
                    members.insert(0, (f"{key}.{fname.rsplit('.', 1)[1]}", payload))
                for name, blob in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        paths.append(path)
    return paths


def run_demo(directory: str, workers: int | None = None) -> int:
    from wintok_model.checkpoint import shipped_models

    from .config import TINY_PRESET, JobConfig
    from .driver import run_job
    from .status import render, status

    corpus = os.path.abspath(os.path.join(directory, "corpus"))
    output = os.path.abspath(os.path.join(directory, "output"))
    paths = write_corpus(corpus)
    print(f"corpus: {len(paths)} shards of scikit-image sample photos in {corpus}")
    model = MINI if MINI in shipped_models() else TINY_PRESET
    if model == MINI:
        print(f"model: {MINI}, the small WinTok trained by this package (64 px, 4 codebooks of 1024; "
              f"held-out photos: {', '.join(HELD_OUT)})")
    else:
        print(f"model: {TINY_PRESET} preset with RANDOM weights (the package's trained {MINI} is missing)")
    cfg = JobConfig(inputs=(f"{corpus}/{{00000..{len(paths) - 1:05d}}}.tar",), output=output,
                    model=model, workers=workers, batch_size=8, max_retries=1, retry_backoff=0.5)
    summary = run_job(cfg)
    print(summary.render())
    print()
    print(render(status(output), speed=False))  # one speed figure: the run's img/s above
    first = Storage(output).path("shards/00000.parquet")
    print(f"\noutput: {output}\nread it with:\n"
          f"  {sys.executable} -c \"import pyarrow.parquet as pq; from schemas import column_to_numpy; t = pq.read_table('{first}'); "
          f"print(t.schema); print(column_to_numpy(t, 'pixel_ids').shape)\"")
    if summary.ok:
        from .reconstruct import grid_png, reconstruct

        grid = os.path.abspath(os.path.join(directory, "reconstruction.png"))
        result = reconstruct(output, model, n=16)
        grid_png(result, grid)
        mean = result.mean_psnr
        print(f"reconstructions of the first {len(result.keys)} images (original | decoded from the pixel ids): "
              f"{grid}" + (f", mean PSNR {mean:.1f} dB" if mean is not None else ""))
    return 0 if summary.ok else 1
