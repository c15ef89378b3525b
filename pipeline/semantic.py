"""`wintok fit-semantic-codebook`: semantic tokens of a corpus sample -> a fitted codebook + report.

The sample: the input shards in a seeded order (sorted by output stem, then shuffled with
`seed`), each shard's rows in sample order, the first `sample` images. Its tokens come from
one of two places, which give the same vectors for the same shards:

* images (webdataset shards): each shard goes through :class:`ShardProcessor`, the shard path
  of `tokenize` (reader, decoders, runner, sink), in this process, into a temporary OUTPUT
  with `semantic_tokens`; its Parquet is read back as below;
* an OUTPUT of `tokenize --semantic-tokens`: its committed shards' cached `semantic_tokens`.

Both read the stored (fp16) tokens, so a codebook fitted from an OUTPUT equals one fitted from
its images. The last `holdout` share of the sampled images is left out of the fit and reported
apart (the error on tokens the codebook has not seen).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .io import Storage, StorageOptions, expand_inputs
from .layout import MANIFEST_DIR, RUN_FILE, shards_rel
from .plan import RunRefused
from .shard.encode import ModelSpec
from .urls import shard_stems

log = logging.getLogger("wintok")


class FitError(RunRefused):
    """The fit cannot run (no tokens, wrong OUTPUT, bad sizes); one line for the user."""


@dataclass(frozen=True)
class FitConfig:
    inputs: tuple[str, ...]
    model: ModelSpec
    output: str | None = None           # codebook path; None: <model dir>/semantic_codebook.safetensors
    k: int = 4096
    groups: int = 1                     # > 1: product quantisation
    depth: int = 1                      # > 1: residual quantisation
    sample: int = 10_000                # images
    seed: int = 0
    holdout: float = 0.1
    niter: int = 20
    batch_size: int = 64
    decode_threads: int = 2
    storage: StorageOptions | None = None

    @property
    def kind(self) -> str:
        return "pq" if self.groups > 1 else "rq" if self.depth > 1 else "kmeans"


def fit_semantic_codebook(cfg: FitConfig) -> dict[str, Any]:
    """Sample, fit, evaluate, save; returns the report (also saved beside the codebook)."""
    from wintok_model.checkpoint import check_model, weights_sha256
    from wintok_model.semantic import CODEBOOK_NAME, evaluate, fit_codebook

    from .models import localize

    if cfg.groups > 1 and cfg.depth > 1:
        raise FitError("give --codebooks G (product quantisation) or --depth R (residual), not both")
    if cfg.k < 2 or cfg.sample < 1 or cfg.groups < 1 or cfg.depth < 1 or not 0 <= cfg.holdout < 1:
        raise FitError("--k must be >= 2, --sample, --codebooks and --depth >= 1, --holdout in [0, 1)")
    model = localize(cfg.model.model, cfg.storage)
    config = check_model(model, cfg.model.encoder_config, cfg.model.allow_pickle)
    if cfg.groups > 1 and config.hidden_size % cfg.groups:
        raise FitError(f"--codebooks {cfg.groups} does not divide the semantic width {config.hidden_size}")
    out = cfg.output or (os.path.join(model, CODEBOOK_NAME) if os.path.isdir(model) else None)
    if out is None:
        raise FitError(f"model {cfg.model.model} is not a model directory: give -o CODEBOOK (and pass it to "
                       "tokenize with --semantic-codebook)")
    sha = weights_sha256(model)
    t0 = time.monotonic()
    tokens, pooled = sample_tokens(cfg, sha)
    t_sample = time.monotonic() - t0
    n_fit = len(tokens) - int(len(tokens) * cfg.holdout) if len(tokens) >= 10 else len(tokens)
    t1 = time.monotonic()
    cb = fit_codebook(tokens[:n_fit].reshape(-1, tokens.shape[-1]), cfg.k, cfg.kind,
                      levels=max(cfg.groups, cfg.depth), seed=cfg.seed, niter=cfg.niter,
                      model_sha256=sha, sample_images=n_fit)
    t_fit = time.monotonic() - t1
    report: dict[str, Any] = {"codebook": out, "kind": cfg.kind, "k": cfg.k, "levels": cb.info.levels,
                              "dim": cb.info.dim, "seed": cfg.seed, "sample_images": len(tokens),
                              "fit": evaluate(cb, tokens[:n_fit], pooled[:n_fit])}
    if n_fit < len(tokens):
        report["held_out"] = evaluate(cb, tokens[n_fit:], pooled[n_fit:])
    report["seconds"] = {"sample": round(t_sample, 3), "fit": round(t_fit, 3),
                         "total": round(time.monotonic() - t0, 3)}
    cb.save(out)
    with open(report_path(out), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    return report


def report_path(codebook: str) -> str:
    return os.path.splitext(codebook)[0] + ".report.json"


# ---------------------------------------------------------------------- sampling
def sample_tokens(cfg: FitConfig, model_sha256: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, N, D) fp32 tokens (from their stored fp16) and (n, D) semantic_pooled of the sample."""
    tokens, pooled, have = [], [], 0
    for t, p in _shard_rows(cfg, model_sha256):
        take = min(len(t), cfg.sample - have)
        tokens.append(t[:take])
        pooled.append(p[:take])
        have += take
        if have >= cfg.sample:
            break
    if not have:
        raise FitError("no images in the sample: the inputs hold no decodable images")
    return np.concatenate(tokens), np.concatenate(pooled)


def _seeded(stems: list[str], seed: int) -> list[str]:
    order = sorted(stems)
    random.Random(seed).shuffle(order)
    return order


def _shard_rows(cfg: FitConfig, model_sha256: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if len(cfg.inputs) == 1 and Storage(cfg.inputs[0], cfg.storage).exists(RUN_FILE):
        yield from _output_rows(Storage(cfg.inputs[0], cfg.storage), cfg.seed, model_sha256)
    else:
        yield from _image_rows(cfg)


def _read_rows(storage: Storage, stem: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    from schemas import column_to_numpy

    table = pq.read_table(io.BytesIO(storage.read_bytes(shards_rel(stem))),
                          columns=["sample_index", "semantic_pooled", "semantic_tokens"])
    order = np.argsort(table.column("sample_index").to_numpy(), kind="stable")
    tokens = column_to_numpy(table, "semantic_tokens")[order].astype(np.float32)
    return tokens, column_to_numpy(table, "semantic_pooled")[order].astype(np.float32)


def _output_rows(storage: Storage, seed: int, model_sha256: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    run = json.loads(storage.read_text(RUN_FILE))
    fp = run.get("fingerprint", {})
    if not fp.get("semantic_tokens"):
        raise FitError(f"{storage.url} was tokenized without --semantic-tokens: fit from its input shards, or "
                       "tokenize with --semantic-tokens")
    if fp.get("model", {}).get("sha256") != model_sha256:
        raise FitError(f"{storage.url} holds tokens of another model (weights {fp.get('model', {}).get('sha256')}, "
                       f"--model: {model_sha256}): give the model it was tokenized with")
    stems = [n[: -len(".json")] for n in storage.list(MANIFEST_DIR) if n.endswith(".json")]
    for stem in _seeded(stems, seed):
        yield _read_rows(storage, stem)


def _image_rows(cfg: FitConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each shard through the tokenize shard path (ShardProcessor) into a temporary OUTPUT."""
    from .protocol import ShardTask
    from .shard.processor import ShardProcessor, WorkerConfig

    urls = expand_inputs(cfg.inputs, cfg.storage)
    by_stem = dict(zip(shard_stems(urls), urls, strict=True))
    with tempfile.TemporaryDirectory(prefix="wintok-fit-") as tmp:
        spec = replace(cfg.model, semantic_tokens=True, semantic_codebook="none")
        proc = ShardProcessor(WorkerConfig(output=tmp, model=spec, batch_size=cfg.batch_size,
                                           decode_threads=cfg.decode_threads, storage=cfg.storage
                                           or StorageOptions()))
        try:
            storage = Storage(tmp)
            for stem in _seeded(list(by_stem), cfg.seed):
                result = proc.process(ShardTask(by_stem[stem], stem, 1))
                if not result.ok:
                    raise FitError(f"shard {stem} failed ({result.reason}): {result.error}")
                yield _read_rows(storage, stem)
        finally:
            proc.close()
