"""Distillation reader: images from the input webdataset shards joined with an OUTPUT's cached teacher.

    from pipeline.distill import DistillDataset
    ds = DistillDataset("s3://bucket/tokens")        # the input shards come from its manifests
    for s in torch.utils.data.DataLoader(ds, batch_size=32, num_workers=4):
        s["image"], s["teacher_embedding"]           # (B, 3, S, S) uint8, (B, Dt) float32

The images are read with `webdataset` as training code reads them (`wds.WebDataset` with
`split_by_node` / `split_by_worker`), and each sample is joined by (input shard url, key) with
the row of the committed output shard that recorded that input shard (the manifests' input_url
is the join key of the shard; the row's `key` of the sample). Images are decoded the way the
pipeline decoded them for the teacher (pipeline/preprocess.py at the run's image size and resize
mode), so `image` is exactly what the teacher saw.

A sample with no cached row (its input shard is not committed, or the pipeline recorded it in
errors/) is not yielded; it is counted in `missing` (per input shard in `missing_by_shard`) and
a warning names the shard and the count when its shard ends. `joined` counts the samples yielded.
With DataLoader workers each worker counts (and logs) its own shards. Object-store input URLs
(s3://...) are opened by pipeline/io.py (retries, the dataset's storage options) through
webdataset's opener table.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from schemas import column_to_numpy

from .io import OBJECT_STORES, StorageOptions, open_input
from .output import Output, OutputError, ShardFile, open_parquet
from .preprocess import PreprocessConfig, decode_image
from .shard.samples import IMAGE_EXTS

log = logging.getLogger("wintok")


def _norm(url: str) -> str:
    return os.path.abspath(url) if "://" not in url else url


def _open(url: str, mode: str = "rb", bufsize: int = 8192, *, opts: StorageOptions | None = None,
          **kw: Any) -> Any:
    """webdataset's opener for object-store URLs: the pipeline's retrying stream (pipeline/io.py)."""
    return open_input(url, opts)


def _use_our_opener(opts: StorageOptions | None) -> None:
    """webdataset opens s3:// (gs://, az://...) only through `pipe:`; give it pipeline/io.py's stream
    for the schemes it has no opener of (an opener the user registered is left alone)."""
    from webdataset.gopen import gopen_schemes

    for proto in OBJECT_STORES:
        current = gopen_schemes.get(proto)
        if current is None or getattr(current, "func", None) is _open:
            gopen_schemes[proto] = functools.partial(_open, opts=opts)


class DistillDataset(IterableDataset):
    """(image, cached teacher outputs) pairs for distillation, without running the teacher.

    `output`: the OUTPUT with `teacher_embedding`; `urls`: the input shards to read (default:
    every committed shard's input url, in stem order); `columns`: the cached columns to join
    (default `teacher_embedding`, plus `teacher_patch_tokens` when `patch_tokens=True`);
    `image_size`: default the run's model image size; `decode`: bytes -> image, replacing the
    pipeline's decoding (then `image` is whatever it returns).
    """

    def __init__(self, output: str, urls: Sequence[str] | None = None, *, storage: StorageOptions | None = None,
                 columns: Sequence[str] | None = None, patch_tokens: bool = False, image_size: int | None = None,
                 shardshuffle: bool | int = False, seed: int = 0,
                 decode: Callable[[bytes], Any] | None = None) -> None:
        super().__init__()
        out = Output(output, storage)
        self.opts = storage
        self.by_url: dict[str, ShardFile] = {_norm(f.input_url): f for f in out.shards()}
        self.urls = [_norm(u) for u in urls] if urls is not None else list(self.by_url)
        if not self.urls:
            raise OutputError(f"{out.storage.url} has no committed shard to read the images of")
        names = out.schema().names
        self.columns = list(columns or ["teacher_embedding"] + (["teacher_patch_tokens"] if patch_tokens else []))
        absent = [c for c in self.columns if c not in names]
        if absent:
            raise OutputError(f"{out.storage.url} has no {', '.join(absent)} column (it was tokenized without "
                              "--teacher, or without --teacher-patch-tokens): nothing to distil from")
        fp = out.fingerprint()
        size = image_size or ((fp.get("model") or {}).get("config") or {}).get("image_size")
        if decode is None and not size:
            raise OutputError("the run fingerprint names no model image size: pass image_size=")
        resize = (fp.get("preprocess") or {}).get("resize")
        self.pre = PreprocessConfig(image_size=int(size), **({"resize": resize} if resize else {})) if size else None
        self.decode = decode
        self.shardshuffle, self.seed = shardshuffle, seed
        self.missing = 0
        self.joined = 0
        self.missing_by_shard: Counter[str] = Counter()
        self._cache: OrderedDict[str, tuple[dict[str, int], dict[str, np.ndarray]] | None] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict()}

    def _cached(self, url: str) -> tuple[dict[str, int], dict[str, np.ndarray]] | None:
        """{key: row} and the cached columns of the output shard of input `url` (None: not committed)."""
        if url not in self._cache:
            shard = self.by_url.get(url)
            value = None
            if shard is not None:
                table = open_parquet(shard.url, self.opts).read(columns=["key", *self.columns])
                rows = {k: i for i, k in enumerate(table.column("key").to_pylist())}
                value = (rows, {c: column_to_numpy(table, c).astype(np.float32) for c in self.columns})
            self._cache[url] = value
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[url]

    def _image(self, sample: dict[str, Any]) -> Any:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise OutputError(f"{sample['__url__']}: sample {sample['__key__']!r} has no image member")
        data = sample[ext]
        if self.decode is not None:
            return self.decode(data)
        return torch.from_numpy(decode_image(data, self.pre).pixels).permute(2, 0, 1)

    def _shard_done(self, url: str | None) -> None:
        if url is not None and self.missing_by_shard.get(url):
            log.warning("distill: %s: %d samples have no cached teacher row (missing; %d in all so far)",
                        url, self.missing_by_shard[url], self.missing)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        _use_our_opener(self.opts)
        ds = wds.WebDataset(self.urls, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                            shardshuffle=self.shardshuffle, seed=self.seed, empty_check=False)
        current = None
        for sample in ds:
            url, key = sample["__url__"], sample["__key__"]
            if url != current:
                self._shard_done(current)
                current = url
            cached = self._cached(_norm(url))
            row = cached[0].get(key) if cached is not None else None
            if row is None:
                self.missing += 1
                self.missing_by_shard[url] += 1
                continue
            self.joined += 1
            out = {"image": self._image(sample), "key": key, "shard": url}
            out.update({c: torch.from_numpy(cached[1][c][row]) for c in self.columns})
            yield out
        self._shard_done(current)
