"""What a run is and what is left of it: fingerprint, plan, `_run.json` check, pending shards.

Everything the driver decides before any worker starts: the run's fingerprint (what determines
the output bytes), the plan (input URL -> output stem, one per shard), whether OUTPUT holds
this run or another (`_run.json`), and which planned shards are not committed yet.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from typing import Any

from schemas import SCHEMA_VERSION, fingerprint_digest

from .config import JobConfig
from .inputs import folder_units, input_kind, naming_url
from .io import Storage, StorageOptions, expand_inputs, s3_options
from .layout import FAILED_DIR, MANIFEST_DIR, RUN_FILE
from .protocol import ShardTask
from .shard.encode import ModelSpec
from .urls import StemError, normalize_stem, redact_text, redact_url, shard_stems


class RunRefused(RuntimeError):
    """The run must not start (fingerprint mismatch, bad model...). One line for the user."""


def storage_options(cfg: JobConfig) -> StorageOptions:
    return s3_options(cfg.s3_endpoint_url, cfg.s3_profile, cfg.s3_anon, cfg.s3_key, cfg.s3_secret)


def model_spec(cfg: JobConfig) -> ModelSpec:
    return ModelSpec(model=cfg.model, encoder_config=cfg.encoder_config, allow_pickle=cfg.allow_pickle,
                     dtype=cfg.dtype, device=cfg.device, semantic_tokens=cfg.semantic_tokens,
                     semantic_codebook=cfg.semantic_codebook,
                     teacher=cfg.teacher, teacher_dtype=cfg.teacher_dtype,
                     teacher_patch_tokens=cfg.teacher_patch_tokens, compile=cfg.compile)


# --------------------------------------------------------------------------- fingerprint
def run_fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """What determines the output bytes: model + teacher identity, preprocessing, precision, layout."""
    from importlib.metadata import PackageNotFoundError, version

    from wintok_model.checkpoint import CheckpointError, check_model, weights_sha256

    from .models import localize

    try:
        model = localize(cfg.model, storage_options(cfg))
        teacher = localize(cfg.teacher, storage_options(cfg))
    except FileNotFoundError as e:
        raise RunRefused(redact_text(str(e))) from None
    fp: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    try:
        fp["package_version"] = version("wintok-pipeline")
    except PackageNotFoundError:
        fp["package_version"] = "dev"
    if model:
        try:
            config = check_model(model, cfg.encoder_config, cfg.allow_pickle)
        except CheckpointError as e:
            raise RunRefused(str(e)) from None
        fp["model"] = {"config": config.to_dict(), "sha256": weights_sha256(model),
                       "name": os.path.basename(model.rstrip("/"))}
    if teacher:
        fp["teacher"] = _teacher_identity(teacher)
        fp["teacher_dtype"] = cfg.teacher_dtype
        fp["teacher_patch_tokens"] = cfg.teacher_patch_tokens
    from .preprocess import PIXELS_VERSION

    fp["preprocess"] = {"resize": cfg.resize, "max_image_pixels": cfg.max_image_pixels,
                        "pixels_version": PIXELS_VERSION}
    fp["dtype"] = cfg.dtype
    fp["semantic_tokens"] = cfg.semantic_tokens
    if model:
        codebook = _semantic_codebook_identity(model, cfg, fp["model"])
        if codebook:  # only then: runs without one keep the fingerprint they always had
            fp["semantic_codebook"] = codebook
    return fp


def _semantic_codebook_identity(model: str, cfg: JobConfig, model_fp: dict[str, Any]) -> dict[str, Any] | None:
    """The codebook's sha256 and shape, checked against the model; None without one."""
    from wintok_model.semantic import CodebookError, codebook_sha256, read_info

    from .models import semantic_codebook_path

    try:
        path = semantic_codebook_path(model, cfg.semantic_codebook)
        config = model_fp["config"]
        if path is None:  # the checkpoint's trained quantiser, unless turned off
            if not config.get("semantic_vocab_size") or (cfg.semantic_codebook or "").lower() == "none":
                return None
            g = config["semantic_num_codebooks"]
            return {"source": "checkpoint", "kind": "vq", "k": config["semantic_vocab_size"] // g, "levels": g}
        info = read_info(path)
    except CodebookError as e:
        raise RunRefused(str(e)) from None
    if info.dim != config["hidden_size"] or (info.model_sha256 and info.model_sha256 != model_fp["sha256"]):
        raise RunRefused(f"semantic codebook {path} was fitted for another model (dim {info.dim}, weights "
                         f"{info.model_sha256[:12] or '?'}; this model: dim {model_fp['config']['hidden_size']}, "
                         f"weights {model_fp['sha256'][:12]}): fit one for this model, or --semantic-codebook none")
    return {"source": "file", "sha256": codebook_sha256(path), "kind": info.kind, "k": info.k, "levels": info.levels}


def _teacher_identity(spec: str) -> dict[str, Any]:
    from wintok_model import teachers

    try:
        return teachers.teacher_identity(spec)
    except teachers.TeacherError as e:
        raise RunRefused(str(e)) from None


# --------------------------------------------------------------------------- plan and resume
def plan(cfg: JobConfig, opts: StorageOptions) -> list[ShardTask]:
    """The first attempt at every work unit of the job, in input order (a folder's units in theirs);
    two units may not name the same output. Kinds and folder units: pipeline/inputs.py."""
    units: list[tuple[str, ShardTask]] = []  # (the URL its stem is made from, the task)
    for url in expand_inputs(cfg.inputs, opts):
        kind = input_kind(url, cfg.input_format)
        if kind == "folder":
            units += [(name, ShardTask(url, "", 1, kind=kind, files=files))
                      for name, files in folder_units(url, cfg.folder_unit_files, opts)]
        else:
            units.append((naming_url(url, kind), ShardTask(url, "", 1, kind=kind)))
    try:
        names = shard_stems([name for name, _ in units])
    except StemError as e:
        raise RunRefused(str(e)) from None
    stems: dict[str, ShardTask] = {}
    for (name, task), stem in zip(units, names, strict=True):
        if stem in stems:
            raise RunRefused(f"inputs {redact_url(stems[stem].url)} and {redact_url(name)} would write the same "
                             f"output {stem}")
        stems[stem] = dataclasses.replace(task, stem=stem)
    return list(stems.values())


def input_fingerprint(cfg: JobConfig, shards: list[ShardTask]) -> dict[str, Any]:
    """What of the input options decides the output of a run with folder or Parquet units (nothing
    for tars alone, so that their runs' fingerprints stay as they were)."""
    kinds = {t.kind for t in shards}
    fp: dict[str, Any] = {}
    if "folder" in kinds:
        fp["folder_unit_files"] = cfg.folder_unit_files
    if "parquet" in kinds:
        fp["parquet_columns"] = {"image": cfg.image_column, "key": cfg.key_column, "text": cfg.text_column,
                                 "meta": cfg.meta_column}
    return {"inputs": fp} if fp else {}


def check_run_file(storage: Storage, fp: dict[str, Any], cfg: JobConfig) -> None:
    """Refuse to mix outputs of different models/configs in one OUTPUT, unless overwriting."""
    digest = fingerprint_digest(fp)
    exists = storage.exists(RUN_FILE)
    if exists and not cfg.overwrite:
        try:
            old = json.loads(storage.read_text(RUN_FILE))
        except (ValueError, OSError):
            old = {}
        if old.get("fingerprint_sha256") != digest:
            diff = sorted(k for k in set(fp) | set(old.get("fingerprint", {}))
                          if fp.get(k) != old.get("fingerprint", {}).get(k))
            raise RunRefused(
                f"{storage.url} holds output of a different run (differs in: {', '.join(diff) or 'unknown'}); "
                "use another OUTPUT, or --overwrite to redo every shard with this configuration"
            )
        return  # same run: resume without rewriting anything
    if cfg.overwrite:
        for name in storage.list(MANIFEST_DIR):
            storage.delete(f"{MANIFEST_DIR}/{name}")
    job = cfg.public_dict()
    for key in ("model", "teacher"):  # a model URL may carry credentials too
        if job.get(key):
            job[key] = redact_url(job[key])
    run = {"fingerprint_sha256": digest, "fingerprint": fp, "job": job,
           "storage": storage_options(cfg).redacted(),
           "started_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.put_bytes(json.dumps(run, indent=1, sort_keys=True).encode(), RUN_FILE)


def committed_stems(storage: Storage) -> set[str]:
    """Stems of `_manifest/` as listed, through the same normalisation as the plan's stems."""
    return {normalize_stem(n[: -len(".json")]) for n in storage.list(MANIFEST_DIR) if n.endswith(".json")}


def failed_stems(storage: Storage) -> set[str]:
    return {normalize_stem(n[: -len(".json")]) for n in storage.list(FAILED_DIR) if n.endswith(".json")}


def pending(cfg: JobConfig, storage: Storage, shards: list[ShardTask]) -> tuple[list[ShardTask], int]:
    """(the shards still to run, how many of the plan are committed already); with
    `retry_failed`, only the shards that have a `_failed/` record."""
    done = committed_stems(storage)
    todo = [t for t in shards if t.stem not in done]
    if cfg.retry_failed:
        failed = failed_stems(storage)
        todo = [t for t in todo if t.stem in failed]
    return todo, sum(1 for t in shards if t.stem in done)
