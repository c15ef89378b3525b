"""`wintok reconstruct`: pixel ids of an OUTPUT back to images, beside the originals.

The first N rows of the committed shards (stem order) are decoded by the model's decoder.
Where a row's source shard can be read, its image is decoded again with the run's own
preprocessing (the pixels the model saw), and the grid shows original | reconstruction with
the PSNR of each pair (8-bit, peak 255) and their mean. The model must be the one the run
used (same weights sha256), or the reconstructions would mean nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas import tensor_to_numpy

from .io import StorageOptions, open_input
from .output import Output, OutputError
from .preprocess import PreprocessConfig, decode_image
from .shard.samples import iter_samples
from .urls import redact_url

log = logging.getLogger("wintok")


@dataclass
class Reconstruction:
    keys: list[str]
    recon: np.ndarray                        # (n, S, S, 3) uint8
    originals: list[np.ndarray | None]       # model-input pixels of each row's image, None if unreachable
    psnr: list[float | None] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)  # source shard -> why

    @property
    def mean_psnr(self) -> float | None:
        vals = [p for p in self.psnr if p is not None]
        return float(np.mean(vals)) if vals else None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def _rows(out: Output, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for shard in out.shards():
        for batch in out.parquet(shard.url).iter_batches(batch_size=n, columns=["key", "sample_index", "pixel_ids"]):
            ids = tensor_to_numpy(batch.column("pixel_ids"))
            for i, (key, index) in enumerate(zip(batch.column("key").to_pylist(),
                                                 batch.column("sample_index").to_pylist(), strict=True)):
                rows.append({"key": key, "index": index, "url": shard.input_url, "ids": ids[i]})
                if len(rows) == n:
                    return rows
    return rows


def _originals(rows: list[dict[str, Any]], cfg: PreprocessConfig, opts: StorageOptions | None,
               unreachable: dict[str, str]) -> list[np.ndarray | None]:
    found: dict[tuple[str, int], np.ndarray] = {}
    for url in dict.fromkeys(r["url"] for r in rows):
        wanted = {r["index"] for r in rows if r["url"] == url}
        try:
            with open_input(url, opts) as stream:
                for s in iter_samples(stream, url):
                    if s.index in wanted and s.image is not None:
                        found[url, s.index] = decode_image(s.image, cfg).pixels
                    if s.index >= max(wanted):
                        break
        except Exception as e:  # noqa: BLE001 - any failure only means: no original to show
            unreachable[redact_url(url)] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return [found.get((r["url"], r["index"])) for r in rows]


def reconstruct(output: str, model: str, n: int = 16, opts: StorageOptions | None = None,
                allow_pickle: bool = False, encoder_config: str | None = None,
                device: str = "cpu") -> Reconstruction:
    import torch

    from wintok_model.checkpoint import load_model, weights_sha256

    from .models import localize

    if n <= 0:
        raise OutputError(f"--n must be at least 1, got {n}")
    out = Output(output, opts)
    fp = out.fingerprint()
    used = (fp.get("model") or {}).get("sha256")
    if not used:
        raise OutputError(f"{redact_url(output)} holds no pixel ids (the run had no WinTok model): nothing to "
                          "reconstruct")
    path = localize(model, opts)
    if weights_sha256(path) != used:
        raise OutputError(f"--model {model} is not the model this OUTPUT was tokenized with (weights sha256 "
                          f"{used[:16]}...): pass that model")
    rows = _rows(out, n)
    if not rows:
        raise OutputError(f"{redact_url(output)} has no committed rows yet")
    net = load_model(path, encoder_config=encoder_config, allow_pickle=allow_pickle).to(device).eval()
    c = net.config
    ids = torch.from_numpy(np.stack([r["ids"] for r in rows]).astype(np.int64)).reshape(len(rows), c.num_codebooks, -1)
    with torch.inference_mode():
        x = net.idx_to_img(ids.to(device)).float().clamp(-1, 1)
    recon = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    pre = fp.get("preprocess") or {}
    cfg = PreprocessConfig(image_size=c.image_size, **{k: pre[k] for k in ("resize", "max_image_pixels") if k in pre})
    result = Reconstruction([r["key"] for r in rows], recon, [])
    result.originals = _originals(rows, cfg, opts, result.unreachable)
    result.psnr = [psnr(o, r) if o is not None else None for o, r in zip(result.originals, recon, strict=True)]
    return result


def grid_png(result: Reconstruction, path: str, columns: int = 4) -> None:
    """Pairs (original | reconstruction) in a grid, PSNR under each pair; the mean in the title."""
    from PIL import Image, ImageDraw

    size = result.recon.shape[1]
    tile = max(size, 128)  # small models: upscale so that one can see something
    label = 14
    n = len(result.keys)
    cols = min(columns, n)
    rows = -(-n // cols)
    head = 20
    canvas = Image.new("RGB", (cols * (2 * tile + 8), head + rows * (tile + label + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    mean = result.mean_psnr
    shown = f"{mean:.2f} dB" if mean is not None else "n/a (originals unreachable)"
    draw.text((4, 4), f"original | reconstruction   mean PSNR {shown}", fill="black")
    for i, key in enumerate(result.keys):
        x0, y0 = (i % cols) * (2 * tile + 8), head + (i // cols) * (tile + label + 6)
        orig = result.originals[i]
        if orig is not None:
            canvas.paste(Image.fromarray(orig).resize((tile, tile), Image.NEAREST), (x0, y0))
        else:
            draw.rectangle([x0, y0, x0 + tile - 1, y0 + tile - 1], outline="gray")
        canvas.paste(Image.fromarray(result.recon[i]).resize((tile, tile), Image.NEAREST), (x0 + tile, y0))
        p = result.psnr[i]
        draw.text((x0, y0 + tile + 1), f"{key[:24]}  {f'{p:.1f} dB' if p is not None else ''}", fill="black")
    canvas.save(path)
